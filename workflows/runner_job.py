"""RunnerJob: one workflow per GitHub `workflow_job`, from queued to its runner confirmed gone.

Runners are not bound to jobs: GitHub gives a queued job to any idle runner with matching
labels. So this workflow's goal is "my job gets a runner, and every runner I start is
eventually deregistered and terminated". It keeps starting runners while its job is still
queued, and reaps its runner once that runner is surplus.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.containers import ContainerActivities
    from activities.github import GitHubActivities
    from mayfly import metrics, search_attributes
    from mayfly.models import (
        ContainerExit,
        ContainerRef,
        ContainerSpec,
        DeregisterOutcome,
        JobEvent,
        JobPhase,
        MintedRunner,
        MintRequest,
        RunnerJobInput,
        RunnerJobResult,
        RunnerJobState,
        RunnerRef,
        RunnerStatus,
        SlotGrant,
        runner_name_for,
    )
    from workflows.slot_lease import SlotLease

# GitHub calls: short per-call timeouts, backoff capped so a 502 burst costs seconds, not minutes.
GITHUB_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
# Cleanup must eventually succeed: a slot is only released once its container is gone.
CLEANUP_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
# Failures that no new runner attempt can fix: stop and say why.
PERMANENT_ERROR_TYPES = frozenset(
    {"GitHubHTTP401", "GitHubHTTP403", "GitHubHTTP404", "GitHubHTTP422", "UnknownPool"}
)
FINISHED_EXIT_GRACE = timedelta(seconds=60)
SKIP_DEREGISTER_AFTER_JOB = "skip-deregister-after-job"
CLEAN_EXIT_IS_NOT_A_FAILURE = "clean-exit-is-not-a-registration-failure"
_JOB_ORDER = {"queued": 0, "waiting": 0, "in_progress": 1, "completed": 2}


@dataclass
class _RunnerTrack:
    name: str
    online: bool = False
    assigned_job: int | None = None
    finished: bool = False
    finished_at: datetime | None = None


def _permanent(error: ActivityError) -> bool:
    cause = error.cause
    return isinstance(cause, ApplicationError) and cause.non_retryable and cause.type in PERMANENT_ERROR_TYPES


@workflow.defn(name="RunnerJob")
class RunnerJobWorkflow:
    @workflow.init
    def __init__(self, params: RunnerJobInput) -> None:
        self._params = params
        self._job_status: Literal["queued", "in_progress", "completed"] = "queued"
        self._served_by: str | None = None
        self._lease = SlotLease(params.job.pool, params.capacity, params.semaphore_reap_interval_s)
        self._phase = JobPhase.QUEUED
        self._runner: _RunnerTrack | None = None
        self._spawned = 0
        self._failures = 0
        self._last_error: str | None = None
        self._events_seen = 0
        self._runner_attribute: str | None = None
        self._clean_exits_unseen = 0
        self._instruments: metrics.JobMetrics | None = None

    # --- messages -------------------------------------------------------------------------

    @workflow.signal
    def job_event(self, event: JobEvent) -> None:
        self._events_seen += 1
        if event.job_id == self._params.job.job_id:
            current = "queued" if self._job_status == "queued" else self._job_status
            if _JOB_ORDER[event.action] > _JOB_ORDER[current]:
                self._job_status = "completed" if event.action == "completed" else "in_progress"
            if event.runner_name and event.action in ("in_progress", "completed"):
                self._served_by = event.runner_name
        track = self._runner
        if track is not None and event.runner_name == track.name:
            track.online = True
            if event.action in ("in_progress", "completed"):
                track.assigned_job = event.job_id
            if event.action == "completed" and not track.finished:
                track.finished = True
                track.finished_at = workflow.now()

    @workflow.signal(name="slot_granted")
    def slot_granted(self, grant: SlotGrant) -> None:
        self._lease.on_grant(grant)

    @workflow.query
    def state(self) -> RunnerJobState:
        return RunnerJobState(
            job_id=self._params.job.job_id,
            pool=self._params.job.pool,
            phase=self._phase,
            job_status=self._job_status,
            served_by=self._served_by,
            slot_held=self._lease.granted,
            current_runner=self._runner.name if self._runner else None,
            runners_spawned=self._spawned,
            registration_failures=self._failures,
            last_error=self._last_error,
        )

    # --- main -----------------------------------------------------------------------------

    def _metrics(self) -> metrics.JobMetrics:
        if self._instruments is None:
            self._instruments = metrics.JobMetrics(workflow.metric_meter(), self._params.job.pool)
        return self._instruments

    def _registration_failed(self, cause: str, message: str) -> None:
        self._failures += 1
        self._last_error = message
        self._metrics().registration_failures.add(1, {"cause": cause})

    def _github_queue(self) -> str | None:
        return self._params.github_task_queue or None

    def _job_needs_runner(self) -> bool:
        return self._job_status == "queued"

    def _set_phase(self, phase: JobPhase, details: str) -> None:
        updates = []
        if phase is not self._phase:
            updates.append(search_attributes.STATE.value_set(phase.value))
        runner = self._runner.name if self._runner else None
        if runner is not None and runner != self._runner_attribute:
            updates.append(search_attributes.RUNNER.value_set(runner))
            self._runner_attribute = runner
        if updates:
            workflow.upsert_search_attributes(updates)
        if phase is not self._phase:
            self._metrics().phases.add(1, {"phase": phase.value})
        self._phase = phase
        workflow.set_current_details(f"**{phase.value}**: {details}")

    def _result(
        self, outcome: Literal["served", "served-elsewhere", "cancelled-before-start"]
    ) -> RunnerJobResult:
        return RunnerJobResult(
            job_id=self._params.job.job_id,
            served_by=self._served_by,
            runners_spawned=self._spawned,
            registration_failures=self._failures,
            outcome=outcome,
            slot_held_s=self._lease.held_s(),
        )

    @workflow.run
    async def run(self, params: RunnerJobInput) -> RunnerJobResult:
        job = params.job
        if not self._job_needs_runner():
            self._set_phase(JobPhase.DONE, "the job was already taken or finished when this workflow started")
            return self._result("served-elsewhere")
        try:
            self._set_phase(JobPhase.WAITING_FOR_SLOT, f"a slot in pool `{job.pool}`")
            if not await self._lease.acquire(give_up=lambda: not self._job_needs_runner()):
                self._set_phase(JobPhase.DONE, "another runner took the job before a slot was free")
                return self._result("served-elsewhere" if self._served_by else "cancelled-before-start")
            while self._job_needs_runner():
                if self._failures >= params.max_registration_attempts:
                    raise ApplicationError(
                        f"no runner registered for job {job.job_id} after {self._failures} attempts; "
                        f"last error: {self._last_error}",
                        type="RegistrationFailed",
                        non_retryable=True,
                    )
                await self._run_one_runner()
            self._set_phase(JobPhase.DONE, f"served by `{self._served_by}`")
            return self._result("served")
        except BaseException as error:
            # Eviction is not a failure of the job; anything else is, and the UI should say so.
            if isinstance(error, (ApplicationError, ActivityError, asyncio.CancelledError)):
                self._set_phase(JobPhase.FAILED, f"{type(error).__name__}: {error}")
            raise
        finally:
            await self._lease.release()

    async def _run_one_runner(self) -> None:
        params = self._params
        job = params.job
        self._spawned += 1
        track = _RunnerTrack(name=runner_name_for(params.runner_name_prefix, job.job_id, self._spawned))
        self._runner = track
        minted: MintedRunner | None = None
        container: ContainerRef | None = None
        exit_task: asyncio.Task[ContainerExit] | None = None
        spawned_at = workflow.now()
        try:
            try:
                self._set_phase(JobPhase.MINTING, f"a JIT config for `{track.name}`")
                minted = await workflow.execute_activity_method(
                    GitHubActivities.mint_runner,
                    MintRequest(pool=job.pool, runner_name=track.name, labels=params.pool_labels),
                    start_to_close_timeout=timedelta(seconds=30),
                    schedule_to_close_timeout=timedelta(seconds=params.registration_timeout_s * 3),
                    retry_policy=GITHUB_RETRY,
                    summary=f"mint {track.name}",
                    task_queue=self._github_queue(),
                )
                self._set_phase(JobPhase.SPAWNING, f"container `{track.name}`")
                container = await workflow.execute_activity_method(
                    ContainerActivities.spawn,
                    ContainerSpec(
                        pool=job.pool,
                        name=track.name,
                        job_id=job.job_id,
                        owner_workflow_id=workflow.info().workflow_id,
                        runner_name=track.name,
                        jit_config=minted.jit_config,
                        max_lifetime_s=params.max_lifetime_s,
                    ),
                    start_to_close_timeout=timedelta(minutes=25),
                    schedule_to_close_timeout=timedelta(minutes=30),
                    heartbeat_timeout=timedelta(minutes=2),
                    retry_policy=GITHUB_RETRY,
                    cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                    summary=f"spawn {track.name}",
                )
            except ActivityError as error:
                if _permanent(error):
                    raise
                cause = "mint" if minted is None else "spawn"
                self._registration_failed(cause, f"{track.name}: {error.cause or error}")
                return
            self._metrics().webhook_to_spawn.record(
                (workflow.now() - workflow.info().start_time).total_seconds()
            )
            exit_task = workflow.start_activity_method(
                ContainerActivities.wait_exit,
                container,
                start_to_close_timeout=timedelta(seconds=params.max_lifetime_s + 600),
                heartbeat_timeout=timedelta(seconds=30),
                retry_policy=CLEANUP_RETRY,
                summary=f"watch {track.name}",
                task_queue=container.task_queue,
            )
            self._set_phase(JobPhase.REGISTERING, f"`{track.name}` to come online")
            if not await self._confirm_registration(track, minted, exit_task):
                if _exit_code(exit_task) == 0 and workflow.patched(CLEAN_EXIT_IS_NOT_A_FAILURE):
                    # The listener exits 0 only after a job (or once its registration is gone): it
                    # ran some job before its webhooks arrived. Not a failed registration.
                    self._clean_exits_unseen += 1
                    if self._clean_exits_unseen > params.max_registration_attempts * 3:
                        raise ApplicationError(
                            f"{self._clean_exits_unseen} runners for job {job.job_id} exited cleanly without "
                            "ever being seen online; are webhooks reaching the starter?",
                            type="RunnersVanish",
                            non_retryable=True,
                        )
                    return
                cause = "exited" if exit_task.done() else "timeout"
                self._registration_failed(
                    cause, f"{track.name} did not come online within {params.registration_timeout_s:.0f}s"
                )
                return
            self._set_phase(JobPhase.RUNNING, f"`{track.name}` is online")
            await self._wait_until_runner_done(track, exit_task, spawned_at)
        finally:
            await self._teardown(track, minted, container, exit_task, spawned_at)

    async def _confirm_registration(
        self, track: _RunnerTrack, minted: MintedRunner, exit_task: asyncio.Task[ContainerExit]
    ) -> bool:
        """Online means a webhook named the runner, or GitHub lists it online."""
        timeout = timedelta(seconds=self._params.registration_timeout_s)
        poll: asyncio.Task[RunnerStatus] = workflow.start_activity_method(
            GitHubActivities.wait_online,
            RunnerRef(runner_name=track.name, runner_id=minted.runner_id),
            start_to_close_timeout=timeout + timedelta(seconds=30),
            # Short, so the cancel sent when the webhook wins reaches the activity before its
            # first poll (cancellation travels on heartbeat responses).
            heartbeat_timeout=timedelta(seconds=4),
            retry_policy=GITHUB_RETRY,
            summary=f"poll {track.name} online",
            task_queue=self._github_queue(),
        )
        try:
            await workflow.wait_condition(
                lambda: track.online or poll.done() or exit_task.done(),
                timeout=timeout,
                timeout_summary="registration timeout",
            )
        except TimeoutError:
            pass
        if poll.done() and not poll.cancelled() and poll.exception() is None:
            status = poll.result()
            track.online = track.online or status.online or status.busy
        await _cancel_quietly(poll)
        return track.online

    async def _wait_until_runner_done(
        self, track: _RunnerTrack, exit_task: asyncio.Task[ContainerExit], spawned_at: datetime
    ) -> None:
        params = self._params
        registered_at = workflow.now()
        lifetime_end = spawned_at + timedelta(seconds=params.max_lifetime_s)

        def surplus() -> bool:
            # Our job went to another runner (or was cancelled) and ours has no job of its own.
            return track.assigned_job is None and not self._job_needs_runner()

        while not exit_task.done() and not surplus():
            deadline = lifetime_end
            if track.assigned_job is None:
                deadline = min(deadline, registered_at + timedelta(seconds=params.idle_ttl_s))
            if track.finished_at is not None:
                deadline = min(deadline, track.finished_at + FINISHED_EXIT_GRACE)
            remaining = deadline - workflow.now()
            if remaining <= timedelta(0):
                self._last_error = f"{track.name} reaped: idle or lifetime limit reached"
                return
            seen = self._events_seen
            try:
                await workflow.wait_condition(
                    lambda seen=seen: exit_task.done() or surplus() or self._events_seen != seen,  # type: ignore[misc]
                    timeout=remaining,
                    timeout_summary="runner idle/lifetime limit",
                )
            except TimeoutError:
                pass

    async def _teardown(
        self,
        track: _RunnerTrack,
        minted: MintedRunner | None,
        container: ContainerRef | None,
        exit_task: asyncio.Task[ContainerExit] | None,
        spawned_at: datetime,
    ) -> None:
        self._set_phase(JobPhase.TEARING_DOWN, f"`{track.name}`")
        lifetime_end = spawned_at + timedelta(seconds=self._params.max_lifetime_s)
        # An ephemeral runner that took a job and then exited, or whose listener exited cleanly
        # (it does so only after its job or once its registration is gone), has been removed by
        # GitHub already; deleting it again would only cost an API call. Webhooks can lag the
        # exit under load, so the exit code counts too. The sweeper catches the odd leftover.
        ran_and_exited = (
            exit_task is not None
            and _exited(exit_task)
            and (track.assigned_job is not None or _exit_code(exit_task) == 0)
        )
        already_gone = track.finished or (ran_and_exited and workflow.patched(SKIP_DEREGISTER_AFTER_JOB))
        # Deregister first: GitHub refuses to delete a busy runner, and deleting an idle one
        # guarantees it takes no job while its container is being stopped.
        if minted is not None and not already_gone:
            while True:
                outcome = await self._deregister(track, minted)
                if outcome is not DeregisterOutcome.BUSY:
                    break
                # It took a job after all; let that job finish, within the runner's lifetime.
                if track.assigned_job is None:
                    track.assigned_job = -1
                remaining = lifetime_end - workflow.now()
                if exit_task is None or exit_task.done() or remaining <= timedelta(0):
                    break
                try:
                    await workflow.wait_condition(
                        exit_task.done, timeout=remaining, timeout_summary="busy runner to finish"
                    )
                except TimeoutError:
                    pass
        if exit_task is not None:
            await _cancel_quietly(exit_task)
        if container is not None:
            await workflow.execute_activity_method(
                ContainerActivities.terminate,
                container,
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=CLEANUP_RETRY,
                summary=f"terminate {track.name}",
                task_queue=container.task_queue,
            )

    async def _deregister(self, track: _RunnerTrack, minted: MintedRunner) -> DeregisterOutcome:
        return await workflow.execute_activity_method(
            GitHubActivities.deregister_runner,
            RunnerRef(runner_name=track.name, runner_id=minted.runner_id),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=CLEANUP_RETRY,
            summary=f"deregister {track.name}",
            task_queue=self._github_queue(),
        )


def _exited(task: asyncio.Task[ContainerExit]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _exit_code(task: asyncio.Task[ContainerExit]) -> int | None:
    return task.result().exit_code if _exited(task) else None


async def _cancel_quietly(task: asyncio.Task[Any]) -> None:
    if not task.done():
        task.cancel()
    try:
        await task
    except (ActivityError, asyncio.CancelledError):
        pass
