"""HostSweeper: one per worker host; sweeps that host's local containers on its host queue.

Its workflow tasks run on the shared queue, so its last report can be queried (by slot
reclaim) even while its host is down; a stale report then holds reclaim up, which is the
safe answer while that host's processes may still be running.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.host_sweep import (
        HOST_SWEEPER_WORKFLOW,
        REPORT_QUERY,
        HostSweepActivities,
        HostSweepRequest,
        HostSweepStatus,
    )
    from mayfly.models import HostSweepReport

SWEEP_TIMEOUT = timedelta(minutes=5)
SWEEP_HEARTBEAT = timedelta(seconds=60)
SWEEP_RETRY = RetryPolicy(maximum_attempts=3, maximum_interval=timedelta(seconds=30))


class HostSweeperInput(BaseModel):
    host_id: str
    host_task_queue: str
    pools: list[str]
    interval_s: float = 60.0
    sweeps_per_run: int = 200
    last: HostSweepReport | None = None


@workflow.defn(name=HOST_SWEEPER_WORKFLOW)
class HostSweeperWorkflow:
    def __init__(self) -> None:
        self._host_id = ""
        self._last: HostSweepReport | None = None

    @workflow.query(name=REPORT_QUERY)
    def report(self) -> HostSweepStatus:
        return HostSweepStatus(host_id=self._host_id, last=self._last)

    @workflow.run
    async def run(self, params: HostSweeperInput) -> None:
        self._host_id = params.host_id
        self._last = params.last
        for _ in range(params.sweeps_per_run):
            try:
                self._last = await workflow.execute_activity_method(
                    HostSweepActivities.host_containers,
                    HostSweepRequest(host_id=params.host_id, pools=params.pools, scheduled_at=workflow.now()),
                    task_queue=params.host_task_queue,
                    start_to_close_timeout=SWEEP_TIMEOUT,
                    heartbeat_timeout=SWEEP_HEARTBEAT,
                    retry_policy=SWEEP_RETRY,
                    summary=f"sweep containers of host {params.host_id}",
                )
                removed = self._last.removed
                workflow.set_current_details(
                    f"last sweep checked {self._last.checked} containers and removed {len(removed)} "
                    f"({', '.join(removed[:5]) or 'none'}); "
                    f"{len(self._last.unremoved_owners)} closed owners still hold one"
                )
            except ActivityError as error:
                # The host may be down; its last report stays, and keeps reclaim waiting.
                workflow.logger.warning("host sweep of %s failed: %s", params.host_id, error)
            await workflow.sleep(timedelta(seconds=params.interval_s), summary="until the next sweep")
        params.last = self._last
        workflow.continue_as_new(params)
