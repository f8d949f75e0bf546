"""The holder's side of a pool's slot semaphore, for use inside any workflow.

    async with SlotLease(pool) as lease:
        if await lease.acquire():
            ...  # the slot is held until the block ends, on every path

The lease registers the workflow's `slot_granted` signal handler while the block runs and
gives the slot back when it ends: on success, failure and cancellation alike (a cancel waits
for the release). The pool's cap and tuning come from the worker's configuration (the
`slots.request` activity answers with them), never from the holder.

The semaphore can lose its state (an operator terminates or resets it). So a lease never
trusts it blindly: while waiting it rechecks now and then that it is still queued (rarely:
thousands may wait), and once granted a background task rechecks every `holder_recheck_s`
that the semaphore still counts the slot, re-asserting it if not. A fresh semaphore run
grants nothing until holders have had time to do so (`recovery_grace_s`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from types import TracebackType

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.slots import SlotActivities
    from mayfly.models import (
        SLOT_GRANTED_SIGNAL,
        SLOT_SOON_SIGNAL,
        AcquireRequest,
        ReleaseRequest,
        SemaphoreTerms,
        SlotGrant,
        SlotRecheck,
        SlotRelease,
        SlotRequest,
        SlotSoon,
        holder_recheck_s,
        waiter_recheck_s,
    )
    from workflows.shield import uncancellable

SLOT_CALL_TIMEOUT = timedelta(seconds=10)
SLOT_REQUEST_GIVE_UP = timedelta(minutes=30)


class _GrantRouter:
    """The workflow's one `slot_granted` handler, handing each grant to the lease that asked.

    A workflow may hold several leases at once (a runner finishing another job keeps its slot
    while the workflow takes a new one), and a signal has one handler per workflow."""

    def __init__(self) -> None:
        self.leases: dict[str, SlotLease] = {}

    @staticmethod
    def of_this_workflow() -> _GrantRouter:
        handler = workflow.get_signal_handler(SLOT_GRANTED_SIGNAL)
        router = getattr(handler, "__self__", None)
        if isinstance(router, _GrantRouter):
            return router
        router = _GrantRouter()
        workflow.set_signal_handler(SLOT_GRANTED_SIGNAL, router.deliver)
        workflow.set_signal_handler(SLOT_SOON_SIGNAL, router.deliver_soon)
        return router

    def deliver(self, grant: SlotGrant) -> None:
        if lease := self.leases.get(grant.request_id):
            lease._on_grant()

    def deliver_soon(self, soon: SlotSoon) -> None:
        if lease := self.leases.get(soon.request_id):
            lease.soon = True


class SlotLease:
    """One request for one slot of `pool`; `key` tells apart the slots a workflow takes in turn,
    `front` asks to be served before the pool's ordinary waiters, and `job_id` names the GitHub
    job the slot is for, which orders the waiters (see `AcquireRequest.job_id`)."""

    def __init__(self, pool: str, *, key: str = "", front: bool = False, job_id: int | None = None) -> None:
        info = workflow.info()
        # Unique per run (a continued-as-new or reset holder asks for a new slot), and per key:
        # the semaphore never grants a released request id again.
        self.request_id = f"{info.workflow_id}/{info.run_id}" + (f"/{key}" if key else "")
        self.pool = pool
        self._front = front
        self._job_id = job_id
        self.granted = False
        self.granted_at: datetime | None = None
        # The semaphore said the grant is near: prepare what needs no slot now.
        self.soon = False
        self._request: SlotRequest | None = None
        self._terms: SemaphoreTerms | None = None
        self._watch: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SlotLease:
        _GrantRouter.of_this_workflow().leases[self.request_id] = self
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is GeneratorExit:
            return  # evicted, not ended: the workflow's next replay holds the slot still
        await uncancellable(self._release())
        # Not in a `finally`: a workflow evicted from the worker's cache unwinds through here
        # outside its event loop. A grant for this request arriving later finds no lease.
        _GrantRouter.of_this_workflow().leases.pop(self.request_id, None)

    def held_s(self) -> float:
        return (workflow.now() - self.granted_at).total_seconds() if self.granted_at else 0.0

    async def acquire(
        self, give_up: Callable[[], bool] = lambda: False, wait_at_most: timedelta | None = None
    ) -> bool:
        """Wait for the slot; False if `give_up()` became true or `wait_at_most` passed first.

        Asking again after that is harmless: the request id makes it idempotent."""
        info = workflow.info()
        self._request = SlotRequest(
            pool=self.pool,
            task_queue=info.task_queue,
            acquire=AcquireRequest(
                request_id=self.request_id,
                holder_workflow_id=info.workflow_id,
                holder_run_id=info.run_id,
                requested_at=workflow.now(),
                front=self._front,
                job_id=self._job_id,
            ),
        )
        # An activity, not a local one: a local activity runs inside the workflow task, and a
        # task that then times out is replayed without its result. When new events change the
        # replay's mind (the job was served meanwhile), nobody knows of the acquire it sent,
        # and the slot it gets is held until the workflow closes (seen at 150 runners under
        # load: six slots lost that way starved six jobs). An activity runs only once the
        # decision to ask is in the history.
        self._terms = await workflow.execute_activity_method(
            SlotActivities.request,
            self._request,
            start_to_close_timeout=SLOT_CALL_TIMEOUT,
            # Bounded: a job must not wait past its deadline in retries against an unreachable
            # semaphore. The workflow fails instead, and the reconciler restarts the job.
            schedule_to_close_timeout=SLOT_REQUEST_GIVE_UP,
            summary=f"ask for a slot in pool {self.pool}",
        )
        until = workflow.now() + wait_at_most if wait_at_most is not None else None
        while not (self.granted or give_up()):
            timeout = self._jittered(waiter_recheck_s(self._terms.reap_interval_s))
            if until is not None:
                if until <= workflow.now():
                    break
                timeout = min(timeout, until - workflow.now())
            try:
                await workflow.wait_condition(
                    lambda: self.granted or give_up(), timeout=timeout, timeout_summary="wait for a slot"
                )
            except TimeoutError:
                if until is None or workflow.now() < until:
                    await self._recheck()
        if self.granted and self._watch is None:
            self._watch = asyncio.create_task(self._watch_slot(self._terms))
        return self.granted

    def _on_grant(self) -> None:
        if not self.granted:
            self.granted = True
            self.granted_at = workflow.now()

    async def _release(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._request is None:
            return  # never asked: the semaphore has nothing of ours
        # A local activity, not a signal command: the command's completion event would cost
        # this workflow one more task before it can finish.
        await workflow.execute_local_activity_method(
            SlotActivities.release,
            SlotRelease(pool=self.pool, release=ReleaseRequest(request_id=self.request_id)),
            start_to_close_timeout=SLOT_CALL_TIMEOUT,
        )
        self.granted = False

    async def _watch_slot(self, terms: SemaphoreTerms) -> None:
        """Runs while the slot is held, until the release cancels it."""
        try:
            while True:
                await workflow.sleep(
                    self._jittered(holder_recheck_s(terms.reap_interval_s)), summary="recheck slot"
                )
                await self._recheck()
        except ActivityError as error:
            # The release cancelled a recheck in flight: the watch is over. Nobody awaits this
            # task, so raising would only log a traceback ("exception was never retrieved").
            if not is_cancelled_exception(error):
                raise

    async def _recheck(self) -> None:
        assert self._request is not None
        try:
            # An activity, not a local one. A local activity that outlasts its workflow task
            # (a query to a busy semaphore under a flood of jobs) spans several task
            # heartbeats, and the waiter's next step depends on the time it then reads. Its
            # replay reached another step: 570 of 2,000 jobs failed with nondeterminism errors
            # ("No command scheduled for event ... ActivityTaskScheduled").
            await workflow.execute_activity_method(
                SlotActivities.recheck,
                SlotRecheck(slot=self._request, granted_at=self.granted_at),
                start_to_close_timeout=SLOT_CALL_TIMEOUT,
                # Bounded: a waiter must not sit in retries while its grant arrives.
                retry_policy=RetryPolicy(maximum_attempts=3),
                summary="recheck the semaphore knows this slot",
            )
        except ActivityError as error:
            if is_cancelled_exception(error):
                # The release (or the workflow's cancel) stopped it: swallowing that would let
                # the watcher go on rechecking, and re-asserting, a slot given back.
                raise
            # The next recheck tries again; a lease must not fail its workflow over this.
            workflow.logger.warning("slot recheck failed: %s", error)

    def _jittered(self, seconds: float) -> timedelta:
        # Spread the rechecks of a burst of leases over time rather than in one wave; never
        # later than `seconds`, which the semaphore's recovery grace relies on.
        return timedelta(seconds=seconds * (0.8 + 0.2 * workflow.random().random()))
