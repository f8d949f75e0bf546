"""Webhooks are hints, GitHub is the truth: lost deliveries, approvals, cancellation in every
phase, refused deregistration, rate-limit resets, stranded and never-served jobs."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError

from bench.phases import is_slot_release
from mayfly.app.embedded import DEMO_LABELS, EmbeddedStack
from mayfly.backends import ContainerBackend, ContainerRecord, ContainerState
from mayfly.github import GitHubClient, WorkflowJob
from mayfly.models import DEFAULT_SCOPE, JobPhase, RunnerJobResult, job_workflow_id
from simulator import FaultConfig
from simulator.runner import START_DELAY_ENV
from tests.backends import DelegatingBackend
from tests.jobs import in_phase, job_handle, nothing_left, phase, until

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
StackFactory = Callable[..., Awaitable[EmbeddedStack]]


async def containers_running(stack: EmbeddedStack, job_id: int) -> list[str]:
    return [
        r.name for r in await stack.backend.list() if r.job_id == job_id and r.state is ContainerState.RUNNING
    ]


async def terminated_before_release(handle: WorkflowHandle[Any, Any]) -> bool:
    """In the workflow's own history, every slot release comes after each container was
    confirmed gone: by a terminate, or by the watcher that saw it exit. Only a container's first
    confirmation counts: a watcher cancelled before the terminate may still record its own
    completion later, after the slot went back, and that says nothing about the order."""
    events = (await handle.fetch_history()).events
    container_of: dict[int, str] = {}
    for e in events:
        if e.event_type != EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            continue
        scheduled = e.activity_task_scheduled_event_attributes
        if scheduled.activity_type.name in ("containers.terminate", "containers.wait_exit"):
            container_of[e.event_id] = json.loads(scheduled.input.payloads[0].data)["name"]
    first_gone: dict[str, int] = {}
    for e in events:
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            name = container_of.get(e.activity_task_completed_event_attributes.scheduled_event_id)
            if name is not None:
                first_gone.setdefault(name, e.event_id)
    releases = [e.event_id for e in events if is_slot_release(e)]
    return bool(first_gone) and bool(releases) and min(releases) > max(first_gone.values())


async def test_lost_in_progress_and_completed_webhooks_end_each_workflow_with_one_runner(
    stack_factory: StackFactory,
) -> None:
    # Every in_progress/completed delivery is lost: each workflow learns how its job ended only
    # from GitHub, and must not start a second runner for a job that is already done.
    stack = await stack_factory(
        max_runners=3,
        idle_ttl_s=4.0,
        job_status_check_interval_s=2.0,
        faults=FaultConfig(webhook_drop_rate=1.0, webhook_drop_actions=["in_progress", "completed"]),
    )
    job_ids = stack.queue_jobs(3, duration_s=1.0)
    sim = stack.simulator
    await sim.wait_for(lambda: all(sim.job(j).status == "completed" for j in job_ids), 60)
    results: list[RunnerJobResult] = []
    async with asyncio.timeout(60):
        for job_id in job_ids:
            results.append(RunnerJobResult.model_validate(await job_handle(stack, job_id).result()))
    lookups = sim.calls["GET /repos/{owner}/{repo}/actions/jobs/{job_id}"]
    print(f"\nlost webhooks: runners per job {[r.runners_spawned for r in results]}, job lookups {lookups}")
    assert all(sim.job(j).conclusion == "success" for j in job_ids)
    assert [r.runners_spawned for r in results] == [1, 1, 1], "no runner for a job that was already served"
    assert lookups >= 3, "each workflow asked GitHub"
    await until(lambda: nothing_left(stack))


async def test_a_waiting_job_holds_no_slot_and_no_runner_until_approved(stack_factory: StackFactory) -> None:
    stack = await stack_factory(max_runners=1)
    sim = stack.simulator
    job_id = sim.queue_job(DEMO_LABELS, duration_s=1.0, needs_approval=True)
    await until(in_phase(stack, job_id, JobPhase.WAITING_FOR_APPROVAL))
    semaphore = await stack.semaphore_status_or_none()
    assert semaphore is None or (semaphore.holders == [] and semaphore.waiters == [])
    assert await stack.backend.list() == [] and sim.runners() == []
    sim.approve_job(job_id)
    result = RunnerJobResult.model_validate(await job_handle(stack, job_id).result())
    assert result.outcome == "served" and sim.job(job_id).conclusion == "success"
    await until(lambda: nothing_left(stack))


class GatedBackend(DelegatingBackend):
    """Holds a spawn (after the container exists) or a terminate until the test opens the gate."""

    def __init__(self, inner: ContainerBackend) -> None:
        super().__init__(inner)
        self.hold_spawn = False
        self.hold_terminate = False
        self.gate = asyncio.Event()

    async def spawn(
        self, *, name: str, owner_workflow_id: str, job_id: int, jit_config: str, max_lifetime_s: float
    ) -> ContainerRecord:
        record = await super().spawn(
            name=name,
            owner_workflow_id=owner_workflow_id,
            job_id=job_id,
            jit_config=jit_config,
            max_lifetime_s=max_lifetime_s,
        )
        if self.hold_spawn:
            await self.gate.wait()
        return record

    async def terminate(self, name: str) -> ContainerRecord | None:
        if self.hold_terminate:
            await self.gate.wait()
        return await super().terminate(name)


CANCEL_PHASES = [
    JobPhase.WAITING_FOR_SLOT,
    JobPhase.MINTING,
    JobPhase.SPAWNING,
    JobPhase.REGISTERING,
    JobPhase.RUNNING,
    JobPhase.TEARING_DOWN,
]


@pytest.mark.parametrize("cancel_in", CANCEL_PHASES, ids=[p.value for p in CANCEL_PHASES])
async def test_cancel_in_every_phase_tears_down_in_order_and_ends_cancelled(
    stack_factory: StackFactory, cancel_in: JobPhase
) -> None:
    gated: list[GatedBackend] = []

    def wrap(inner: ContainerBackend) -> ContainerBackend:
        gated.append(GatedBackend(inner))
        return gated[0]

    never_registers = cancel_in in (JobPhase.REGISTERING, JobPhase.TEARING_DOWN)
    stack = await stack_factory(
        max_runners=1,
        wrap_backend=wrap,
        # A runner that never comes online is torn down with a terminate (one that ran its job
        # and exited needs none), which the gate can hold.
        runner_command=SLEEPER if never_registers else None,
        registration_timeout_s=2.0 if cancel_in is JobPhase.TEARING_DOWN else 60.0,
    )
    sim, gate = stack.simulator, gated[0]
    holder: int | None = None
    if cancel_in is JobPhase.WAITING_FOR_SLOT:
        # The only runner has taken the first job, so it cannot serve the second behind our back.
        (holder,) = stack.queue_jobs(1, duration_s=4.0)
        await until(in_phase(stack, holder, JobPhase.RUNNING))
    elif cancel_in is JobPhase.MINTING:
        sim.set_faults(FaultConfig(slow_rate=1.0, slow_seconds=3.0))
    gate.hold_spawn = cancel_in is JobPhase.SPAWNING
    gate.hold_terminate = cancel_in is JobPhase.TEARING_DOWN
    (job_id,) = stack.queue_jobs(1, duration_s=5.0 if cancel_in is JobPhase.RUNNING else 1.0)
    await until(in_phase(stack, job_id, cancel_in))
    if cancel_in is JobPhase.RUNNING:
        await sim.wait_for(lambda: sim.job(job_id).status == "in_progress", 30)
    handle = job_handle(stack, job_id)
    await handle.cancel()
    sim.set_faults(FaultConfig())
    gate.hold_terminate = False
    gate.gate.set()

    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert isinstance(failure.value.cause, CancelledError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert await containers_running(stack, job_id) == []
    if cancel_in not in (JobPhase.WAITING_FOR_SLOT, JobPhase.MINTING):
        assert await terminated_before_release(handle), "the slot went back before the container was gone"
    if cancel_in is JobPhase.RUNNING:
        assert sim.job(job_id).conclusion == "success", "a busy runner finishes its job before it is stopped"
        # Refused once while busy; once it has run its job and exited, GitHub has removed it.
        deletes = {
            status: n
            for key, n in sim.calls.items()
            if key.startswith("DELETE ") and (status := key.rsplit(" ", 1)[1]).isdigit()
        }
        assert deletes == {"422": 1}, deletes
    if holder is not None:
        await job_handle(stack, holder).result()
    # A mint cancelled while GitHub was still acting on it may register the runner after the
    # teardown looked; the sweeper removes such a registration once the workflow has closed.
    await until(lambda: nothing_left(stack), within_s=30)


async def test_refused_deregistration_still_terminates_the_container(stack_factory: StackFactory) -> None:
    stack = await stack_factory(
        max_runners=1,
        runner_command=SLEEPER,
        registration_timeout_s=3.0,
        max_registration_attempts=1,
        faults=FaultConfig(deregister_error_status=401),
    )
    (job_id,) = stack.queue_jobs(1)
    handle = job_handle(stack, job_id)
    await stack.wait_workflow_started(job_id)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "RegistrationFailed", cause
    assert await terminated_before_release(handle)
    assert await containers_running(stack, job_id) == []


async def test_a_rate_limit_reset_beyond_the_activity_timeout_delays_the_job_without_failing_it(
    stack_factory: StackFactory,
) -> None:
    # registration_timeout_s=3 gives the mint activity 9 s in all; the reset is further away,
    # so before the fix throttling surfaced as failed registrations.
    stack = await stack_factory(max_runners=1, registration_timeout_s=3.0, max_registration_attempts=2)
    sim = stack.simulator
    sim.exhaust_rate_limit(35.0)
    (job_id,) = stack.queue_jobs(1, duration_s=1.0)
    await stack.wait_workflow_started(job_id)
    result = RunnerJobResult.model_validate(await job_handle(stack, job_id).result())
    throttled = sim.status_codes[403]
    print(
        f"\nrate limit: {throttled} calls answered 403, registration failures {result.registration_failures}"
    )
    assert result.outcome == "served" and result.registration_failures == 0
    assert sim.job(job_id).conclusion == "success" and throttled > 0


async def test_a_job_whose_workflow_failed_while_still_queued_is_restarted_by_the_reconciler(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(max_runners=1, faults=FaultConfig(jit_error_status=403))
    sim = stack.simulator
    (job_id,) = stack.queue_jobs(1, duration_s=1.0)
    first = job_handle(stack, job_id)
    await stack.wait_workflow_started(job_id)
    with pytest.raises(WorkflowFailureError):
        await first.result()
    assert sim.job(job_id).status == "queued"
    sim.set_faults(FaultConfig())
    await sim.wait_for(lambda: sim.job(job_id).status == "completed", 60)
    assert sim.job(job_id).conclusion == "success"
    runs = await stack.client.count_workflows(f'WorkflowId = "{job_workflow_id(job_id)}"')
    assert runs.count == 2
    await job_handle(stack, job_id).result()
    await until(lambda: nothing_left(stack))


async def test_the_reconciler_does_not_restart_a_job_served_since_its_listing_was_taken(
    stack_factory: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At thousands of queued jobs the reconciler's listing is minutes old by the time it reaches
    # the last of them; a job served meanwhile has a closed workflow and must not get another.
    stack = await stack_factory(max_runners=1, reconcile_min_age_s=0.0)
    (job_id,) = stack.queue_jobs(1, duration_s=0.5)
    await stack.wait_workflow_started(job_id)
    taken_while_queued = [job for job in await stack_listing(stack) if job.id == job_id]
    assert [job.status for job in taken_while_queued] == ["queued"]
    await job_handle(stack, job_id).result()
    assert stack.simulator.job(job_id).status == "completed"

    listings = 0
    listed = asyncio.Event()

    async def stale_listing(self: GitHubClient, *, min_age_s: float = 0.0) -> list[WorkflowJob]:
        nonlocal listings
        listings += 1
        listed.set()
        return taken_while_queued

    monkeypatch.setattr(GitHubClient, "list_open_jobs", stale_listing)
    # The second listing starts a pass after the first one ended: that pass saw the stale job.
    async with asyncio.timeout(60):
        while listings < 2:
            listed.clear()
            await listed.wait()
    runs = await stack.client.count_workflows(f'WorkflowId = "{job_workflow_id(job_id)}"')
    assert runs.count == 1


async def stack_listing(stack: EmbeddedStack) -> list[WorkflowJob]:
    assert stack.settings is not None
    github = GitHubClient(stack.settings.github_scopes[DEFAULT_SCOPE])
    try:
        return await github.list_open_jobs()
    finally:
        await github.aclose()


async def test_a_queued_job_inside_a_running_matrix_is_found_by_the_reconciler(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(max_runners=2)
    sim = stack.simulator
    (first,) = sim.queue_run(DEMO_LABELS, 1, duration_s=6.0)
    await sim.wait_for(lambda: sim.job(first).status == "in_progress", 30)
    # The run is now in progress; the next matrix job's queued delivery is lost.
    sim.set_faults(FaultConfig(webhook_drop_rate=1.0, webhook_drop_actions=["queued"]))
    second = sim.queue_job(DEMO_LABELS, 1.0, run_id=sim.job(first).run_id)
    await sim.wait_for(lambda: any(d.job_id == second and d.dropped for d in sim.deliveries()), 10)
    sim.set_faults(FaultConfig())
    await sim.wait_for(lambda: sim.job(second).status == "completed", 60)
    assert sim.job(second).conclusion == "success"
    await job_handle(stack, second).result()
    await until(lambda: nothing_left(stack))


async def test_a_job_that_is_never_served_ends_at_its_deadline_with_bounded_history(
    stack_factory: StackFactory,
) -> None:
    # Never approved: the workflow checks GitHub often enough to continue-as-new several times
    # (the test server suggests it every 300 events), and the deadline must survive that.
    stack = await stack_factory(max_runners=1, job_deadline_s=40.0, job_status_check_interval_s=0.2)
    sim = stack.simulator
    job_id = sim.queue_job(DEMO_LABELS, duration_s=1.0, needs_approval=True)
    handle = job_handle(stack, job_id)
    await stack.wait_workflow_started(job_id)
    with pytest.raises(WorkflowFailureError) as failure:
        async with asyncio.timeout(90):
            await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "JobDeadlineExceeded", cause
    assert "waiting for approval" in str(cause)
    runs = await stack.client.count_workflows(f'WorkflowId = "{job_workflow_id(job_id)}"')
    history = await handle.fetch_history()
    print(f"\nnever served: {runs.count} runs, last run {len(history.events)} events")
    assert runs.count >= 2, "the long wait continued as new"
    assert len(history.events) < 600
    assert await stack.backend.list() == [] and sim.runners() == []


async def test_a_job_whose_runner_served_an_older_job_takes_a_new_slot_and_is_served(
    stack_factory: StackFactory,
) -> None:
    # The older job has no workflow (its queued delivery is lost and the reconciler waits), so
    # the first runner the newer job starts takes the older job. The newer job is still queued
    # when that runner is gone: it must take a slot again, under a new request id.
    stack = await stack_factory(max_runners=1, reconcile_min_age_s=600.0)
    sim = stack.simulator
    sim.set_faults(FaultConfig(webhook_drop_rate=1.0, webhook_drop_actions=["queued"]))
    (older,) = stack.queue_jobs(1, duration_s=1.0)
    await sim.wait_for(lambda: any(d.job_id == older and d.dropped for d in sim.deliveries()), 10)
    sim.set_faults(FaultConfig())
    (newer,) = stack.queue_jobs(1, duration_s=1.0)
    await stack.wait_workflow_started(newer)
    async with asyncio.timeout(90):
        result = RunnerJobResult.model_validate(await job_handle(stack, newer).result())
    assert sim.job(older).runner_name == f"mayfly-{newer}-a1"
    assert sim.job(newer).conclusion == "success" and sim.job(newer).runner_name == f"mayfly-{newer}-a2"
    assert result.runners_spawned == 2
    await until(lambda: nothing_left(stack))


async def test_a_job_whose_runner_took_a_long_job_gets_a_new_runner_without_waiting_for_it(
    stack_factory: StackFactory,
) -> None:
    # As above, but the older job is long: the runner the newer job started serves it for
    # minutes. The newer job must not wait in the queue that long for its only runner; it gets a
    # second slot and runner while the first finishes the older job under its own slot.
    stack = await stack_factory(max_runners=2, reconcile_min_age_s=600.0)
    sim = stack.simulator
    sim.set_faults(FaultConfig(webhook_drop_rate=1.0, webhook_drop_actions=["queued"]))
    (older,) = stack.queue_jobs(1, duration_s=600.0)
    await sim.wait_for(lambda: any(d.job_id == older and d.dropped for d in sim.deliveries()), 10)
    sim.set_faults(FaultConfig())
    (newer,) = stack.queue_jobs(1, duration_s=1.0)
    await stack.wait_workflow_started(newer)
    await sim.wait_for(lambda: sim.job(newer).conclusion == "success", 90)
    assert sim.job(older).runner_name == f"mayfly-{newer}-a1" and sim.job(older).status == "in_progress"
    assert sim.job(newer).runner_name == f"mayfly-{newer}-a2"
    handle = job_handle(stack, newer)
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING, (
        "the runner finishing the older job still holds its slot"
    )
    sim.cancel_job(older)
    async with asyncio.timeout(90):
        result = RunnerJobResult.model_validate(await handle.result())
    assert result.runners_spawned == 2 and result.outcome == "served"
    await until(lambda: nothing_left(stack))


async def test_a_runner_still_connecting_when_another_runner_takes_its_job_is_torn_down_at_once(
    stack_factory: StackFactory,
) -> None:
    # Runners are not bound to jobs: a runner that connected first takes the queued job while
    # ours is still starting. Ours is surplus from that moment, and must be deregistered and
    # stopped then, not once it comes online: a slot held for an idle runner is what made the
    # happy path's last jobs wait seconds for nothing.
    stack = await stack_factory(max_runners=1, runner_env={START_DELAY_ENV: "30"})
    sim = stack.simulator
    (job,) = stack.queue_jobs(1, duration_s=1.0)
    ours = f"mayfly-{job}-a1"
    await until(in_phase(stack, job, JobPhase.REGISTERING))
    async with httpx.AsyncClient(base_url=sim.url, headers={"Authorization": f"Bearer {sim.token}"}) as api:
        minted = await api.post(
            f"/repos/{sim.owner}/{sim.repo}/actions/runners/generate-jitconfig",
            json={"name": "foreign-1", "runner_group_id": 1, "labels": DEMO_LABELS},
        )
        assert minted.status_code == 201, minted.text
        connected = await api.post(
            "/_sim/agent/connect", json={"jitconfig": minted.json()["encoded_jit_config"]}
        )
        assert connected.status_code == 200, connected.text
        agent = f"/_sim/agent/{connected.json()['runner_id']}"
        session = {"X-Sim-Runner-Session": connected.json()["session_id"]}
        took = await api.get(f"{agent}/job", params={"wait": 5}, headers=session)
        assert took.status_code == 200 and took.json()["job_id"] == job
        async with asyncio.timeout(20):
            await job_handle(stack, job).result()
        done = await api.post(
            f"{agent}/complete", json={"job_id": job, "conclusion": "success"}, headers=session
        )
        assert done.status_code == 204, done.text
    assert sim.job(job).runner_name == "foreign-1"
    assert ours not in sim.connected_runners(), "our surplus runner was left to connect"
    assert ours not in [r.name for r in sim.runners()], "our surplus runner is still registered"
    await until(lambda: nothing_left_of_ours(stack))


async def nothing_left_of_ours(stack: EmbeddedStack) -> bool:
    running = [r for r in await stack.backend.list() if r.state is ContainerState.RUNNING]
    slots = await stack.semaphore_status()
    return not running and not slots.holders and not slots.waiters


def _mint_before_grant(events: Sequence[HistoryEvent]) -> bool:
    mints = [
        e.event_id
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "github.mint_runner"
    ]
    grants = [
        e.event_id
        for e in events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        and e.workflow_execution_signaled_event_attributes.signal_name == "slot_granted"
    ]
    return bool(mints) and (not grants or min(mints) < min(grants))


async def test_the_next_waiters_mint_before_their_grant_and_an_unused_registration_is_deregistered(
    stack_factory: StackFactory,
) -> None:
    # The semaphore tells the head of a full pool's queue (as many waiters as the cap) that
    # their slot is near; they mint their runner's JIT config then, so the held slot spends
    # nothing on it. A waiter whose job is cancelled before its grant must not leave that
    # registration behind.
    stack = await stack_factory(max_runners=2)
    sim = stack.simulator
    # Two jobs hold the slots, their runners busy with them. Queued later, the other two cannot
    # be taken by those runners (CI once saw the holders' runners take older waiting jobs first).
    holders = stack.queue_jobs(2, duration_s=6.0)
    await sim.wait_for(lambda: all(sim.job(job_id).status == "in_progress" for job_id in holders), 30)
    waiting = stack.queue_jobs(2, duration_s=3.0)
    jobs = holders + waiting
    # The two waiters each register a runner of their own before any slot is theirs.
    await sim.wait_for(
        lambda: {f"mayfly-{job_id}-a1" for job_id in waiting} <= {r.name for r in sim.runners()}, 30
    )
    phases = [await phase(stack, job_id) for job_id in waiting]
    assert phases == [JobPhase.WAITING_FOR_SLOT] * 2
    served, cancelled = waiting
    sim.cancel_job(cancelled)
    async with asyncio.timeout(60):
        for job_id in jobs:
            await job_handle(stack, job_id).result()
    served_history = (await job_handle(stack, served).fetch_history()).events
    assert _mint_before_grant(served_history), "the waiter minted before its slot was granted"
    # Served by some runner of ours: runners are not bound to jobs.
    assert sim.job(served).conclusion == "success"
    cancelled_history = (await job_handle(stack, cancelled).fetch_history()).events
    assert not _scheduled(cancelled_history, "containers.spawn"), "the cancelled job never held a slot"
    assert all(r.name != f"mayfly-{cancelled}-a1" for r in sim.runners()), "its registration is gone"
    await until(lambda: nothing_left(stack))


def _scheduled(events: Sequence[HistoryEvent], activity: str) -> bool:
    return any(
        e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == activity
        for e in events
    )


_ACTIVITY_CLOSED = {
    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "activity_task_completed_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: "activity_task_failed_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED: "activity_task_canceled_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "activity_task_timed_out_event_attributes",
}


def _activities_left_open(events: Sequence[HistoryEvent]) -> list[str]:
    scheduled = {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }
    for e in events:
        if e.event_type in _ACTIVITY_CLOSED:
            scheduled.pop(getattr(e, _ACTIVITY_CLOSED[e.event_type]).scheduled_event_id, None)
    return sorted(scheduled.values())


async def test_a_job_whose_webhook_beats_the_first_poll_runs_no_poll_and_ends_with_no_activity_open(
    stack_factory: StackFactory,
) -> None:
    # The webhook says the runner is online long before the first poll is due (the product's
    # 10 s): no poll runs at all. A poll started at the spawn and cancelled when the webhook
    # won heard of its cancel only seconds later, after a short job's workflow had closed, and
    # the worker then warned "Activity not found on completion" on the happy path.
    stack = await stack_factory(max_runners=3, registration_poll_s=10.0)
    jobs = stack.queue_jobs(3, duration_s=0.2)
    await stack.wait_jobs_finished(jobs, within_s=60)
    for job_id in jobs:
        events = (await job_handle(stack, job_id).fetch_history()).events
        assert not _scheduled(events, "github.wait_online"), f"job {job_id} polled although the webhook won"
        assert _activities_left_open(events) == [], f"job {job_id} closed with activities still open"
    await until(lambda: nothing_left(stack))


async def test_a_poll_overtaken_by_a_late_webhook_is_settled_before_the_workflow_ends(
    stack_factory: StackFactory,
) -> None:
    # The runner connects after the first poll began: the webhook then cancels a running poll,
    # and the workflow must not close before that poll has answered its cancel.
    stack = await stack_factory(max_runners=2, registration_poll_s=0.5, runner_env={START_DELAY_ENV: "2"})
    jobs = stack.queue_jobs(2, duration_s=0.2)
    await stack.wait_jobs_finished(jobs, within_s=60)
    for job_id in jobs:
        events = (await job_handle(stack, job_id).fetch_history()).events
        assert _scheduled(events, "github.wait_online"), f"job {job_id} never polled"
        assert _activities_left_open(events) == [], f"job {job_id} closed with activities still open"
    await until(lambda: nothing_left(stack))


class _GatedSpawns(DelegatingBackend):
    """Holds back the spawn of named runners until the test opens their gate, and tells the test
    when each spawn was asked for."""

    def __init__(self, inner: ContainerBackend) -> None:
        super().__init__(inner)
        self.gates: dict[str, asyncio.Event] = {}
        self.asked: dict[str, asyncio.Event] = {}

    def gate(self, name: str) -> asyncio.Event:
        self.asked[name] = asyncio.Event()
        return self.gates.setdefault(name, asyncio.Event())

    async def before_spawn(self, name: str, jit_config: str) -> None:
        if name in self.gates:
            self.asked[name].set()
            await self.gates[name].wait()


async def test_a_runner_whose_job_a_sibling_runner_took_is_kept_for_the_sibling_job(
    stack_factory: StackFactory,
) -> None:
    # Two jobs, two slots. The newer job's runner comes online first and takes the older job
    # (GitHub gives the oldest queued job). The older job's runner, still starting, must not be
    # torn down as surplus: it is the newer job's runner now. Tearing it down and starting a
    # third runner cost every such swap a runner start-up, the happy path's largest overhead.
    gated: list[_GatedSpawns] = []

    def gate_spawns(inner: ContainerBackend) -> ContainerBackend:
        gated.append(_GatedSpawns(inner))
        return gated[0]

    stack = await stack_factory(max_runners=2, wrap_backend=gate_spawns)
    sim = stack.simulator
    older, newer = stack.queue_jobs(2, duration_s=10.0)
    spawns = gated[0]
    older_runner, newer_runner = f"mayfly-{older}-a1", f"mayfly-{newer}-a1"
    older_go, newer_go = spawns.gate(older_runner), spawns.gate(newer_runner)
    async with asyncio.timeout(60):
        await spawns.asked[older_runner].wait()
    newer_go.set()
    await sim.wait_for(lambda: sim.job(older).status == "in_progress", 60)
    assert sim.job(older).runner_name == newer_runner
    older_go.set()
    await sim.wait_for(lambda: sim.job(newer).status != "queued", 60)
    assert sim.job(newer).runner_name == older_runner
    async with asyncio.timeout(90):
        results = [
            RunnerJobResult.model_validate(await job_handle(stack, j).result()) for j in (older, newer)
        ]
    assert [r.runners_spawned for r in results] == [1, 1]
    assert [r.outcome for r in results] == ["served", "served"]
    await until(lambda: nothing_left(stack))
