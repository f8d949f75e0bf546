"""Every failure path releases its slot and leaves no container or registration behind."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError, CancelledError

from mayfly.app.embedded import DEMO_LABELS, EmbeddedStack
from mayfly.app.wiring import start_sweeper
from mayfly.backends.local import LocalProcessBackend
from mayfly.config import LocalBackendSettings, ModalBackendSettings
from mayfly.github import GitHubClient
from mayfly.models import JobPhase, job_workflow_id
from simulator import FaultConfig
from tests.jobs import in_phase, job_handle, nothing_left, until
from workflows.sweeper import SweeperWorkflow, sweeper_workflow_id

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


async def test_cancelling_a_running_job_tears_everything_down(
    stack_factory: Callable[..., Awaitable[EmbeddedStack]],
) -> None:
    stack = await stack_factory(max_runners=1)
    (job_id,) = stack.queue_jobs(1, duration_s=2.0)
    await until(in_phase(stack, job_id, JobPhase.RUNNING))
    await job_handle(stack, job_id).cancel()
    with pytest.raises(WorkflowFailureError) as failure:
        await job_handle(stack, job_id).result()
    assert isinstance(failure.value.cause, CancelledError)
    assert await nothing_left(stack)


async def test_cancelling_a_job_waiting_for_a_slot_leaks_nothing(
    stack_factory: Callable[..., Awaitable[EmbeddedStack]],
) -> None:
    stack = await stack_factory(max_runners=1)
    # The second job is queued only once the first is running, so the only runner there is
    # has already taken the first job and cannot serve the second behind our back.
    (holder,) = stack.queue_jobs(1, duration_s=3.0)
    await until(in_phase(stack, holder, JobPhase.RUNNING))
    (queued,) = stack.queue_jobs(1, duration_s=3.0)
    await until(in_phase(stack, queued, JobPhase.WAITING_FOR_SLOT))
    await job_handle(stack, queued).cancel()
    with pytest.raises(WorkflowFailureError):
        await job_handle(stack, queued).result()
    await job_handle(stack, holder).result()
    await until(lambda: nothing_left(stack))


async def test_a_runner_that_never_registers_is_retried_then_fails_clearly(
    stack_factory: Callable[..., Awaitable[EmbeddedStack]],
) -> None:
    stack = await stack_factory(
        max_runners=1, runner_command=SLEEPER, registration_timeout_s=3.0, max_registration_attempts=2
    )
    (job_id,) = stack.queue_jobs(1)
    await stack.wait_workflow_started(job_id)
    with pytest.raises(WorkflowFailureError) as failure:
        await job_handle(stack, job_id).result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "RegistrationFailed"
    assert "after 2 attempts" in str(cause) and "did not come online" in str(cause)
    # Records go once each exit is confirmed; the runners' logs stay behind.
    names = sorted(log.stem for log in stack.backend_state_dir.glob("*.log"))
    assert names == [f"mayfly-{job_id}-a1", f"mayfly-{job_id}-a2"], "a fresh name per attempt"
    assert await stack.backend.list() == []
    assert await nothing_left(stack)


async def test_sweeper_removes_orphans_and_leaves_other_runners_alone(
    stack_factory: Callable[..., Awaitable[EmbeddedStack]], state_dir: Path
) -> None:
    stack = await stack_factory()
    assert stack.settings is not None
    orphan_backend = LocalProcessBackend(
        LocalBackendSettings(command=SLEEPER, state_dir=state_dir / "local-backend")
    )
    orphan = await orphan_backend.spawn(
        name="mayfly-424242-a1",
        owner_workflow_id=job_workflow_id(424242),
        job_id=424242,
        jit_config="unused",
        max_lifetime_s=600,
    )
    github = GitHubClient(stack.settings.github)
    await github.generate_jit_config("mayfly-434343-a1", DEMO_LABELS)
    await github.generate_jit_config("another-system-runner", DEMO_LABELS)
    await github.aclose()

    async def swept() -> bool:
        # Terminated and, its exit confirmed, forgotten.
        record = await stack.backend.inspect(orphan.name)
        names = [runner.name for runner in stack.simulator.runners()]
        return record is None and not pid_alive(int(orphan.backend_id)) and names == ["another-system-runner"]

    await until(swept, within_s=30)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_a_job_whose_queued_webhook_was_lost_is_recovered(
    stack_factory: Callable[..., Awaitable[EmbeddedStack]],
) -> None:
    stack = await stack_factory(faults=FaultConfig(webhook_drop_rate=1.0))
    (job_id,) = stack.queue_jobs(1, duration_s=1.0)
    sim = stack.simulator
    await sim.wait_for(lambda: any(d.job_id == job_id and d.dropped for d in sim.deliveries()), 10)
    sim.set_faults(FaultConfig())
    # Nothing will redeliver it; the sweeper's reconciliation finds the queued job on GitHub.
    await until(in_phase(stack, job_id, JobPhase.DONE), within_s=60)
    result = await job_handle(stack, job_id).result()
    assert sim.job(job_id).conclusion == "success"
    assert result is not None
    await until(lambda: nothing_left(stack))


async def test_a_worker_start_hands_the_running_sweeper_its_pool_list(
    stack_factory: Callable[..., Awaitable[EmbeddedStack]],
) -> None:
    stack = await stack_factory()
    assert stack.settings is not None
    handle = stack.client.get_workflow_handle_for(
        SweeperWorkflow.run, sweeper_workflow_id(stack.settings.temporal.task_queue)
    )
    # Local pools are swept by each host's own sweeper; the shared one takes provider pools.
    assert (await handle.query(SweeperWorkflow.config)).pools == []
    extra = stack.settings.pools[0].model_copy(update={"name": "gpu", "backend": ModalBackendSettings()})
    changed = stack.settings.model_copy(
        update={"pools": [*stack.settings.pools, extra], "sweep_interval_s": 7.0}
    )
    await start_sweeper(stack.client, changed)
    config = await handle.query(SweeperWorkflow.config)
    assert config.pools == ["gpu"] and config.interval_s == 7.0
