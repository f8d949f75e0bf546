"""One SlotSemaphore workflow per pool enforces the pool's concurrency cap.

Acquire, grant and release travel as signals (a workflow cannot send an Update to another
workflow). Each request has an id, so duplicates are harmless. A holder is recorded before
its grant is sent, so the cap counts every slot that might be in use.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.slots import SlotActivities
    from mayfly import metrics
    from mayfly.models import (
        AcquireRequest,
        DeadHolderCheck,
        Holder,
        HolderView,
        ReleaseRequest,
        SemaphoreInput,
        SemaphoreStatus,
        SlotGrant,
    )

RECENTLY_RELEASED_KEPT = 2000
GRANT_SIGNAL = "slot_granted"


@workflow.defn(name="SlotSemaphore")
class SlotSemaphoreWorkflow:
    @workflow.init
    def __init__(self, state: SemaphoreInput) -> None:
        self._s = state
        self._released = set(state.recently_released)
        # Grants are sent concurrently: awaiting each signal in turn would cost one workflow
        # task round trip per grant and serialise every handoff behind the previous one.
        self._grants_in_flight: set[asyncio.Task[None]] = set()
        self._reap: asyncio.Task[list[str]] | None = None
        # Set by every signal so the loop refreshes the UI details and gauges after it.
        self._dirty = False
        self._instruments: metrics.SemaphoreMetrics | None = None

    @workflow.signal
    def acquire(self, request: AcquireRequest) -> None:
        self._dirty = True
        rid = request.request_id
        if rid in self._s.holders or rid in self._released:
            return
        if any(waiter.request_id == rid for waiter in self._s.waiters):
            return
        self._s.waiters.append(request)

    @workflow.signal
    def release(self, request: ReleaseRequest) -> None:
        self._dirty = True
        self._forget(request.request_id)

    @workflow.signal
    def set_capacity(self, capacity: int) -> None:
        # Lowering the cap never revokes a held slot; it only holds back new grants.
        self._dirty = True
        self._s.capacity = max(0, capacity)

    @workflow.query
    def status(self) -> SemaphoreStatus:
        now = workflow.now()
        return SemaphoreStatus(
            pool=self._s.pool,
            capacity=self._s.capacity,
            holders=[
                HolderView(
                    request_id=rid,
                    workflow_id=holder.request.holder_workflow_id,
                    held_for_s=(now - holder.granted_at).total_seconds(),
                )
                for rid, holder in self._s.holders.items()
            ],
            waiters=[waiter.request_id for waiter in self._s.waiters],
            granted_total=self._s.granted_total,
            reclaimed_total=self._s.reclaimed_total,
        )

    def _forget(self, request_id: str) -> None:
        self._s.holders.pop(request_id, None)
        self._s.waiters = [w for w in self._s.waiters if w.request_id != request_id]
        # Remembered even when unknown: a release can overtake its own acquire (the holder
        # was cancelled while its acquire was still in flight).
        self._remember_released(request_id)

    def _remember_released(self, request_id: str) -> None:
        if request_id in self._released:
            return
        self._released.add(request_id)
        self._s.recently_released.append(request_id)
        if len(self._s.recently_released) > RECENTLY_RELEASED_KEPT:
            dropped = self._s.recently_released.pop(0)
            self._released.discard(dropped)

    def _can_grant(self) -> bool:
        return bool(self._s.waiters) and len(self._s.holders) < self._s.capacity

    def _grant_next(self) -> None:
        request = self._s.waiters.pop(0)
        granted_at = workflow.now()
        self._s.holders[request.request_id] = Holder(request=request, granted_at=granted_at)
        self._s.granted_total += 1
        self._metrics().wait_seconds.record((granted_at - request.requested_at).total_seconds())
        task = asyncio.create_task(self._send_grant(request))
        self._grants_in_flight.add(task)
        task.add_done_callback(self._grants_in_flight.discard)

    async def _send_grant(self, request: AcquireRequest) -> None:
        handle = workflow.get_external_workflow_handle(
            request.holder_workflow_id, run_id=request.holder_run_id
        )
        try:
            await handle.signal(GRANT_SIGNAL, SlotGrant(request_id=request.request_id))
        except ApplicationError as error:
            if error.type != "ExternalWorkflowExecutionNotFound":
                raise
            # The waiter closed while queued: nothing can be running under this slot.
            self._forget(request.request_id)

    def _start_reap(self) -> None:
        holders = list(self._s.holders.values())
        self._reap = workflow.start_activity_method(
            SlotActivities.reclaim_dead_holders,
            DeadHolderCheck(pool=self._s.pool, holders=holders),
            start_to_close_timeout=timedelta(minutes=2),
            heartbeat_timeout=timedelta(seconds=30),
            summary=f"check {len(holders)} holders are alive",
        )

    async def _finish_reap(self) -> None:
        assert self._reap is not None
        try:
            dead = await self._reap
        except ActivityError as error:
            workflow.logger.warning("holder check failed, will retry next interval: %s", error)
            dead = []
        self._reap = None
        for request_id in dead:
            if request_id in self._s.holders:
                self._s.reclaimed_total += 1
                self._metrics().reclaimed.add(1)
                self._forget(request_id)

    def _metrics(self) -> metrics.SemaphoreMetrics:
        if self._instruments is None:
            self._instruments = metrics.SemaphoreMetrics(workflow.metric_meter(), self._s.pool)
        return self._instruments

    def _publish_gauges(self) -> None:
        instruments = self._metrics()
        instruments.held.set(len(self._s.holders))
        instruments.waiters.set(len(self._s.waiters))
        instruments.capacity.set(self._s.capacity)

    def _quiescent(self) -> bool:
        return not self._grants_in_flight and workflow.all_handlers_finished()

    def _has_work(self) -> bool:
        reaped = self._reap is not None and self._reap.done()
        return self._dirty or self._can_grant() or reaped or workflow.info().is_continue_as_new_suggested()

    @workflow.run
    async def run(self, state: SemaphoreInput) -> None:
        # The reap clock runs on its own deadline, so steady grant traffic cannot starve it.
        next_reap = workflow.now() + timedelta(seconds=self._s.reap_interval_s)
        while True:
            while self._can_grant():
                self._grant_next()
            if self._reap is not None and self._reap.done():
                await self._finish_reap()
                continue
            self._dirty = False
            workflow.set_current_details(
                f"**{len(self._s.holders)}/{self._s.capacity}** slots held, {len(self._s.waiters)} waiting"
            )
            self._publish_gauges()
            if workflow.info().is_continue_as_new_suggested():
                # Everything in flight must land in self._s before it is carried over.
                await workflow.wait_condition(
                    lambda: not self._grants_in_flight and workflow.all_handlers_finished()
                )
                if self._reap is not None:
                    await self._finish_reap()
                self._s.recently_released = [r for r in self._s.recently_released if r in self._released]
                workflow.continue_as_new(self._s)
            if self._s.holders and self._reap is None and workflow.now() >= next_reap:
                self._start_reap()
                next_reap = workflow.now() + timedelta(seconds=self._s.reap_interval_s)
            if not self._s.holders:
                next_reap = workflow.now() + timedelta(seconds=self._s.reap_interval_s)
            try:
                await workflow.wait_condition(
                    self._has_work,
                    timeout=(next_reap - workflow.now()) if self._s.holders and self._reap is None else None,
                    timeout_summary="check holders are alive",
                )
            except TimeoutError:
                pass
