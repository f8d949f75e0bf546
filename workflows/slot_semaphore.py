"""One SlotSemaphore workflow per pool enforces the pool's concurrency cap.

Acquire, grant and release travel as signals (a workflow cannot send an Update to another
workflow). Each request has an id, so duplicates are harmless. A holder is recorded before
its grant is sent, so the cap counts every slot that might be in use.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.slots import SlotActivities
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

    @workflow.signal
    def acquire(self, request: AcquireRequest) -> None:
        rid = request.request_id
        if rid in self._s.holders or rid in self._released:
            return
        if any(waiter.request_id == rid for waiter in self._s.waiters):
            return
        self._s.waiters.append(request)

    @workflow.signal
    def release(self, request: ReleaseRequest) -> None:
        self._forget(request.request_id)

    @workflow.signal
    def set_capacity(self, capacity: int) -> None:
        # Lowering the cap never revokes a held slot; it only holds back new grants.
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

    async def _grant_next(self) -> None:
        request = self._s.waiters.pop(0)
        self._s.holders[request.request_id] = Holder(request=request, granted_at=workflow.now())
        self._s.granted_total += 1
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

    async def _reclaim_dead_holders(self) -> None:
        holders = list(self._s.holders.values())
        dead: list[str] = await workflow.execute_activity_method(
            SlotActivities.reclaim_dead_holders,
            DeadHolderCheck(pool=self._s.pool, holders=holders),
            start_to_close_timeout=timedelta(minutes=2),
            heartbeat_timeout=timedelta(seconds=30),
            summary=f"check {len(holders)} holders are alive",
        )
        for request_id in dead:
            if request_id in self._s.holders:
                self._s.reclaimed_total += 1
                self._forget(request_id)

    @workflow.run
    async def run(self, state: SemaphoreInput) -> None:
        # The reap clock runs on its own deadline, so steady grant traffic cannot starve it.
        next_reap = workflow.now() + timedelta(seconds=self._s.reap_interval_s)
        while True:
            while self._can_grant():
                await self._grant_next()
            workflow.set_current_details(
                f"**{len(self._s.holders)}/{self._s.capacity}** slots held, {len(self._s.waiters)} waiting"
            )
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                # Signals that landed while we waited are already in self._s.
                self._s.recently_released = [r for r in self._s.recently_released if r in self._released]
                workflow.continue_as_new(self._s)
            if self._s.holders and workflow.now() >= next_reap:
                await self._reclaim_dead_holders()
                next_reap = workflow.now() + timedelta(seconds=self._s.reap_interval_s)
                continue
            if not self._s.holders:
                next_reap = workflow.now() + timedelta(seconds=self._s.reap_interval_s)
            try:
                await workflow.wait_condition(
                    lambda: self._can_grant() or workflow.info().is_continue_as_new_suggested(),
                    timeout=(next_reap - workflow.now()) if self._s.holders else None,
                    timeout_summary="check holders are alive",
                )
            except TimeoutError:
                pass
