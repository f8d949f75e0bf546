"""One SlotSemaphore workflow per pool enforces the pool's concurrency cap.

Workers' activities send acquires and releases in batches as Updates (`acquire_many`,
`release_many`): one that arrives while a run continues as new is moved to the next run by
the server, where a signal would void the run's task. Grants go out as signals, since a workflow
cannot send an Update to another workflow. The single-request signals stay for rechecks and
operators. Each request has an id, so duplicates are harmless. A holder is recorded before
its grant is sent, so the cap counts every slot that might be in use.

Every signal costs O(1) however long the queue (see `mayfly.slot_queue`), and a run continues
as new after a bounded number of events with its queue packed small, so a backlog of tens of
thousands neither slows workflow tasks nor approaches a payload limit.

A run started without carried state may follow a terminated or failed run whose holders it
cannot see. If an earlier run exists, it grants nothing for a grace period in which every live
holder re-asserts its slot (`SlotLease` rechecks on a timer) and waiters re-send `acquire`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.slots import SlotActivities
    from mayfly import metrics
    from mayfly.models import (
        SLOT_GRANTED_SIGNAL,
        SLOT_SOON_SIGNAL,
        AcquireRequest,
        CarriedSemaphore,
        DeadHolderCheck,
        EarlierRunCheck,
        Holder,
        HolderView,
        ReleaseRequest,
        SemaphoreInput,
        SemaphoreStatus,
        SlotGrant,
        SlotLookup,
        SlotSoon,
        recovery_grace_s,
    )
    from mayfly.slot_queue import ReleasedMemory, WaiterQueue, pack, unpack

# Each acquire, release and grant is an event or two. Continuing well before the
# server's own suggestion (4K events by default) keeps the replay after an eviction short: under
# a flood of signals a slow replay lets more than 100 signals pile up during one task, which
# the server answers by failing the task (FORCE_CLOSE_COMMAND) and a longer replay still.
# A replay also unpacks the queue the run was started with, so with thousands waiting a run
# continues sooner (at 10,000 acquirers a replay of 1,000 events took 1.1-1.4 s, of 400 0.96 s,
# measured when acquires and releases were signals and most continue-as-new tasks were refused
# and replayed). A short queue keeps long runs: at 400 events a busy pool's throughput fell from
# 58 to 40 grants/s.
CONTINUE_AFTER_EVENTS = 1_000
LONG_QUEUE = 1_000
CONTINUE_AFTER_EVENTS_WITH_A_LONG_QUEUE = 400
CONTINUE_AFTER_BYTES = 2 * 1024 * 1024
STATUS_WAITERS_SHOWN = 100
# How many waiters at the head of a full pool's queue are told their slot is near (at most the
# pool's cap: that many releases can come at once). Bounded so a huge cap costs no scan.
SOON_AHEAD_MAX = 64


@workflow.defn(name="SlotSemaphore")
class SlotSemaphoreWorkflow:
    @workflow.init
    def __init__(self, state: SemaphoreInput) -> None:
        self._pool = state.pool
        self._capacity = state.capacity
        self._reap_interval_s = state.reap_interval_s
        carried = state.carried or CarriedSemaphore()
        self._holders: dict[str, Holder] = {h.request.request_id: h for h in carried.holders}
        waiters, released = unpack(carried.packed_queue)
        self._waiters = WaiterQueue(waiters)
        self._released = ReleasedMemory(released)
        self._granted_total = carried.granted_total
        self._reclaimed_total = carried.reclaimed_total
        self._recovering_until: datetime | None = carried.recovering_until
        # Until the first task has checked for an earlier run, nothing may be granted.
        self._checked_earlier_runs = state.carried is not None
        # Grants are sent concurrently: awaiting each signal in turn would cost one workflow
        # task round trip per grant and serialise every handoff behind the previous one.
        self._grants_in_flight: set[asyncio.Task[None]] = set()
        # Waiters already told their slot is near.
        self._told_soon: set[str] = set(carried.told_soon)
        self._reap: asyncio.Task[list[str]] | None = None
        self._reap_due = False
        self._reap_clock_running = False
        # Timer tasks are kept referenced until they fire; none is ever cancelled.
        self._clocks: set[asyncio.Task[None]] = set()
        # Set by every signal so the loop refreshes the UI details and gauges after it.
        self._dirty = False
        self._instruments: metrics.SemaphoreMetrics | None = None

    @workflow.signal
    def acquire(self, request: AcquireRequest) -> None:
        self._enqueue(request)

    @workflow.signal
    def acquire_batch(self, requests: list[AcquireRequest]) -> None:
        """Acquires of many holders in one signal (see `SlotActivities`), in their order."""
        for request in requests:
            self._enqueue(request)

    @workflow.update(name="acquire_many")
    def acquire_many(self, requests: list[AcquireRequest]) -> None:
        """`acquire_batch` as an Update, which is how workers send it. A signal that arrives while
        the run's continue-as-new is in flight voids that task (UNHANDLED_COMMAND) and costs a
        full replay; an Update the run has not accepted yet is handed to the next run instead."""
        self.acquire_batch(requests)

    def _enqueue(self, request: AcquireRequest) -> None:
        self._dirty = True
        rid = request.request_id
        if rid in self._holders or rid in self._released:
            return
        # A full queue drops the request; the waiter's recheck finds that out and asks again.
        self._waiters.push(request)

    @workflow.signal
    def reassert(self, holder: Holder) -> None:
        """A holder whose slot this run does not know: the state was lost, so take it back
        (even past the cap: the slot is in use) and hold grants until others re-assert too."""
        self._dirty = True
        rid = holder.request.request_id
        if rid in self._holders or rid in self._released:
            return
        self._waiters.remove(rid)
        self._told_soon.discard(rid)
        self._holders[rid] = holder
        self._start_recovery()

    @workflow.signal
    def release(self, request: ReleaseRequest) -> None:
        self._dirty = True
        self._forget(request.request_id)

    @workflow.signal
    def release_batch(self, requests: list[ReleaseRequest]) -> None:
        self._dirty = True
        for request in requests:
            self._forget(request.request_id)

    @workflow.update(name="release_many")
    def release_many(self, requests: list[ReleaseRequest]) -> None:
        """`release_batch` as an Update, for the reason `acquire_many` gives."""
        self.release_batch(requests)

    @workflow.signal
    def set_capacity(self, capacity: int) -> None:
        # Lowering the cap never revokes a held slot; it only holds back new grants.
        self._dirty = True
        self._capacity = max(0, capacity)

    @workflow.query
    def status(self) -> SemaphoreStatus:
        now = workflow.now()
        return SemaphoreStatus(
            pool=self._pool,
            capacity=self._capacity,
            holders=[
                HolderView(
                    request_id=rid,
                    workflow_id=holder.request.holder_workflow_id,
                    held_for_s=(now - holder.granted_at).total_seconds(),
                )
                for rid, holder in self._holders.items()
            ],
            waiters=self._waiters.head(STATUS_WAITERS_SHOWN),
            waiting=len(self._waiters),
            granted_total=self._granted_total,
            reclaimed_total=self._reclaimed_total,
            recovering=self._recovering(),
        )

    @workflow.query
    def queue_position(self, holder_workflow_id: str) -> int | None:
        """Where that workflow waits (1 = next), or None if it does not wait."""
        return self._waiters.position_of(holder_workflow_id)

    @workflow.query
    def lookup(self, request_id: str) -> SlotLookup:
        if request_id in self._holders:
            return SlotLookup.HOLDING
        if request_id in self._waiters:
            return SlotLookup.WAITING
        if request_id in self._released:
            return SlotLookup.RELEASED
        return SlotLookup.UNKNOWN

    def _forget(self, request_id: str) -> None:
        self._holders.pop(request_id, None)
        self._waiters.remove(request_id)
        self._told_soon.discard(request_id)
        # Remembered even when unknown: a release can overtake its own acquire (the holder
        # was cancelled while its acquire was still in flight).
        self._released.add(request_id)

    def _start_recovery(self) -> None:
        until = workflow.now() + timedelta(seconds=recovery_grace_s(self._reap_interval_s))
        if self._recovering_until is None or until > self._recovering_until:
            self._recovering_until = until
            self._start_clock(self._recovery_clock(until))
            workflow.logger.warning("semaphore %s recovering its holders until %s", self._pool, until)

    def _recovering(self) -> bool:
        if not self._checked_earlier_runs:
            return True
        # Pure: the status query calls it too, and a query must not change the state.
        return self._recovering_until is not None and workflow.now() < self._recovering_until

    def _can_grant(self) -> bool:
        return bool(self._waiters) and len(self._holders) < self._capacity and not self._recovering()

    def _grant_all_possible(self) -> None:
        granted_at = workflow.now()
        while self._can_grant():
            request = self._waiters.pop_first()
            # Recorded as a holder before the grant leaves, so the cap counts it from now on.
            self._holders[request.request_id] = Holder(request=request, granted_at=granted_at)
            self._granted_total += 1
            self._metrics().wait_seconds.record((granted_at - request.requested_at).total_seconds())
            self._told_soon.discard(request.request_id)
            self._in_flight(self._send_grant(request))
        if self._waiters and not self._recovering():
            self._tell_the_next_waiters()

    def _tell_the_next_waiters(self) -> None:
        for request in self._waiters.first(min(self._capacity, SOON_AHEAD_MAX)):
            if request.request_id not in self._told_soon:
                self._told_soon.add(request.request_id)
                self._in_flight(self._send_soon(request))

    def _in_flight(self, signal: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(signal)
        self._grants_in_flight.add(task)
        task.add_done_callback(self._grants_in_flight.discard)

    async def _send_soon(self, request: AcquireRequest) -> None:
        await self._signal_waiter(request, SLOT_SOON_SIGNAL, SlotSoon(request_id=request.request_id))

    async def _send_grant(self, request: AcquireRequest) -> None:
        # A signal command, not a local activity: a command takes effect only once the server
        # accepts the workflow task, so a task it refuses (a signal arrived meanwhile) cannot
        # have granted a slot that its replay then hands to someone else.
        if not await self._signal_waiter(
            request, SLOT_GRANTED_SIGNAL, SlotGrant(request_id=request.request_id)
        ):
            # The waiter closed while queued: nothing can be running under this slot.
            self._forget(request.request_id)

    async def _signal_waiter(
        self, request: AcquireRequest, signal: str, payload: SlotGrant | SlotSoon
    ) -> bool:
        """False when the waiter's workflow run is closed."""
        handle = workflow.get_external_workflow_handle(
            request.holder_workflow_id, run_id=request.holder_run_id
        )
        try:
            await handle.signal(signal, payload)
        except ApplicationError as error:
            if error.type != "ExternalWorkflowExecutionNotFound":
                raise
            return False
        return True

    def _start_reap(self) -> None:
        holders = list(self._holders.values())
        self._reap = workflow.start_activity_method(
            SlotActivities.reclaim_dead_holders,
            DeadHolderCheck(pool=self._pool, holders=holders),
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
            if request_id in self._holders:
                self._reclaimed_total += 1
                self._metrics().reclaimed.add(1)
                self._forget(request_id)

    async def _check_earlier_runs(self) -> None:
        info = workflow.info()
        earlier = await workflow.execute_local_activity_method(
            SlotActivities.had_earlier_run,
            EarlierRunCheck(workflow_id=info.workflow_id, run_id=info.run_id),
            start_to_close_timeout=timedelta(seconds=30),
            summary="did an earlier run hand out slots?",
        )
        self._checked_earlier_runs = True
        if earlier:
            self._start_recovery()

    def _metrics(self) -> metrics.SemaphoreMetrics:
        if self._instruments is None:
            self._instruments = metrics.SemaphoreMetrics(workflow.metric_meter(), self._pool)
        return self._instruments

    def _publish(self) -> None:
        instruments = self._metrics()
        instruments.held.set(len(self._holders))
        instruments.waiters.set(len(self._waiters))
        instruments.capacity.set(self._capacity)
        recovering = " (recovering: waiting for holders to re-assert)" if self._recovering() else ""
        workflow.set_current_details(
            f"**{len(self._holders)}/{self._capacity}** slots held, {len(self._waiters)} waiting{recovering}"
        )

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self._continue_after_events()
            or info.get_current_history_size() >= CONTINUE_AFTER_BYTES
        )

    def _continue_after_events(self) -> int:
        if len(self._waiters) >= LONG_QUEUE:
            return CONTINUE_AFTER_EVENTS_WITH_A_LONG_QUEUE
        return CONTINUE_AFTER_EVENTS

    def _has_work(self) -> bool:
        reaped = self._reap is not None and self._reap.done()
        return self._dirty or self._reap_due or self._can_grant() or reaped or self._should_continue_as_new()

    async def _continue_as_new(self) -> None:
        # Everything in flight must land in the state before it is carried over; grants are
        # held back meanwhile, and signals that arrive are handled in O(1) and carried.
        await workflow.wait_condition(lambda: not self._grants_in_flight and workflow.all_handlers_finished())
        if self._reap is not None:
            await self._finish_reap()
        workflow.continue_as_new(
            SemaphoreInput(
                pool=self._pool,
                capacity=self._capacity,
                reap_interval_s=self._reap_interval_s,
                carried=CarriedSemaphore(
                    holders=list(self._holders.values()),
                    packed_queue=pack(self._waiters, self._released),
                    granted_total=self._granted_total,
                    reclaimed_total=self._reclaimed_total,
                    recovering_until=self._recovering_until if self._recovering() else None,
                    told_soon=sorted(self._told_soon),
                ),
            )
        )

    def _start_clock(self, clock: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(clock)
        self._clocks.add(task)
        task.add_done_callback(self._clocks.discard)

    async def _reap_clock(self) -> None:
        await workflow.sleep(self._reap_interval_s, summary="next holder check")
        self._reap_due = True
        self._reap_clock_running = False

    async def _recovery_clock(self, until: datetime) -> None:
        await workflow.sleep(max(timedelta(milliseconds=10), until - workflow.now()), summary="recovery ends")
        self._dirty = True

    @workflow.run
    async def run(self, state: SemaphoreInput) -> None:
        if not self._checked_earlier_runs:
            await self._check_earlier_runs()
        if state.carried is not None and self._recovering():
            assert self._recovering_until is not None
            self._start_clock(self._recovery_clock(self._recovering_until))
        while True:
            self._grant_all_possible()
            if self._reap is not None and self._reap.done():
                await self._finish_reap()
                continue
            self._dirty = False
            self._publish()
            if self._should_continue_as_new():
                await self._continue_as_new()
            if self._reap_due and self._holders and self._reap is None:
                self._start_reap()
            self._reap_due = False
            # The reap clock runs on its own timer, never cancelled: a wait with a timeout would
            # start and cancel a timer in every task, two events each time.
            if self._holders and self._reap is None and not self._reap_clock_running:
                self._reap_clock_running = True
                self._start_clock(self._reap_clock())
            await workflow.wait_condition(self._has_work)
