"""Activities behind the slot semaphore: reaching it from a job, and checking holders are alive."""

from __future__ import annotations

from collections.abc import Mapping

from temporalio import activity
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from activities.host_sweep import HostSweepStatus, gone_from_every_host, host_reports
from mayfly.backends import BackendError, ContainerBackend, ContainerState
from mayfly.models import DeadHolderCheck, Holder, SemaphoreInput, SlotRequest, semaphore_workflow_id


class SlotActivities:
    def __init__(self, backends: Mapping[str, ContainerBackend]) -> None:
        self._backends = backends

    @activity.defn(name="slots.request")
    async def request(self, request: SlotRequest) -> None:
        """Signal-with-start, so the first job of a pool brings its semaphore to life."""
        await activity.client().start_workflow(
            "SlotSemaphore",
            SemaphoreInput(
                pool=request.pool, capacity=request.capacity, reap_interval_s=request.reap_interval_s
            ),
            id=semaphore_workflow_id(request.pool),
            task_queue=request.task_queue,
            start_signal="acquire",
            start_signal_args=[request.acquire],
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"Slot semaphore for pool {request.pool}",
        )

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
                    hosts = await host_reports(activity.client(), activity.info().task_queue)
                request = holder.request
                if not await gone_from_every_host(
                    activity.client(), hosts, request.holder_workflow_id, request.holder_run_id
                ):
                    continue
            dead.append(holder.request.request_id)
        return dead
