"""WarmPool: one per pool with `min_idle > 0`; keeps that many registered, idle runners ready.

Every worker start hands it the pool's settings (signal-with-start `configure`), so a changed
`min_idle` takes effect at the next worker start: more idle runners are started, or the
surplus is drained (idle ones deregistered, then terminated, then their slots released; busy
ones finish their job). It ends once `min_idle` is 0 and its last runner is gone.

Each runner lives in its own `WarmRunner` child workflow, which holds its own slot and reports
here when it is idle, busy (then a replacement starts) and gone. Children are abandoned on
close, so this workflow continues as new without disturbing them: they report to the pool's
workflow id, whichever run is current, and a run started afresh (after an operator
terminated the last) adopts any child that reports in and drains what is surplus.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ActivityError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.warm import WarmPoolActivities
    from mayfly import search_attributes
    from mayfly.warm import (
        CONFIGURE_SIGNAL,
        DRAIN_SIGNAL,
        RUNNER_REPORT_SIGNAL,
        WARM_POOL_WORKFLOW,
        ServedJob,
        WarmPoolCarry,
        WarmPoolConfig,
        WarmPoolInput,
        WarmPoolStatus,
        WarmRunnerInput,
        WarmRunnerReport,
        warm_runner_name,
        warm_runner_workflow_id,
    )
    from workflows.warm_runner import WarmRunnerWorkflow

# Runners that fail to register back off before the next start: 5 s, 10 s, ... at most 5 min.
FAILURE_BACKOFF_S = 5.0
MAX_FAILURE_BACKOFF_S = 300.0
SERVED_KEPT = 50
# Wakes up now and then even when nothing happens, to see whether to continue as new.
IDLE_WAKE = timedelta(hours=1)


@workflow.defn(name=WARM_POOL_WORKFLOW)
class WarmPoolWorkflow:
    @workflow.init
    def __init__(self, params: WarmPoolInput) -> None:
        self._config = params.config
        carry = params.carry or WarmPoolCarry()
        self._runners = dict(carry.runners)
        self._draining = set(carry.draining)
        self._failures = carry.consecutive_failures
        self._started_total = carry.started_total
        self._served = list(carry.served)
        self._served_total = carry.served_total
        self._not_before = carry.not_before
        self._version = 0
        self._next_audit = workflow.now() + timedelta(seconds=params.config.recipe.status_check_interval_s)

    @workflow.signal(name=CONFIGURE_SIGNAL)
    def configure(self, config: WarmPoolConfig) -> None:
        self._config = config
        self._version += 1

    @workflow.signal(name=RUNNER_REPORT_SIGNAL)
    def runner_report(self, report: WarmRunnerReport) -> None:
        self._version += 1
        name = report.runner_name
        if report.phase == "gone":
            self._runners.pop(name, None)
            self._draining.discard(name)
            if report.failed:
                self._failures += 1
                self._not_before = workflow.now() + self._backoff()
            return
        previous = self._runners.get(name)
        # A report from a runner this run does not know comes from before an operator restarted
        # the pool: adopt it (and drain it if surplus) rather than lose count of its slot.
        self._runners[name] = report.phase
        if report.phase == "idle":
            self._failures = 0
        if report.phase == "busy" and previous != "busy":
            self._draining.discard(name)
            if report.job_id is not None:
                self._served_total += 1
                self._served = [
                    *self._served,
                    ServedJob(runner_name=name, job_id=report.job_id, at=workflow.now()),
                ][-SERVED_KEPT:]
                workflow.logger.info(
                    "warm runner %s took job %s", name, report.job_id, extra={"runner": name}
                )

    @workflow.query
    def status(self) -> WarmPoolStatus:
        def named(phase: str) -> list[str]:
            return sorted(n for n, p in self._runners.items() if p == phase and n not in self._draining)

        return WarmPoolStatus(
            pool=self._config.recipe.pool,
            min_idle=self._config.min_idle,
            starting=named("starting"),
            idle=named("idle"),
            busy=sorted(n for n, p in self._runners.items() if p == "busy"),
            draining=sorted(n for n in self._draining if self._runners.get(n) != "busy"),
            started_total=self._started_total,
            served_total=self._served_total,
            served=self._served,
        )

    def _ready(self) -> list[str]:
        """Runners that are, or will be, idle and wanted: what `min_idle` counts."""
        return [n for n, p in self._runners.items() if p in ("starting", "idle") and n not in self._draining]

    def _backoff(self) -> timedelta:
        if self._failures == 0:
            return timedelta(0)
        return timedelta(seconds=min(MAX_FAILURE_BACKOFF_S, FAILURE_BACKOFF_S * 2 ** (self._failures - 1)))

    @workflow.run
    async def run(self, params: WarmPoolInput) -> WarmPoolStatus:
        while True:
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(WarmPoolInput(config=self._config, carry=self._carry()))
            ready = self._ready()
            wanted = self._config.min_idle
            if wanted == 0 and not self._runners:
                workflow.set_current_details("min_idle is 0 and every warm runner is gone")
                return self.status()
            if self._runners and workflow.now() >= self._next_audit:
                await self._audit()
                continue
            wait = IDLE_WAKE
            if len(ready) < wanted:
                wait = self._not_before - workflow.now() if self._not_before else timedelta(0)
                if wait <= timedelta(0):
                    await self._start_runner()
                    continue
            elif len(ready) > wanted:
                await self._drain(len(ready) - wanted)
                continue
            workflow.set_current_details(
                f"min_idle {wanted}: {len(ready)} idle or starting, "
                f"{sum(p == 'busy' for p in self._runners.values())} busy, {len(self._draining)} draining"
            )
            if self._runners:
                wait = min(wait, self._next_audit - workflow.now())
            seen = self._version
            try:
                await workflow.wait_condition(
                    lambda seen=seen: self._version != seen,  # type: ignore[misc]
                    timeout=wait,
                    timeout_summary="next change or backoff",
                )
            except TimeoutError:
                pass

    async def _audit(self) -> None:
        """Forget runners whose workflow closed without reporting (an operator terminated it):
        the sweepers remove what it left, and the semaphore reclaims its slot."""
        self._next_audit = workflow.now() + timedelta(seconds=self._config.recipe.status_check_interval_s)
        ids = {warm_runner_workflow_id(name): name for name in self._runners}
        try:
            closed = await workflow.execute_activity_method(
                WarmPoolActivities.closed_runners,
                sorted(ids),
                start_to_close_timeout=timedelta(minutes=2),
                heartbeat_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3),
                summary=f"which of {len(ids)} warm runners are closed",
            )
        except ActivityError as error:
            workflow.logger.warning("warm runner audit failed, retried next time: %s", error)
            return
        for workflow_id in closed:
            name = ids[workflow_id]
            workflow.logger.warning(
                "warm runner %s closed without reporting; forgotten", name, extra={"runner": name}
            )
            self._runners.pop(name, None)
            self._draining.discard(name)

    async def _start_runner(self) -> None:
        recipe = self._config.recipe
        name = warm_runner_name(recipe.runner_name_prefix, recipe.pool, workflow.uuid4().hex[:8])
        self._runners[name] = "starting"
        self._started_total += 1
        await workflow.start_child_workflow(
            WarmRunnerWorkflow.run,
            WarmRunnerInput(runner_name=name, pool_workflow_id=workflow.info().workflow_id, recipe=recipe),
            id=warm_runner_workflow_id(name),
            # The child outlives this run's continue-as-new, and reports to whichever run is current.
            parent_close_policy=ParentClosePolicy.ABANDON,
            static_summary=f"warm runner {name} of pool {recipe.pool}",
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(search_attributes.POOL, recipe.pool)]
            ),
        )

    async def _drain(self, count: int) -> None:
        # Runners still starting go first (they hold a slot but serve nobody yet), then idle ones.
        candidates = sorted(self._ready(), key=lambda n: (self._runners[n] != "starting", n))
        for name in candidates[:count]:
            self._draining.add(name)
            try:
                await workflow.get_external_workflow_handle(warm_runner_workflow_id(name)).signal(
                    DRAIN_SIGNAL
                )
            except Exception as error:
                # Its workflow is closed (an operator terminated it): nothing left to drain, and
                # the sweepers remove whatever it left behind.
                workflow.logger.warning(
                    "warm runner %s could not be drained: %s", name, error, extra={"runner": name}
                )
                self._runners.pop(name, None)
                self._draining.discard(name)

    def _carry(self) -> WarmPoolCarry:
        return WarmPoolCarry(
            runners=self._runners,
            draining=sorted(self._draining),
            consecutive_failures=self._failures,
            started_total=self._started_total,
            served=self._served,
            served_total=self._served_total,
            not_before=self._not_before,
        )
