"""Sweeper: every interval, remove containers and registrations that outlived their workflow."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.sweep import SweepActivities, SweepReport


def sweeper_workflow_id(task_queue: str) -> str:
    return f"{task_queue}-sweeper"


SWEEP_TIMEOUT = timedelta(minutes=5)
SWEEP_HEARTBEAT = timedelta(seconds=60)
SWEEP_RETRY = RetryPolicy(maximum_attempts=3, maximum_interval=timedelta(seconds=30))


class SweeperInput(BaseModel):
    pools: list[str]
    interval_s: float = 60.0
    github_task_queue: str = ""
    # Sweeps per run before continue-as-new keeps the history small.
    sweeps_per_run: int = 200
    total_removed: int = 0


@workflow.defn(name="Sweeper")
class SweeperWorkflow:
    def __init__(self) -> None:
        self._total_removed = 0
        self._sweeps = 0

    @workflow.query
    def total_removed(self) -> int:
        return self._total_removed

    @workflow.query
    def sweeps(self) -> int:
        return self._sweeps

    async def _sweep(self, params: SweeperInput) -> list[SweepReport]:
        reports: list[SweepReport] = []
        for pool in params.pools:
            reports.append(
                await workflow.execute_activity_method(
                    SweepActivities.containers,
                    pool,
                    start_to_close_timeout=SWEEP_TIMEOUT,
                    heartbeat_timeout=SWEEP_HEARTBEAT,
                    retry_policy=SWEEP_RETRY,
                    summary=f"sweep containers of {pool}",
                )
            )
        github_queue = params.github_task_queue or None
        # Recover missed jobs first, so a registration minted for one is not mistaken for an orphan.
        for sweep, summary in (
            (SweepActivities.queued_jobs, "start workflows for queued jobs whose webhook was missed"),
            (SweepActivities.registrations, "sweep runner registrations"),
        ):
            reports.append(
                await workflow.execute_activity_method(
                    sweep,
                    summary=summary,
                    task_queue=github_queue,
                    start_to_close_timeout=SWEEP_TIMEOUT,
                    heartbeat_timeout=SWEEP_HEARTBEAT,
                    retry_policy=SWEEP_RETRY,
                )
            )
        return reports

    @workflow.run
    async def run(self, params: SweeperInput) -> None:
        self._total_removed = params.total_removed
        for _ in range(params.sweeps_per_run):
            try:
                reports = await self._sweep(params)
            except ActivityError as error:
                # A failed sweep is retried at the next interval; the sweeper itself must not die.
                workflow.logger.warning("sweep failed: %s", error)
                reports = []
            removed = [name for report in reports for name in report.removed]
            busy = [name for report in reports for name in report.busy]
            recovered = [name for report in reports for name in report.recovered]
            self._total_removed += len(removed)
            self._sweeps += 1
            workflow.set_current_details(
                f"last sweep removed {len(removed)} orphans ({', '.join(removed[:5]) or 'none'}); "
                f"{len(busy)} busy, retried next time; {self._total_removed} removed in total; "
                f"{len(recovered)} queued jobs without a workflow recovered"
            )
            await workflow.sleep(timedelta(seconds=params.interval_s), summary="until the next sweep")
        params.total_removed = self._total_removed
        workflow.continue_as_new(params)
