"""RunnerJob: one workflow per GitHub `workflow_job`, from queued to its runner confirmed gone.

Runners are not bound to jobs: GitHub gives a queued job to any idle runner with matching
labels. So this workflow's goal is "my job gets a runner, and every runner I start is
eventually deregistered and terminated". It keeps starting runners while its job is still
queued, and reaps its runner once that runner is surplus.

Webhooks are hints: they get lost, duplicated and reordered. Whenever the workflow would act
on a belief that a lost webhook could have made stale (starting another runner, reaping an
idle one, waiting long), it asks GitHub first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.github import GitHubActivities
    from mayfly import metrics, search_attributes
    from mayfly.models import (
        RUNNER_JOB_WORKFLOW,
        ContainerExit,
        ContainerRef,
        DeregisterOutcome,
        GitHubJobStatus,
        JobEvent,
        JobOutcome,
        JobPhase,
        JobRef,
        JobStatus,
        MintedRunner,
        RunnerJobCarry,
        RunnerJobInput,
        RunnerJobResult,
        RunnerJobState,
        RunnerRef,
        owner_job_of,
        runner_name_for,
    )
    from workflows import runner_steps as steps
    from workflows.runner_steps import cancel_quietly as _cancel_quietly
    from workflows.runner_steps import exit_code as _exit_code
    from workflows.runner_steps import exited as _exited
    from workflows.runner_steps import throttled_for as _throttled_for
    from workflows.shield import uncancellable
    from workflows.slot_lease import SlotLease

T = TypeVar("T")

# Failures that no new runner attempt can fix: stop and say why.
PERMANENT_ERROR_TYPES = frozenset(
    {"GitHubHTTP401", "GitHubHTTP403", "GitHubHTTP404", "GitHubHTTP422", "UnknownPool"}
)
FINISHED_EXIT_GRACE = timedelta(seconds=60)
# Runners started together take the queued jobs in the order they come online, not the order of
# the jobs they were started for: a runner of ours that took another job of ours left that job
# without one. The runner still starting for the job it took is kept for such a job, and the job
# waits this long for it (a webhook saying so) before it asks GitHub and takes a slot again.
SWAP_WEBHOOK_WAIT = timedelta(seconds=3)
# GitHub gives a queued job to an idle runner within moments: a spare still idle this long
# after it came online has no job left to take.
SPARE_IDLE_LIMIT = timedelta(seconds=5)
_JOB_ORDER: dict[str, int] = {"unknown": -1, "waiting": 0, "queued": 1, "in_progress": 2, "completed": 3}
# GitHub's states before a job is queued; none of them can take a runner yet.
_NOT_YET_QUEUED = frozenset({"waiting", "pending", "requested"})


@dataclass
class _RunnerTrack:
    name: str
    online: bool = False
    assigned_job: int | None = None
    finished: bool = False
    finished_at: datetime | None = None
    reaped_idle: bool = False
    # GitHub gave it another job while ours still needs a runner: it finishes that job in the
    # background, under its own slot, while the workflow's phase follows the job's next runner.
    detached: bool = False
    # Our job went to a runner started for another job of ours, which is left without one: this
    # runner, not yet busy then, is kept for it (it takes the oldest queued job) instead of
    # being torn down as surplus while a new one is started for that job.
    spare_since: datetime | None = None
    spare_expired: bool = False


@dataclass
class _SlotUnit:
    """One slot and the runners started under it, in turn."""

    lease: SlotLease
    # Its runner took another job while ours stayed queued. The runner keeps this slot until it
    # is gone, and the job gets a runner under a new slot: otherwise a long job could hold our
    # job's only runner while our job waits in the queue, stranded.
    handed_off: bool = False


class _MintAhead:
    """The JIT config of a slot's first runner, minted while the job still waits for the slot
    once the semaphore says it is near: registering then costs the held slot nothing. Claimed
    by that runner, or deregistered when the slot ends without it."""

    def __init__(
        self, name: str, mint: Callable[[_MintAhead], Coroutine[None, None, MintedRunner | None]]
    ) -> None:
        self.name = name
        self.minting = False
        self.claimed = False
        self.task = asyncio.create_task(mint(self))


def _permanent(error: ActivityError) -> bool:
    cause = error.cause
    return isinstance(cause, ApplicationError) and cause.non_retryable and cause.type in PERMANENT_ERROR_TYPES


def _as_status(github_status: str) -> JobStatus:
    if github_status in _NOT_YET_QUEUED:
        return "waiting"
    if github_status in ("queued", "in_progress", "completed"):
        return github_status  # type: ignore[return-value]
    return "unknown"


class _ContinueAsNew(Exception):
    """Raised where the history is long enough, caught where no slot or runner is held."""


@workflow.defn(name=RUNNER_JOB_WORKFLOW)
class RunnerJobWorkflow:
    @workflow.init
    def __init__(self, params: RunnerJobInput) -> None:
        self._params = params
        carry = params.carry
        self._job_status: JobStatus = carry.job_status if carry else "unknown"
        self._served_by: str | None = carry.served_by if carry else None
        self._runners_started = carry.runners_started if carry else 0
        self._failed_attempts = carry.failed_attempts if carry else 0
        self._clean_exits_unseen = carry.clean_exits_unseen if carry else 0
        self._last_error: str | None = carry.last_error if carry else None
        self._first_started_at = carry.first_started_at if carry else workflow.info().start_time
        self._deadline = (
            carry.deadline if carry else self._first_started_at + timedelta(seconds=params.job_deadline_s)
        )
        self._slot_held_before_s = carry.slot_held_s if carry else 0.0
        self._runner_s = carry.runner_s if carry else 0.0
        self._ask_before_next_slot = False
        self._lease: SlotLease | None = None
        self._leases_taken = 0
        self._phase = JobPhase.QUEUED
        self._phase_details = ""
        self._runner: _RunnerTrack | None = None
        self._tracks: dict[str, _RunnerTrack] = {}
        self._handed_off: list[asyncio.Task[None]] = []
        # Registration polls cancelled when a webhook won; settled before the workflow ends.
        self._settling: list[asyncio.Task[Any]] = []
        self._events_seen = 0
        self._runner_attribute: str | None = None
        self._instruments: metrics.JobMetrics | None = None

    # --- messages -------------------------------------------------------------------------

    @workflow.signal
    def job_event(self, event: JobEvent) -> None:
        self._events_seen += 1
        if event.job_id == self._params.job.job_id:
            self._learn(event.action, event.runner_name)
        track = self._tracks.get(event.runner_name or "")
        if track is not None:
            track.online = True
            if event.action in ("in_progress", "completed"):
                track.assigned_job = event.job_id
            if event.action == "completed" and not track.finished:
                track.finished = True
                track.finished_at = workflow.now()

    @workflow.query
    def state(self) -> RunnerJobState:
        return RunnerJobState(
            job_id=self._params.job.job_id,
            pool=self._params.job.pool,
            phase=self._phase,
            job_status=self._job_status,
            served_by=self._served_by,
            slot_held=self._lease is not None and self._lease.granted,
            current_runner=self._runner.name if self._runner else None,
            runners_spawned=self._runners_started,
            registration_failures=self._failed_attempts,
            last_error=self._last_error,
        )

    # --- what the workflow knows ----------------------------------------------------------

    def _learn(self, status: str, runner_name: str | None) -> None:
        """Statuses only move forward, so a late or reordered report never undoes a newer one."""
        learned = _as_status(status)
        if _JOB_ORDER[learned] > _JOB_ORDER[self._job_status]:
            self._job_status = learned
        if runner_name and status in ("in_progress", "completed"):
            self._served_by = runner_name
            runner = self._runner
            if (
                self._swapped_with() is not None
                and runner is not None
                and runner.assigned_job is None
                and runner.spare_since is None
            ):
                runner.spare_since = workflow.now()

    def _swapped_with(self) -> int | None:
        """The job of ours whose runner took this job, if one did."""
        if self._served_by is None:
            return None
        owner = owner_job_of(self._served_by, self._params.recipe.runner_name_prefix)
        return owner if owner != self._params.job.job_id else None

    def _job_needs_runner(self) -> bool:
        return self._job_status == "queued"

    def _job_closed(self) -> bool:
        return self._job_status in ("in_progress", "completed")

    async def _ask_github(self, why: str) -> None:
        """Refresh the job's status from GitHub. A failed check leaves the belief as it was:
        the next check, a webhook or the deadline settles it."""
        job = self._params.job
        if not job.repository:
            return
        try:
            status: GitHubJobStatus = await self._github_call(
                lambda: steps.on_github(
                    GitHubActivities.job_status,
                    JobRef(repository=job.repository, job_id=job.job_id, scope=job.scope),
                    summary=f"ask GitHub about job {job.job_id} ({why})",
                    github_queue=self._github_queue(),
                    give_up_after=timedelta(minutes=2),
                )
            )
        except ActivityError as error:
            if is_cancelled_exception(error):
                raise
            self._last_error = f"asking GitHub about job {job.job_id} failed: {error.cause or error}"
            return
        if not status.found:
            # Deleted with its run: nothing left to serve.
            self._learn("completed", None)
            return
        self._learn(status.status, status.runner_name)

    # --- plumbing -------------------------------------------------------------------------

    def _metrics(self) -> metrics.JobMetrics:
        if self._instruments is None:
            self._instruments = metrics.JobMetrics(workflow.metric_meter(), self._params.job.pool)
        return self._instruments

    def _attempt_failed(self, cause: str, message: str) -> None:
        self._failed_attempts += 1
        self._last_error = message
        self._metrics().registration_failures.add(1, {"cause": cause})

    def _github_queue(self) -> str | None:
        return self._params.recipe.github_task_queue or None

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
        self._phase_details = details
        workflow.set_current_details(f"**{phase.value}**: {details}")

    def _set_runner_phase(self, track: _RunnerTrack, phase: JobPhase, details: str) -> None:
        # A handed-off runner's end is not where the job is: the job's next runner is.
        if not track.detached:
            self._set_phase(phase, details)

    def _account_usage(self) -> None:
        """The job's slot- and runner-seconds, on the closed workflow (for `mayfly usage`) and as
        metrics, per pool and repository."""
        slot_s, runner_s = self._slot_held_s(), self._runner_s
        workflow.upsert_search_attributes(
            [
                search_attributes.SLOT_SECONDS.value_set(slot_s),
                search_attributes.RUNNER_SECONDS.value_set(runner_s),
            ]
        )
        job = self._params.job
        self._metrics().record_usage(job.scope, job.repository, slot_s=slot_s, runner_s=runner_s)

    def _slot_held_s(self) -> float:
        return self._slot_held_before_s + (self._lease.held_s() if self._lease is not None else 0.0)

    def _result(self, outcome: JobOutcome) -> RunnerJobResult:
        return RunnerJobResult(
            job_id=self._params.job.job_id,
            served_by=self._served_by,
            runners_spawned=self._runners_started,
            registration_failures=self._failed_attempts,
            outcome=outcome,
            slot_held_s=self._slot_held_s(),
            runner_s=self._runner_s,
        )

    def _remaining(self) -> timedelta:
        return self._deadline - workflow.now()

    def _check_deadline(self, doing: str) -> None:
        if self._remaining() > timedelta(0):
            return
        job = self._params.job
        raise ApplicationError(
            f"job {job.job_id} was still {self._job_status} on GitHub {self._params.job_deadline_s:.0f}s "
            f"after its workflow started ({doing}); giving up. Last error: {self._last_error or 'none'}",
            type="JobDeadlineExceeded",
            non_retryable=True,
        )

    def _continue_as_new_due(self) -> bool:
        return workflow.info().is_continue_as_new_suggested()

    async def _github_call(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a GitHub activity; when GitHub asks for a long pause (a rate-limit reset minutes
        away), wait on a durable timer and try again: throttling is not a failure."""
        while True:
            try:
                return await call()
            except ActivityError as error:
                wait = _throttled_for(error)
                if wait is None:
                    raise
            if workflow.now() + wait >= self._deadline:
                self._check_deadline("GitHub's rate limit resets after the deadline")
            resume = workflow.now() + wait
            workflow.set_current_details(
                f"**{self._phase.value}**: {self._phase_details} (GitHub rate limit: next call at "
                f"{resume:%H:%M:%S} UTC)"
            )
            await workflow.sleep(wait, summary="GitHub rate limit reset")
            workflow.set_current_details(f"**{self._phase.value}**: {self._phase_details}")

    async def _finish_despite_cancel(self, activity: asyncio.Task[T], *, stop_it: bool) -> T:
        return await steps.finish_despite_cancel(activity, stop_it=stop_it)

    # --- main -----------------------------------------------------------------------------

    @workflow.run
    async def run(self, params: RunnerJobInput) -> RunnerJobResult:
        try:
            result = self._result(await self._serve())
            self._account_usage()
            return result
        except _ContinueAsNew:
            workflow.continue_as_new(self._carry_over())
        except BaseException as error:
            if is_cancelled_exception(error) or isinstance(error, (ApplicationError, ActivityError)):
                self._account_usage()
            if is_cancelled_exception(error):
                self._set_phase(JobPhase.CANCELLED, "cancelled on request; every runner it started is gone")
                # An activity's cancellation surfaces as an ActivityError; the workflow itself
                # must end as Cancelled, not Failed.
                raise asyncio.CancelledError("RunnerJob cancelled") from None
            # Eviction is not a failure of the job; anything else is, and the UI should say so.
            if isinstance(error, (ApplicationError, ActivityError)):
                self._set_phase(JobPhase.FAILED, f"{type(error).__name__}: {error}")
            raise

    def _carry_over(self) -> RunnerJobInput:
        carry = RunnerJobCarry(
            job_status=self._job_status,
            served_by=self._served_by,
            runners_started=self._runners_started,
            failed_attempts=self._failed_attempts,
            clean_exits_unseen=self._clean_exits_unseen,
            last_error=self._last_error,
            first_started_at=self._first_started_at,
            deadline=self._deadline,
            slot_held_s=self._slot_held_s(),
            runner_s=self._runner_s,
        )
        return self._params.model_copy(update={"carry": carry})

    async def _serve(self) -> JobOutcome:
        evicted = False
        try:
            return await self._serve_job()
        except GeneratorExit:
            evicted = True  # not ended: the next replay waits for what is still running
            raise
        finally:
            if not evicted:
                # Runners handed off to other jobs still hold slots: the workflow (and its
                # continue-as-new, which must not carry a held slot) waits until they are gone.
                await uncancellable(self._settle_handed_off())
                await uncancellable(steps.settle(self._settling))

    async def _settle_handed_off(self) -> None:
        if not self._handed_off:
            return
        # Details only: the job's phase (and its metric) is already final.
        workflow.set_current_details(
            f"**{self._phase.value}**: {self._phase_details}; waiting for {len(self._handed_off)} "
            "runner(s) of ours to finish jobs GitHub gave them"
        )
        await workflow.wait(self._handed_off)
        workflow.set_current_details(f"**{self._phase.value}**: {self._phase_details}")
        failures = [t.exception() for t in self._handed_off if not t.cancelled() and t.exception()]
        self._handed_off = []
        if failures and failures[0] is not None:
            raise failures[0]

    async def _serve_job(self) -> JobOutcome:
        if self._job_status == "unknown":
            await self._ask_github("started without a webhook")
        while True:
            if self._job_status == "waiting":
                await self._wait_for_approval()
                continue
            if self._job_status != "queued":
                break
            if self._ask_before_next_slot:
                # Our last runner ran some job and we have not heard which: most likely ours,
                # taken by the runner of the job ours took (kept for us) or with its webhooks
                # still on the way. Asked without holding a slot.
                self._ask_before_next_slot = False
                if not await self._job_taken_within(SWAP_WEBHOOK_WAIT):
                    await self._ask_github("a runner of ours ran a job; was it this one?")
                continue
            await self._serve_with_slot()
            if self._continue_as_new_due() and self._job_needs_runner():
                raise _ContinueAsNew
        if self._runners_started == 0 and self._served_by is None:
            self._set_phase(JobPhase.DONE, f"the job was already {self._job_status} without a runner of ours")
            return "cancelled-before-start" if self._job_status == "completed" else "served-elsewhere"
        self._set_phase(JobPhase.DONE, f"served by `{self._served_by or 'a runner GitHub did not name'}`")
        return "served" if self._runners_started else "served-elsewhere"

    async def _job_taken_within(self, wait: timedelta) -> bool:
        if self._remaining() <= timedelta(0):
            return False
        try:
            await workflow.wait_condition(
                lambda: not self._job_needs_runner(),
                timeout=min(wait, self._remaining()),
                timeout_summary="a webhook says which runner took the job",
            )
        except TimeoutError:
            return False
        return True

    async def _wait_for_approval(self) -> None:
        """A job held by an environment protection rule can take no runner: hold nothing until
        it is approved, asking GitHub now and then in case the `queued` webhook is lost."""
        interval = timedelta(seconds=self._params.recipe.status_check_interval_s)
        self._set_phase(
            JobPhase.WAITING_FOR_APPROVAL, "the job waits for a deployment approval; no slot held"
        )
        while self._job_status == "waiting":
            self._check_deadline("waiting for approval")
            if self._continue_as_new_due():
                raise _ContinueAsNew
            try:
                await workflow.wait_condition(
                    lambda: self._job_status != "waiting",
                    timeout=min(interval, self._remaining()),
                    timeout_summary="ask GitHub whether the job was approved",
                )
            except TimeoutError:
                await self._ask_github("still waiting for approval?")

    async def _serve_with_slot(self) -> None:
        """Hold a slot while starting runners for the queued job, until it needs none."""
        self._leases_taken += 1
        # A released request id is never granted again (the semaphore remembers it, so a late
        # duplicate cannot take a slot nobody gives back): each slot in turn gets its own key.
        key = "" if self._leases_taken == 1 else f"slot{self._leases_taken}"
        # A job asking again had its runner taken by another job, which left the queue for it.
        unit = _SlotUnit(
            lease=SlotLease(
                self._params.job.pool,
                key=key,
                front=self._leases_taken > 1,
                job_id=self._params.job.job_id,
            )
        )
        self._lease = unit.lease
        held = asyncio.create_task(self._hold(unit))
        try:
            await workflow.wait_condition(lambda: held.done() or unit.handed_off)
        except asyncio.CancelledError:
            # The cancel goes to the slot's own task, whose teardown runs to its end.
            held.cancel()
            await workflow.wait([held])
            raise
        if held.done():
            await held
            return
        self._handed_off.append(held)
        # Most likely our job is still queued; a lagging webhook may say otherwise. Asked
        # before the next slot, holding none.
        self._ask_before_next_slot = True

    async def _hold(self, unit: _SlotUnit) -> None:
        try:
            # The slot goes back when this block ends, after every container of ours is gone.
            async with unit.lease:
                await self._hold_slot(unit)
        finally:
            self._slot_held_before_s += unit.lease.held_s()
            if self._lease is unit.lease:
                self._lease = None

    async def _hold_slot(self, unit: _SlotUnit) -> None:
        params = self._params
        ahead = _MintAhead(
            runner_name_for(params.recipe.runner_name_prefix, params.job.job_id, self._runners_started + 1),
            lambda ahead: self._mint_ahead(unit.lease, ahead),
        )
        try:
            await self._hold_slot_runners(unit, ahead)
        finally:
            await uncancellable(self._discard_mint_ahead(ahead))

    async def _mint_ahead(self, lease: SlotLease, ahead: _MintAhead) -> MintedRunner | None:
        await workflow.wait_condition(lambda: lease.soon or lease.granted or not self._job_needs_runner())
        if lease.granted or not self._job_needs_runner():
            return None  # granted at once (the pool was not full): minted the usual way
        ahead.minting = True
        return await self._github_call(lambda: self._start_mint(ahead.name))

    async def _discard_mint_ahead(self, ahead: _MintAhead) -> None:
        if ahead.claimed:
            return
        if not ahead.minting:
            ahead.task.cancel()
            await workflow.wait([ahead.task])
            return
        try:
            minted = await ahead.task
        except ActivityError:
            minted = None  # it may have registered all the same: deregistered by name
        try:
            await self._deregister(
                RunnerRef(
                    runner_name=ahead.name,
                    runner_id=minted.runner_id if minted else None,
                    scope=self._params.job.scope,
                )
            )
        except ActivityError as error:
            # Never spawned, so never busy: the sweeper deletes it once this workflow is closed.
            workflow.logger.info(
                "unused runner %s not deregistered: %s", ahead.name, error, extra={"runner": ahead.name}
            )

    async def _mint(self, track: _RunnerTrack, ahead: _MintAhead | None) -> MintedRunner:
        if ahead is not None and ahead.minting and not ahead.claimed and ahead.name == track.name:
            ahead.claimed = True
            minted = await ahead.task
            if minted is not None:
                return minted
        return await self._github_call(lambda: self._start_mint(track.name))

    def _start_mint(self, name: str) -> Awaitable[MintedRunner]:
        return self._finish_despite_cancel(steps.start_mint(self._params.recipe, name), stop_it=False)

    async def _hold_slot_runners(self, unit: _SlotUnit, ahead: _MintAhead) -> None:
        lease = unit.lease
        job = self._params.job
        interval = timedelta(seconds=self._params.recipe.status_check_interval_s)
        self._set_phase(JobPhase.WAITING_FOR_SLOT, f"a slot in pool `{job.pool}`")
        self._check_deadline("waiting for a slot")
        while not await lease.acquire(
            give_up=lambda: not self._job_needs_runner(), wait_at_most=min(interval, self._remaining())
        ):
            if not self._job_needs_runner():
                return
            self._check_deadline("waiting for a slot")
            await self._ask_github("still queued while waiting for a slot?")
            if self._continue_as_new_due() and self._job_needs_runner():
                return
        first_in_slot = True
        while self._job_needs_runner():
            if self._runners_started > 0 and not first_in_slot:
                # A runner of ours failed to register; lost webhooks may hide that the job
                # was served meanwhile, and another runner would only idle.
                await self._ask_github("before starting another runner")
                if not self._job_needs_runner():
                    break
            self._check_deadline("starting runners")
            if self._failed_attempts >= self._params.max_registration_attempts:
                raise ApplicationError(
                    f"no runner registered for job {job.job_id} after {self._failed_attempts} attempts; "
                    f"last error: {self._last_error}",
                    type="RegistrationFailed",
                    non_retryable=True,
                )
            first_in_slot = False
            ran_a_job = await self._run_one_runner(unit, ahead)
            if unit.handed_off:
                return
            if ran_a_job and self._job_needs_runner():
                self._ask_before_next_slot = True
                return
            if self._continue_as_new_due():
                return

    async def _run_one_runner(self, unit: _SlotUnit, ahead: _MintAhead | None) -> bool:
        """Start one runner and see it gone; True if it ran some job (which may be ours)."""
        params = self._params
        job = params.job
        self._runners_started += 1
        track = _RunnerTrack(
            name=runner_name_for(params.recipe.runner_name_prefix, job.job_id, self._runners_started)
        )
        self._runner = track
        self._tracks[track.name] = track
        minted: MintedRunner | None = None
        container: ContainerRef | None = None
        spawn_tried = False
        exit_task: asyncio.Task[ContainerExit] | None = None
        spawned_at = spawn_started = workflow.now()
        try:
            self._set_phase(JobPhase.MINTING, f"a JIT config for `{track.name}`")
            minted = await self._mint(track, ahead)
            self._set_phase(JobPhase.SPAWNING, f"container `{track.name}`")
            spawn_tried = True
            spawn_started = workflow.now()
            container = await steps.spawn(
                job.pool, minted, track.name, job.job_id, params.recipe.max_lifetime_s
            )
            self._metrics().webhook_to_spawn.record((workflow.now() - self._first_started_at).total_seconds())
            exit_task = self._watch(container)
            self._set_phase(JobPhase.REGISTERING, f"`{track.name}` to come online")
            if not await self._confirm_registration(track, minted, exit_task):
                if self._surplus(track):
                    # Our job went to another runner while ours was still connecting: waiting
                    # for it to come online would only hold the slot until the next poll.
                    return False
                return self._registration_not_seen(track, exit_task)
            self._set_phase(JobPhase.RUNNING, f"`{track.name}` is online")
            await self._wait_until_runner_done(track, exit_task, spawned_at, unit)
        except ActivityError as error:
            if is_cancelled_exception(error) or _permanent(error):
                raise
            cause = "mint" if minted is None else "spawn"
            self._attempt_failed(cause, f"{track.name}: {error.cause or error}")
        finally:
            await uncancellable(
                self._teardown(track, minted, container if container else spawn_tried, exit_task, spawned_at)
            )
            if spawn_tried:
                # From asking for the container to its confirmed end: what a provider bills.
                self._runner_s += (workflow.now() - spawn_started).total_seconds()
        if track.reaped_idle and track.assigned_job is None:
            # An idle runner reaped while the job was still queued counts against the budget:
            # otherwise a job no runner can take would mint a new one every idle TTL, forever.
            self._attempt_failed("idle", f"{track.name} stayed idle for {params.idle_ttl_s:.0f}s")
        return track.assigned_job is not None or (exit_task is not None and _exit_code(exit_task) == 0)

    def _registration_not_seen(self, track: _RunnerTrack, exit_task: asyncio.Task[ContainerExit]) -> bool:
        """Account for a runner never seen online; True if its clean exit says it ran a job."""
        params = self._params
        if _exit_code(exit_task) == 0:
            # The listener exits 0 only after a job (or once its registration is gone): it ran
            # some job before its webhooks arrived. Not a failed registration.
            self._clean_exits_unseen += 1
            if self._clean_exits_unseen > params.max_registration_attempts * 3:
                raise ApplicationError(
                    f"{self._clean_exits_unseen} runners for job {params.job.job_id} exited cleanly without "
                    "ever being seen online; are webhooks reaching the starter?",
                    type="RunnersVanish",
                    non_retryable=True,
                )
            return True
        cause = "exited" if exit_task.done() else "timeout"
        self._attempt_failed(
            cause, f"{track.name} did not come online within {params.recipe.registration_timeout_s:.0f}s"
        )
        return False

    def _surplus(self, track: _RunnerTrack) -> bool:
        """Our job went to another runner (or was cancelled) and this one has no job of its own,
        nor is it kept for the job whose runner took ours."""
        kept = track.spare_since is not None and not track.spare_expired
        return track.assigned_job is None and not self._job_needs_runner() and not kept

    async def _confirm_registration(
        self, track: _RunnerTrack, minted: MintedRunner, exit_task: asyncio.Task[ContainerExit]
    ) -> bool:
        """Online means a webhook named the runner, or GitHub lists it online."""
        status = await steps.poll_until_registered(
            self._params.recipe,
            track.name,
            minted,
            lambda: track.online or exit_task.done() or self._surplus(track),
            self._settling.append,
        )
        if status is not None:
            track.online = track.online or status.online or status.busy
        return track.online

    async def _wait_until_runner_done(
        self,
        track: _RunnerTrack,
        exit_task: asyncio.Task[ContainerExit],
        spawned_at: datetime,
        unit: _SlotUnit,
    ) -> None:
        params = self._params
        registered_at = workflow.now()
        lifetime_end = spawned_at + timedelta(seconds=params.recipe.max_lifetime_s)
        idle_end = registered_at + timedelta(seconds=params.idle_ttl_s)
        check_every = timedelta(seconds=params.recipe.status_check_interval_s)
        next_check = registered_at + check_every

        def surplus() -> bool:
            return self._surplus(track)

        job_id = params.job.job_id
        while not exit_task.done() and not surplus():
            if track.spare_since is not None and track.assigned_job is None:
                spare_end = max(track.spare_since, registered_at) + SPARE_IDLE_LIMIT
                if workflow.now() >= spare_end:
                    track.spare_expired = True
                    continue
                self._set_phase(
                    JobPhase.RUNNING,
                    f"`{track.name}` is kept for job {self._swapped_with()}, whose runner took this job",
                )
                await self._wait_for_runner_news(track, exit_task, spare_end, "a job for the spare runner")
                continue
            if track.assigned_job not in (None, job_id) and self._job_needs_runner() and not unit.handed_off:
                track.detached = unit.handed_off = True
                workflow.logger.info(
                    "%s took job %s while job %s is still queued: it finishes that job under its own "
                    "slot, and job %s gets a new runner",
                    track.name,
                    track.assigned_job,
                    job_id,
                    job_id,
                    extra={"runner": track.name},
                )
            now = workflow.now()
            if now >= lifetime_end:
                self._last_error = f"{track.name} reaped at its max lifetime"
                return
            idle = track.assigned_job is None
            if idle and now >= idle_end:
                # A lost webhook can hide that our job was served elsewhere; GitHub knows.
                await self._ask_github(f"{track.name} idle for {params.idle_ttl_s:.0f}s")
                if surplus() or track.assigned_job is not None:
                    continue
                track.reaped_idle = True
                self._last_error = (
                    f"{track.name} reaped: idle for {params.idle_ttl_s:.0f}s while the job stayed queued"
                )
                return
            if idle and now >= next_check:
                await self._ask_github(f"{track.name} idle, is the job still queued?")
                next_check = workflow.now() + check_every
                continue
            deadline = lifetime_end
            if idle:
                deadline = min(deadline, idle_end, next_check)
            if track.finished_at is not None:
                deadline = min(deadline, track.finished_at + FINISHED_EXIT_GRACE)
                if now >= track.finished_at + FINISHED_EXIT_GRACE:
                    self._last_error = f"{track.name} did not exit after its job; reaped"
                    return
            await self._wait_for_runner_news(track, exit_task, deadline, "runner idle/lifetime limit")

    async def _wait_for_runner_news(
        self, track: _RunnerTrack, exit_task: asyncio.Task[ContainerExit], until: datetime, summary: str
    ) -> None:
        """Until the runner exits or is surplus, a webhook arrives, or `until`."""
        seen = self._events_seen
        try:
            await workflow.wait_condition(
                lambda: exit_task.done() or self._surplus(track) or self._events_seen != seen,
                timeout=until - workflow.now(),
                timeout_summary=summary,
            )
        except TimeoutError:
            pass

    async def _teardown(
        self,
        track: _RunnerTrack,
        minted: MintedRunner | None,
        container: ContainerRef | bool,
        exit_task: asyncio.Task[ContainerExit] | None,
        spawned_at: datetime,
    ) -> None:
        """Deregister, then terminate, whatever happened before; runs to its end even when cancelled.

        `container` is the spawned container's reference, or True when a spawn was tried and
        failed: it may have created the container before failing, so it is terminated by name."""
        self._set_runner_phase(track, JobPhase.TEARING_DOWN, f"`{track.name}`")
        lifetime_end = spawned_at + timedelta(seconds=self._params.recipe.max_lifetime_s)
        # An ephemeral runner that took a job and then exited, or whose listener exited cleanly
        # (it does so only after its job or once its registration is gone), has been removed by
        # GitHub already; deleting it again would only cost an API call. Webhooks can lag the
        # exit under load, so the exit code counts too. The sweeper catches the odd leftover.
        ran_and_exited = (
            exit_task is not None
            and _exited(exit_task)
            and (track.assigned_job is not None or _exit_code(exit_task) == 0)
        )
        # Deregister first: GitHub refuses to delete a busy runner, and deleting an idle one
        # guarantees it takes no job while its container is being stopped. A mint that failed or
        # was cancelled may still have registered the runner, so it is looked up by name then.
        if not (track.finished or ran_and_exited):
            ref = RunnerRef(
                runner_name=track.name,
                runner_id=minted.runner_id if minted else None,
                scope=self._params.job.scope,
            )

            async def took_a_job() -> None:
                if track.assigned_job is None:
                    track.assigned_job = -1
                self._set_runner_phase(
                    track, JobPhase.TEARING_DOWN, f"`{track.name}` finishes the job it took"
                )

            exit_task, failure = await steps.deregister_letting_a_job_finish(
                lambda: self._deregister(ref),
                exit_task,
                lambda: self._watch(self._container_ref(track, container)) if container else None,
                took_a_job,
                lifetime_end,
            )
            if failure is not None:
                self._last_error = f"deregistering {track.name} failed, terminating anyway: {failure}"
                workflow.logger.warning(self._last_error, extra={"runner": track.name})
        if exit_task is not None:
            await _cancel_quietly(exit_task)
        # A watcher can also return because the backend lost track of the container (seen at
        # 150 runners): only an exit it saw and cleaned up spares the terminate.
        if container and not steps.confirmed_gone(exit_task):
            await steps.terminate(self._container_ref(track, container))

    def _container_ref(self, track: _RunnerTrack, container: ContainerRef | bool) -> ContainerRef:
        """The spawned container's reference, or one by name for a spawn that failed or was
        cancelled (it may still have created the container)."""
        if isinstance(container, ContainerRef):
            return container
        return ContainerRef(pool=self._params.job.pool, name=track.name, backend_id="")

    def _watch(self, container: ContainerRef) -> asyncio.Task[ContainerExit]:
        return steps.watch(container, self._params.recipe.max_lifetime_s)

    async def _deregister(self, ref: RunnerRef) -> DeregisterOutcome:
        return await self._github_call(lambda: steps.deregister(ref, self._github_queue()))
