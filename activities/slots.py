"""Activities behind the slot semaphore: reaching it from a job, and checking holders are alive."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.client import (
    Client,
    RPCTimeoutOrCancelledError,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.common import QueryRejectCondition, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.host_sweep import HostSweepStatus, gone_from_every_host, host_reports
from mayfly.backends import BackendError, ContainerBackend, ContainerState
from mayfly.group_commit import GroupCommit
from mayfly.models import (
    AcquireRequest,
    DeadHolderCheck,
    EarlierRunCheck,
    Holder,
    RecheckOutcome,
    ReleaseRequest,
    SemaphoreInput,
    SemaphoreTerms,
    SlotLookup,
    SlotRecheck,
    SlotRelease,
    SlotRequest,
    semaphore_task_queue,
    semaphore_workflow_id,
)

LOOKUP_TIMEOUT = timedelta(seconds=5)
# At most this many acquires or releases a call (a few hundred bytes each).
BATCH = 500
# A flooded semaphore gets at most ten acquire batches a second from each worker.
ACQUIRE_BATCH_GAP_S = 0.1


_log = logging.getLogger(__name__)

# How long a batch waits for the semaphore to take it as an Update before it goes as a signal.
# An Update needs the semaphore's worker to accept it; a signal is durable at once, so a pool
# whose semaphore worker is down or stalled still queues acquires and counts releases, as it
# did when these were signals. Well inside the activities' 10 s start-to-close timeout.
UPDATE_WAIT_S = 4.0


async def send_acquires(
    client: Client,
    pool: str,
    terms: SemaphoreTerms,
    semaphore_queue: str,
    requests: list[AcquireRequest],
    *,
    update_wait_s: float = UPDATE_WAIT_S,
) -> None:
    """Queue `requests` at the pool's semaphore, bringing it to life if it is not running.

    An Update, where a signal would do: the semaphore continues as new every few hundred events,
    and a signal that lands while that task is in flight voids it (UNHANDLED_COMMAND), which costs
    a full replay of the run. An Update the closing run has not accepted is retried by the
    server onto the next run. If the semaphore does not take it within `update_wait_s`, the
    batch goes as a signal (the semaphore ignores a request it already has).
    """
    update = client.execute_update_with_start_workflow(
        "acquire_many",
        requests,
        start_workflow_operation=WithStartWorkflowOperation(
            "SlotSemaphore", **_semaphore_start(pool, terms, semaphore_queue)
        ),
    )
    if not await _taken_in_time(update, update_wait_s, f"{len(requests)} acquires for {pool}"):
        await signal_with_start(client, pool, terms, semaphore_queue, "acquire_batch", requests)


async def send_releases(
    client: Client, pool: str, releases: list[ReleaseRequest], *, update_wait_s: float = UPDATE_WAIT_S
) -> None:
    """Give slots back, as `send_acquires` queues them; a semaphore that is gone needs nothing."""
    handle = client.get_workflow_handle(semaphore_workflow_id(pool))
    try:
        update = handle.execute_update("release_many", releases)
        if not await _taken_in_time(update, update_wait_s, f"{len(releases)} releases for {pool}"):
            await handle.signal("release_batch", releases)
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise


async def _taken_in_time(update: Awaitable[object], wait_s: float, what: str) -> bool:
    """False when the semaphore did not take the Update within `wait_s`."""
    deadline = asyncio.timeout(wait_s)
    try:
        async with deadline:
            await update
    except (TimeoutError, RPCTimeoutOrCancelledError):
        # The SDK reports its call cancelled as this error too: only our own deadline means
        # "send it as a signal"; a cancel of the caller (a worker stopping) must go on up.
        if not deadline.expired():
            raise
        _log.warning("the semaphore did not take %s within %.0f s; sending it as a signal", what, wait_s)
        return False
    return True


async def signal_with_start(
    client: Client, pool: str, terms: SemaphoreTerms, semaphore_queue: str, signal: str, payload: object
) -> None:
    await client.start_workflow(
        "SlotSemaphore",
        start_signal=signal,
        start_signal_args=[payload],
        **_semaphore_start(pool, terms, semaphore_queue),
    )


def _semaphore_start(pool: str, terms: SemaphoreTerms, semaphore_queue: str) -> dict[str, Any]:
    """How a pool's semaphore is started by whichever call reaches it first."""
    return {
        "arg": SemaphoreInput(pool=pool, capacity=terms.capacity, reap_interval_s=terms.reap_interval_s),
        "id": semaphore_workflow_id(pool),
        "task_queue": semaphore_queue,
        "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
        "static_summary": f"Slot semaphore for pool {pool}",
    }


class SlotActivities:
    def __init__(
        self,
        backends: Mapping[str, ContainerBackend],
        terms: Mapping[str, SemaphoreTerms],
        task_queue: str | None = None,
    ) -> None:
        """`task_queue`: the workers' main queue, where job workflows and host sweepers run; the
        semaphores run on its slots queue. None: a semaphore runs on the queue of the holder that
        brought it to life, as do the host sweepers."""
        self._backends = backends
        self._task_queue = task_queue
        # Read at every call, so a caller may add pools after construction (tests do).
        self._terms = terms
        # Thousands of jobs queued within a minute would otherwise send a semaphore a call
        # each: a flooded run spends its tasks on events, and the server caps signals per run
        # and Updates in flight per workflow (10). Batched, an idle pool pays nothing and a
        # flooded one gets a few calls a second from each worker. Releases are not held back:
        # each one may free a slot for a waiter.
        self._acquires: GroupCommit[tuple[str, str], AcquireRequest] = GroupCommit(
            self._send_acquires, max_batch=BATCH, min_gap_s=ACQUIRE_BATCH_GAP_S
        )
        self._releases: GroupCommit[str, ReleaseRequest] = GroupCommit(self._send_releases, max_batch=BATCH)
        self._client: Client | None = None

    def for_leases(self) -> list[Callable[..., Awaitable[object]]]:
        """The activities a worker running slot holders must register."""
        return [self.request, self.release, self.recheck]

    def for_semaphores(self) -> list[Callable[..., Awaitable[object]]]:
        """The activities a worker running semaphores must register."""
        return [self.had_earlier_run, self.reclaim_dead_holders]

    def all(self) -> list[Callable[..., Awaitable[object]]]:
        """Both, for a worker that runs semaphores on its holders' queue."""
        return [*self.for_leases(), *self.for_semaphores()]

    @activity.defn(name="slots.request")
    async def request(self, request: SlotRequest) -> SemaphoreTerms:
        """Signal-with-start, so the first job of a pool brings its semaphore to life.

        Answers with the pool's terms, which the holder needs to time its rechecks."""
        terms = self._terms_of(request.pool)
        self._client = activity.client()
        await self._acquires.submit((request.pool, request.task_queue), request.acquire)
        return terms

    async def _send_acquires(self, where: tuple[str, str], requests: list[AcquireRequest]) -> None:
        pool, task_queue = where
        client = self._client or activity.client()
        await send_acquires(client, pool, self._terms_of(pool), self._semaphore_queue(task_queue), requests)

    def _terms_of(self, pool: str) -> SemaphoreTerms:
        terms = self._terms.get(pool)
        if terms is None:
            raise ApplicationError(
                f"pool {pool!r} is not in this worker's configuration (pools: {sorted(self._terms)})",
                type="UnknownPool",
                non_retryable=True,
            )
        return terms

    async def _signal_with_start(self, request: SlotRequest, signal: str, payload: object) -> None:
        await self._start_with(request.pool, request.task_queue, signal, payload)

    async def _start_with(self, pool: str, task_queue: str, signal: str, payload: object) -> None:
        # The worker's client, kept from an activity: batches are sent outside any one activity.
        client = self._client or activity.client()
        await signal_with_start(
            client, pool, self._terms_of(pool), self._semaphore_queue(task_queue), signal, payload
        )

    def _semaphore_queue(self, holder_task_queue: str) -> str:
        return semaphore_task_queue(self._task_queue) if self._task_queue else holder_task_queue

    @activity.defn(name="slots.release")
    async def release(self, request: SlotRelease) -> None:
        """Give a slot back; a semaphore that is gone has nothing to give back to."""
        self._client = activity.client()
        await self._releases.submit(request.pool, request.release)

    async def _send_releases(self, pool: str, releases: list[ReleaseRequest]) -> None:
        assert self._client is not None
        await send_releases(self._client, pool, releases)

    @activity.defn(name="slots.recheck")
    async def recheck(self, check: SlotRecheck) -> RecheckOutcome:
        """Make sure the semaphore's current run knows this holder or waiter; tell it again if not.

        Idempotent on the semaphore's side (by request id), so a recheck that races a grant,
        a release or a continue-as-new does no harm. A semaphore that cannot answer now is
        asked again at the next recheck rather than told anything.
        """
        slot = check.slot
        handle = activity.client().get_workflow_handle(semaphore_workflow_id(slot.pool))
        try:
            found = await handle.query(
                "lookup",
                slot.acquire.request_id,
                result_type=SlotLookup,
                reject_condition=QueryRejectCondition.NOT_OPEN,
                rpc_timeout=LOOKUP_TIMEOUT,
            )
        except WorkflowQueryRejectedError:
            found = SlotLookup.UNKNOWN  # terminated or failed: the next signal-with-start revives it
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                activity.logger.warning("semaphore of %s did not answer: %s", slot.pool, error)
                return RecheckOutcome.UNANSWERED
            found = SlotLookup.UNKNOWN
        except (WorkflowQueryFailedError, RPCTimeoutOrCancelledError) as error:
            activity.logger.warning("semaphore of %s did not answer: %s", slot.pool, error)
            return RecheckOutcome.UNANSWERED
        if found is not SlotLookup.UNKNOWN:
            return RecheckOutcome.KNOWN
        if check.granted_at is None:
            await self._signal_with_start(slot, "acquire", slot.acquire)
        else:
            activity.logger.warning("re-asserting slot %s in pool %s", slot.acquire.request_id, slot.pool)
            await self._signal_with_start(
                slot, "reassert", Holder(request=slot.acquire, granted_at=check.granted_at)
            )
        return RecheckOutcome.RESENT

    @activity.defn(name="slots.had_earlier_run")
    async def had_earlier_run(self, check: EarlierRunCheck) -> bool:
        """Whether any other run of the semaphore exists: if so, holders it granted may be alive."""
        escaped = check.workflow_id.replace("\\", "\\\\").replace("'", "\\'")
        async for execution in activity.client().list_workflows(f"WorkflowId = '{escaped}'"):
            if execution.run_id != check.run_id:
                return True
        return False

    async def _is_alive(self, holder: Holder) -> bool:
        handle = activity.client().get_workflow_handle(holder.request.holder_workflow_id)
        try:
            description = await handle.describe()
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        # The latest run must be the very run that asked: a reset (or a reused workflow id)
        # starts a new run that never held this slot. Holders must not continue-as-new while
        # holding, and ours never do.
        if description.run_id != holder.request.holder_run_id:
            return False
        return description.status == WorkflowExecutionStatus.RUNNING

    async def _remove_containers_of(self, pool: str, workflow_id: str) -> None:
        backend = self._backends.get(pool)
        if backend is None:
            return
        for record in await backend.list():
            if record.owner_workflow_id == workflow_id and record.state is ContainerState.RUNNING:
                activity.logger.warning("terminating %s left by closed workflow %s", record.name, workflow_id)
                await backend.terminate(record.name)

    @activity.defn(name="slots.reclaim_dead_holders")
    async def reclaim_dead_holders(self, check: DeadHolderCheck) -> list[str]:
        """Request ids of holders whose workflow has closed, once their containers are gone.

        A terminated or timed-out workflow never ran its own teardown, so its container may
        still be alive; the slot is only free once that container is confirmed gone.
        """
        dead: list[str] = []
        backend = self._backends.get(check.pool)
        # Local processes live on several hosts; this one sees only its own (see host_sweep).
        hosts: list[HostSweepStatus] | None = None
        for holder in check.holders:
            activity.heartbeat(holder.request.request_id)
            if await self._is_alive(holder):
                continue
            try:
                await self._remove_containers_of(check.pool, holder.request.holder_workflow_id)
            except BackendError as error:
                activity.logger.warning("cannot yet reclaim %s: %s", holder.request.request_id, error)
                continue
            if backend is not None and backend.host_bound:
                if hosts is None:
                    hosts = await host_reports(
                        activity.client(), self._task_queue or activity.info().task_queue
                    )
                request = holder.request
                if not await gone_from_every_host(
                    activity.client(), hosts, request.holder_workflow_id, request.holder_run_id
                ):
                    continue
            dead.append(holder.request.request_id)
        return dead
