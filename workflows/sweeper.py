"""Sweeper: every interval, remove containers and registrations that outlived their workflow,
and give every job GitHub still has queued a running workflow."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import timedelta

from pydantic import BaseModel, Field
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
CONFIGURE_SIGNAL = "configure"


class SweeperConfig(BaseModel):
    pools: list[str]
    interval_s: float = 60.0
    # Scope name -> the task queue of its GitHub calls: each scope is swept on its own throttle.
    scopes: dict[str, str] = Field(default_factory=dict)


class SweeperInput(BaseModel):
    config: SweeperConfig
    # Sweeps per run before continue-as-new keeps the history small.
    sweeps_per_run: int = 200
    total_removed: int = 0


@workflow.defn(name="Sweeper")
class SweeperWorkflow:
    @workflow.init
    def __init__(self, params: SweeperInput) -> None:
        self._config = params.config
        self._total_removed = params.total_removed
        self._sweeps = 0

    @workflow.signal(name=CONFIGURE_SIGNAL)
    def configure(self, config: SweeperConfig) -> None:
        """Sent by every worker start, so a changed pool list takes effect on the next sweep."""
        self._config = config

    @workflow.query
    def config(self) -> SweeperConfig:
        return self._config

    @workflow.query
    def total_removed(self) -> int:
        return self._total_removed

    @workflow.query
    def sweeps(self) -> int:
        return self._sweeps

    async def _step(self, name: str, run: Awaitable[SweepReport], failures: list[str]) -> list[SweepReport]:
        """One sweep step; a failure is noted and the other steps still run."""
        try:
            return [await run]
        except ActivityError as error:
            workflow.logger.warning(
                "sweep step %s failed, retried next interval: %s", name, error.cause or error
            )
            failures.append(f"{name}: {error.cause or error}")
            return []

    async def _sweep(self) -> tuple[list[SweepReport], list[str]]:
        config = self._config
        reports: list[SweepReport] = []
        failures: list[str] = []
        for pool in config.pools:
            reports += await self._step(
                f"containers of {pool}",
                workflow.execute_activity_method(
                    SweepActivities.containers,
                    pool,
                    start_to_close_timeout=SWEEP_TIMEOUT,
                    heartbeat_timeout=SWEEP_HEARTBEAT,
                    retry_policy=SWEEP_RETRY,
                    summary=f"sweep containers of {pool}",
                ),
                failures,
            )
        for scope, github_queue in config.scopes.items():
            # Recover missed jobs first, so a registration minted for one is not mistaken for an orphan.
            for sweep, what in (
                (SweepActivities.queued_jobs, "start workflows for queued jobs that have none running"),
                (SweepActivities.registrations, "sweep runner registrations"),
            ):
                summary = f"{what} ({scope})"
                reports += await self._step(
                    summary,
                    workflow.execute_activity_method(
                        sweep,
                        scope,
                        summary=summary,
                        task_queue=github_queue,
                        start_to_close_timeout=SWEEP_TIMEOUT,
                        heartbeat_timeout=SWEEP_HEARTBEAT,
                        retry_policy=SWEEP_RETRY,
                    ),
                    failures,
                )
        return reports, failures

    @workflow.run
    async def run(self, params: SweeperInput) -> None:
        for _ in range(params.sweeps_per_run):
            reports, failures = await self._sweep()
            removed = [name for report in reports for name in report.removed]
            busy = [name for report in reports for name in report.busy]
            recovered = [name for report in reports for name in report.recovered]
            gave_up = [name for report in reports for name in report.gave_up]
            self._total_removed += len(removed)
            self._sweeps += 1
            workflow.set_current_details(
                f"last sweep removed {len(removed)} orphans ({', '.join(removed[:5]) or 'none'}); "
                f"{len(busy)} busy, retried next time; {self._total_removed} removed in total; "
                f"{len(recovered)} open jobs given a workflow, {len(gave_up)} given up; "
                f"{len(failures)} steps failed {failures[:3]}"
            )
            await workflow.sleep(timedelta(seconds=self._config.interval_s), summary="until the next sweep")
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(
            SweeperInput(
                config=self._config, sweeps_per_run=params.sweeps_per_run, total_removed=self._total_removed
            )
        )
