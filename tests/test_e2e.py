"""End to end on the real dev server: webhook -> workflow -> local runner process -> completion."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from mayfly.app.embedded import EmbeddedStack
from mayfly.backends import ContainerState
from mayfly.models import semaphore_task_queue, semaphore_workflow_id
from simulator.probe import ConcurrencyProbe

CAP = 3


@pytest.fixture
async def probed_stack(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> AsyncIterator[tuple[EmbeddedStack, ConcurrencyProbe]]:
    probe = ConcurrencyProbe(ledger=state_dir / "probe", cap=CAP)
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        max_runners=CAP,
        task_queue=task_queue,
        pool=pool_name,
        runner_command=probe.command,
        runner_env=probe.env,
        semaphore_reap_interval_s=2.0,
    )
    await stack.start()
    try:
        yield stack, probe
    finally:
        await stack.stop()


async def test_ten_jobs_cap_three_all_run_and_nothing_leaks(
    probed_stack: tuple[EmbeddedStack, ConcurrencyProbe], task_queue: str, pool_name: str
) -> None:
    stack, probe = probed_stack
    job_ids = stack.queue_jobs(10, duration_s=1.0)

    await stack.wait_jobs_finished(job_ids, within_s=180)

    jobs = {job.id: job for job in stack.simulator.jobs()}
    assert all(jobs[job_id].conclusion == "success" for job_id in job_ids)
    assert all(jobs[job_id].runner_name for job_id in job_ids), "every job ran on some runner"
    for job_id in job_ids:
        assert await stack.job_workflow_status(job_id) == WorkflowExecutionStatus.COMPLETED

    starts = probe.starts()
    print(f"runner processes started: {len(starts)}, cap {CAP}, violations: {len(probe.violations())}")
    assert len(starts) >= len(job_ids)
    assert probe.violations() == [], "more than CAP runner processes were alive at once"

    semaphore = await stack.semaphore_status()
    assert semaphore.holders == [] and semaphore.waiters == []
    assert semaphore.granted_total >= len(job_ids)
    # Its own queue: its tasks never wait behind the job workflows' on the main one.
    description = await stack.client.get_workflow_handle(semaphore_workflow_id(pool_name)).describe()
    assert description.task_queue == semaphore_task_queue(task_queue)
    running = [r.name for r in await stack.backend.list() if r.state is ContainerState.RUNNING]
    assert running == []
    assert probe.held_now() == 0, "a runner process is still alive"
    assert stack.simulator.runners() == [], "registrations left in GitHub"


async def test_probe_detects_more_runners_than_its_cap(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    """The instrument behind the cap assertion must be able to fail: a probe allowing 1 sees 3."""
    probe = ConcurrencyProbe(ledger=state_dir / "probe", cap=1)
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        max_runners=3,
        task_queue=task_queue,
        pool=pool_name,
        runner_command=probe.command,
        runner_env=probe.env,
    )
    await stack.start()
    try:
        job_ids = stack.queue_jobs(3, duration_s=2.0)
        await stack.wait_jobs_finished(job_ids, within_s=120)
    finally:
        await stack.stop()
    assert len(probe.violations()) >= 1


async def test_jobs_run_with_github_app_auth_across_a_token_revocation(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    stack = EmbeddedStack(
        client, state_dir=state_dir, task_queue=task_queue, pool=pool_name, use_github_app=True
    )
    await stack.start()
    try:
        first = stack.queue_jobs(2, duration_s=0.5)
        await stack.wait_jobs_finished(first, within_s=120)
        exchanges_before = stack.simulator.token_exchanges
        # GitHub revokes the installation token; the next call's 401 triggers one refresh.
        stack.simulator.revoke_installation_tokens()
        second = stack.queue_jobs(2, duration_s=0.5)
        await stack.wait_jobs_finished(second, within_s=120)
    finally:
        await stack.stop()
    assert exchanges_before == 1, "one installation token served every call until it was revoked"
    assert stack.simulator.token_exchanges == 2
    assert all(stack.simulator.job(j).conclusion == "success" for j in first + second)
    assert stack.simulator.runners() == []
