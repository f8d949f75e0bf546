"""WarmRunner: one idle runner kept ready by a pool's WarmPool, from its slot to its container gone.

slot → mint → spawn → registered (idle) → a job takes it, or it is drained or recycled →
deregister → terminate → release. It holds its own slot, so warm runners count against the
pool's cap like any other runner. Its history is one runner's life: the pool workflow can
continue as new whenever it likes without handing any lease over.

It learns that it took a job from the `in_progress` webhook (the dispatcher forwards an event
that names this runner here), or, should that webhook be lost, from GitHub's runner status,
asked every `status_check_interval_s` while idle. Whatever it learns it reports to its pool,
which starts a replacement once it is busy; the job's own workflow sees the job in progress on
a runner not its own and stops trying to start one. The job this runner served is its result,
its `MayflyJobId` search attribute and a log line: that is what usage is accounted to.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.github import GitHubActivities
    from mayfly import search_attributes
    from mayfly.models import (
        ContainerExit,
        ContainerRef,
        JobEvent,
        MintedRunner,
        RunnerRef,
    )
    from mayfly.warm import (
        DRAIN_SIGNAL,
        RUNNER_REPORT_SIGNAL,
        WARM_RUNNER_WORKFLOW,
        WarmRunnerInput,
        WarmRunnerPhase,
        WarmRunnerReport,
        WarmRunnerResult,
    )
    from workflows import runner_steps as steps
    from workflows.shield import uncancellable
    from workflows.slot_lease import SlotLease

# A runner whose job completed exits within seconds; past this it is stopped.
FINISHED_EXIT_GRACE = timedelta(seconds=60)
RECYCLE_MARGIN = timedelta(seconds=60)


@workflow.defn(name=WARM_RUNNER_WORKFLOW)
class WarmRunnerWorkflow:
    @workflow.init
    def __init__(self, params: WarmRunnerInput) -> None:
        self._params = params
        self._name = params.runner_name
        recipe = params.recipe
        self._lease = SlotLease(recipe.pool)
        self._drain = False
        self._online = False
        self._busy = False
        self._job_id: int | None = None
        self._finished_at: datetime | None = None
        self._registered = False
        self._reason = ""
        self._failed = False
        # Registration polls cancelled when a webhook won; settled before the workflow ends.
        self._settling: list[asyncio.Task[Any]] = []
        self._events = 0
        self._phase: WarmRunnerPhase = "starting"

    # --- messages -------------------------------------------------------------------------

    @workflow.signal
    def job_event(self, event: JobEvent) -> None:
        """Forwarded by the dispatcher for webhooks that name this runner."""
        if event.runner_name != self._name:
            return
        self._events += 1
        self._online = True
        if event.action in ("in_progress", "completed"):
            self._busy = True
            self._job_id = event.job_id
        if event.action == "completed" and self._finished_at is None:
            self._finished_at = workflow.now()

    @workflow.signal(name=DRAIN_SIGNAL)
    def drain(self) -> None:
        """The pool has more idle runners than it wants: stop this one unless it took a job."""
        self._drain = True
        self._events += 1

    @workflow.query
    def phase(self) -> WarmRunnerPhase:
        return self._phase

    # --- main -----------------------------------------------------------------------------

    @workflow.run
    async def run(self, params: WarmRunnerInput) -> WarmRunnerResult:
        recipe = params.recipe
        workflow.upsert_search_attributes(
            [search_attributes.POOL.value_set(recipe.pool), search_attributes.RUNNER.value_set(self._name)]
        )
        try:
            self._details("waiting for a slot")
            # The slot goes back when the block ends, after the container is confirmed gone; a
            # request still queued is withdrawn, or it would be granted to nobody.
            async with self._lease:
                if await self._lease.acquire(give_up=lambda: self._drain):
                    await self._live()
                else:
                    self._reason = "drained before it got a slot"
        finally:
            self._phase = "gone"
            await uncancellable(steps.settle(self._settling))
            await uncancellable(
                self._report(
                    WarmRunnerReport(
                        runner_name=self._name,
                        phase="gone",
                        job_id=self._job_id,
                        failed=self._failed,
                        reason=self._reason,
                    )
                )
            )
        self._details(f"gone: {self._reason}")
        workflow.logger.info(
            "warm runner %s of pool %s gone (%s); served job %s; held its slot %.0fs",
            self._name,
            recipe.pool,
            self._reason,
            self._job_id,
            self._lease.held_s(),
            extra={"runner": self._name},
        )
        return WarmRunnerResult(
            runner_name=self._name,
            pool=recipe.pool,
            job_id=self._job_id,
            registered=self._registered,
            slot_held_s=self._lease.held_s(),
            reason=self._reason,
        )

    def _details(self, text: str) -> None:
        workflow.set_current_details(f"**{self._phase}**: {text}")
        workflow.upsert_search_attributes([search_attributes.STATE.value_set(f"warm-{self._phase}")])

    async def _report(self, report: WarmRunnerReport) -> bool:
        """Tell the pool; False if it is gone (terminated): then nobody counts this runner."""
        handle = workflow.get_external_workflow_handle(self._params.pool_workflow_id)
        try:
            await handle.signal(RUNNER_REPORT_SIGNAL, report)
        except Exception as error:
            if is_cancelled_exception(error):
                raise
            workflow.logger.warning(
                "warm pool %s did not take a report: %s",
                self._params.pool_workflow_id,
                error,
                extra={"runner": self._name},
            )
            return False
        return True

    async def _mint(self) -> MintedRunner:
        """Mint, waiting out a long rate-limit pause on a timer rather than failing."""
        task = self._start_mint()
        while True:
            try:
                return await steps.finish_despite_cancel(task, stop_it=False)
            except ActivityError as error:
                wait = steps.throttled_for(error)
                if wait is None:
                    raise
            await workflow.sleep(wait, summary="GitHub rate limit reset")
            task = self._start_mint()

    def _start_mint(self) -> asyncio.Task[MintedRunner]:
        return steps.start_mint(self._params.recipe, self._name)

    def _queue(self) -> str | None:
        return self._params.recipe.github_task_queue or None

    async def _live(self) -> None:
        recipe = self._params.recipe
        minted: MintedRunner | None = None
        container: ContainerRef | None = None
        spawn_tried = False
        exit_task: asyncio.Task[ContainerExit] | None = None
        spawned_at = workflow.now()
        try:
            self._details("minting")
            minted = await self._mint()
            if self._drain:
                self._reason = "drained while minting"
                return
            self._details("spawning")
            spawn_tried = True
            # The backend counts the lifetime from its create; counting it from before the spawn
            # keeps the recycle ahead of the watcher's kill however long the create takes.
            spawned_at = workflow.now()
            # A warm runner has no job of its own yet: job id 0.
            container = await steps.spawn(recipe.pool, minted, self._name, 0, recipe.max_lifetime_s)
            exit_task = steps.watch(container, recipe.max_lifetime_s)
            self._details("registering")
            if not await self._confirm_registration(minted, exit_task):
                if not self._drain:
                    self._failed = True
                    self._reason = f"did not come online within {recipe.registration_timeout_s:.0f}s"
                else:
                    self._reason = "drained while registering"
                return
            self._registered = True
            await self._stand_ready(exit_task, spawned_at)
        except ActivityError as error:
            if is_cancelled_exception(error):
                raise
            self._failed = True
            self._reason = f"{'mint' if minted is None else 'spawn'} failed: {error.cause or error}"
        finally:
            await uncancellable(
                self._teardown(minted, container if container else spawn_tried, exit_task, spawned_at)
            )

    async def _confirm_registration(
        self, minted: MintedRunner, exit_task: asyncio.Task[ContainerExit]
    ) -> bool:
        status = await steps.poll_until_registered(
            self._params.recipe,
            self._name,
            minted,
            lambda: self._online or exit_task.done() or self._drain,
            self._settling.append,
        )
        if status is not None:
            self._online = self._online or status.online or status.busy
            self._busy = self._busy or status.busy
        return self._online

    async def _stand_ready(self, exit_task: asyncio.Task[ContainerExit], spawned_at: datetime) -> None:
        """Idle until a job takes the runner, the pool drains it or it reaches its lifetime;
        once busy, until its job is done."""
        recipe = self._params.recipe
        lifetime_end = spawned_at + timedelta(seconds=recipe.max_lifetime_s)
        # An idle runner is recycled a little before its watcher would kill it at its lifetime,
        # so it is deregistered first and no job lands on a runner being stopped.
        recycle_at = lifetime_end - min(RECYCLE_MARGIN, timedelta(seconds=recipe.max_lifetime_s / 10))
        check_every = timedelta(seconds=recipe.status_check_interval_s)
        next_check = workflow.now() + check_every
        reported: tuple[WarmRunnerPhase, int | None] | None = None
        while not exit_task.done():
            now = workflow.now()
            phase: WarmRunnerPhase = "busy" if self._busy else "idle"
            if reported != (phase, self._job_id):
                reported = (phase, self._job_id)
                await self._enter(phase)
                continue
            if now >= lifetime_end:
                self._reason = "stopped at its max lifetime"
                return
            deadline = lifetime_end
            if not self._busy:
                if now >= recycle_at:
                    self._reason = "recycled at its max lifetime"
                    return
                deadline = recycle_at
                if self._drain:
                    self._reason = "drained"
                    return
                if now >= next_check:
                    # The webhook saying it took a job may be lost; GitHub knows. The same
                    # beat re-reports to the pool, which adopts it after a restart, or is gone.
                    status = await steps.on_github(
                        GitHubActivities.runner_status,
                        RunnerRef(runner_name=self._name, scope=self._params.recipe.scope),
                        summary=f"is {self._name} busy?",
                        github_queue=self._queue(),
                        give_up_after=timedelta(minutes=2),
                    )
                    next_check = workflow.now() + check_every
                    if not status.exists:
                        self._reason = "its registration disappeared"
                        return
                    self._busy = self._busy or status.busy
                    if not self._busy and not await self._report(
                        WarmRunnerReport(runner_name=self._name, phase="idle")
                    ):
                        self._reason = "its warm pool is gone"
                        return
                    continue
                deadline = min(deadline, next_check)
            if self._finished_at is not None:
                if now >= self._finished_at + FINISHED_EXIT_GRACE:
                    self._reason = "did not exit after its job"
                    return
                deadline = min(deadline, self._finished_at + FINISHED_EXIT_GRACE)
            seen = self._events
            try:
                await workflow.wait_condition(
                    lambda seen=seen: exit_task.done() or self._events != seen,  # type: ignore[misc]
                    timeout=deadline - now,
                    timeout_summary="idle check or lifetime",
                )
            except TimeoutError:
                pass
        if not self._reason:
            self._reason = "ran its job and exited" if self._busy else "exited"

    async def _enter(self, phase: WarmRunnerPhase) -> None:
        self._phase = phase
        if self._job_id is not None:
            workflow.upsert_search_attributes([search_attributes.JOB_ID.value_set(self._job_id)])
        self._details(f"took job {self._job_id}" if self._job_id is not None else "registered, idle")
        await self._report(WarmRunnerReport(runner_name=self._name, phase=phase, job_id=self._job_id))

    async def _teardown(
        self,
        minted: MintedRunner | None,
        container: ContainerRef | bool,
        exit_task: asyncio.Task[ContainerExit] | None,
        spawned_at: datetime,
    ) -> None:
        """Deregister (an idle runner then takes no job), then terminate, then the caller releases."""
        self._details(f"tearing down ({self._reason or 'cancelled'})")
        lifetime_end = spawned_at + timedelta(seconds=self._params.recipe.max_lifetime_s)
        ran_and_exited = (
            exit_task is not None
            and steps.exited(exit_task)
            and (self._busy or steps.exit_code(exit_task) == 0)
        )
        if not (self._finished_at is not None or ran_and_exited):
            ref = RunnerRef(
                runner_name=self._name,
                runner_id=minted.runner_id if minted else None,
                scope=self._params.recipe.scope,
            )

            async def took_a_job() -> None:
                # Let the pool replace it while its job runs.
                if not self._busy:
                    self._busy = True
                    await self._enter("busy")

            exit_task, failure = await steps.deregister_letting_a_job_finish(
                lambda: steps.deregister(ref, self._queue()),
                exit_task,
                lambda: (
                    steps.watch(self._container_ref(container), self._params.recipe.max_lifetime_s)
                    if container
                    else None
                ),
                took_a_job,
                lifetime_end,
            )
            if failure is not None:
                workflow.logger.warning(
                    "deregistering %s failed, terminating anyway: %s",
                    self._name,
                    failure,
                    extra={"runner": self._name},
                )
        if exit_task is not None:
            await steps.cancel_quietly(exit_task)
        if container and not steps.confirmed_gone(exit_task):
            await steps.terminate(self._container_ref(container))

    def _container_ref(self, container: ContainerRef | bool) -> ContainerRef:
        if isinstance(container, ContainerRef):
            return container
        return ContainerRef(pool=self._params.recipe.pool, name=self._name, backend_id="")
