"""Warm pools on the real stack: dev server, worker, GitHub simulator, local runner processes.

The cap is checked by the independent probe (a flock per slot taken by each runner process).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus

from mayfly.app.cli import _status
from mayfly.app.embedded import EmbeddedStack
from mayfly.backends import ContainerState
from mayfly.config import PoolSettings
from mayfly.models import JobPhase
from mayfly.warm import (
    WarmPoolStatus,
    WarmRunnerResult,
    is_warm_runner,
    warm_pool_workflow_id,
    warm_runner_workflow_id,
)
from simulator import FaultConfig
from simulator.probe import ConcurrencyProbe
from tests.jobs import in_phase, nothing_left, until

CAP = 3


async def warm_status(stack: EmbeddedStack, pool: str) -> WarmPoolStatus:
    handle = stack.client.get_workflow_handle(warm_pool_workflow_id(pool))
    status: WarmPoolStatus = await handle.query("status", result_type=WarmPoolStatus)
    return status


def online_idle_runners(stack: EmbeddedStack) -> set[str]:
    return {r.name for r in stack.simulator.runners() if r.status == "online" and not r.busy}


@pytest.fixture
async def warm_stack(
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
        # Sweeps run often, so a sweep that took warm runners for orphans would show.
        sweep_interval_s=1.0,
        min_idle=2,
    )
    await stack.start()
    try:
        yield stack, probe
    finally:
        await stack.stop()


async def test_min_idle_two_serves_a_job_replaces_the_runner_and_drains_to_nothing(
    warm_stack: tuple[EmbeddedStack, ConcurrencyProbe], pool_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    stack, probe = warm_stack

    async def two_idle() -> bool:
        status = await warm_status(stack, pool_name)
        return len(status.idle) == 2 and set(status.idle) <= online_idle_runners(stack)

    await until(two_idle, within_s=120)
    first_idle = set((await warm_status(stack, pool_name)).idle)
    assert len(online_idle_runners(stack)) == 2, "two registered, idle runners stand ready on GitHub"

    [job_id] = stack.queue_jobs(1, duration_s=2.0)
    await stack.wait_jobs_finished([job_id], within_s=120)
    served_by = stack.simulator.job(job_id).runner_name
    assert served_by in first_idle, f"job {job_id} ran on {served_by}, not on a warm runner"

    # The warm runner that took the job is accounted to it, and a replacement stands ready.
    runner_result = await stack.client.get_workflow_handle(
        warm_runner_workflow_id(served_by), result_type=WarmRunnerResult
    ).result()
    assert runner_result.job_id == job_id
    assert runner_result.registered

    async def replaced() -> bool:
        status = await warm_status(stack, pool_name)
        return len(status.idle) == 2 and served_by not in status.idle and status.started_total >= 3

    await until(replaced, within_s=120)
    status = await warm_status(stack, pool_name)
    assert [served.job_id for served in status.served] == [job_id]
    assert stack.settings is not None
    temporal = stack.settings.temporal.model_copy(
        update={"address": stack.client.service_client.config.target_host}
    )
    capsys.readouterr()
    await _status(stack.settings.model_copy(update={"temporal": temporal}))
    shown = capsys.readouterr().out
    assert "warm pool: min_idle 2, 2 idle, 0 starting, 0 busy, 0 draining; 1 jobs served" in shown
    assert await stack.job_workflow_status(job_id) == WorkflowExecutionStatus.COMPLETED

    # Lowering min_idle to 0 (a worker restart with the new config) drains both.
    await stack.set_min_idle(0)
    pool_workflow = warm_pool_workflow_id(pool_name)
    final = await stack.client.get_workflow_handle(pool_workflow, result_type=WarmPoolStatus).result()
    assert final.idle == [] and final.busy == [] and final.starting == []
    await until(lambda: nothing_left(stack), within_s=60)

    print(f"runner processes started: {len(probe.starts())}, violations: {len(probe.violations())}")
    assert probe.violations() == [], "more than CAP runner processes were alive at once"
    assert probe.held_now() == 0, "a runner process is still alive"
    assert stack.simulator.runners() == [], "registrations left in GitHub"


async def test_an_idle_warm_runner_is_recycled_before_its_max_lifetime(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        max_runners=1,
        task_queue=task_queue,
        pool=pool_name,
        semaphore_reap_interval_s=2.0,
        sweep_interval_s=1.0,
        # Recycled 3 s (a tenth of it) before the watcher would kill it.
        max_lifetime_s=30.0,
        min_idle=1,
    )
    await stack.start()
    try:

        async def one_idle() -> bool:
            return len((await warm_status(stack, pool_name)).idle) == 1

        await until(one_idle, within_s=120)
        [first] = (await warm_status(stack, pool_name)).idle
        result = await stack.client.get_workflow_handle(
            warm_runner_workflow_id(first), result_type=WarmRunnerResult
        ).result()

        async def replaced() -> bool:
            idle = (await warm_status(stack, pool_name)).idle
            return len(idle) == 1 and idle != [first]

        await until(replaced, within_s=120)
        await stack.set_min_idle(0)
        await stack.client.get_workflow_handle(warm_pool_workflow_id(pool_name)).result()
        await until(lambda: nothing_left(stack), within_s=60)
    finally:
        await stack.stop()
    # Deregistered by its workflow before its watcher would have killed it at its lifetime.
    assert result.reason == "recycled at its max lifetime"
    assert result.job_id is None


async def test_warm_runners_holding_the_whole_cap_serve_a_burst_whose_webhooks_are_lost(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    """min_idle = max_runners: jobs and replacements queue for the same slots. No in_progress or
    completed webhook arrives, so warm runners learn they are busy from GitHub's runner status."""
    probe = ConcurrencyProbe(ledger=state_dir / "probe", cap=2)
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        max_runners=2,
        task_queue=task_queue,
        pool=pool_name,
        runner_command=probe.command,
        runner_env=probe.env,
        semaphore_reap_interval_s=2.0,
        sweep_interval_s=1.0,
        job_status_check_interval_s=2.0,
        faults=FaultConfig(webhook_drop_rate=1.0, webhook_drop_actions=["in_progress", "completed"]),
        min_idle=2,
    )
    await stack.start()
    try:

        async def two_idle() -> bool:
            return len((await warm_status(stack, pool_name)).idle) == 2

        await until(two_idle, within_s=120)
        first_idle = set((await warm_status(stack, pool_name)).idle)
        job_ids = stack.queue_jobs(4, duration_s=8.0)

        async def warm_runners_known_busy() -> bool:
            # No webhook named them: only GitHub's runner status can have told the pool.
            return set((await warm_status(stack, pool_name)).busy) == first_idle

        await until(warm_runners_known_busy, within_s=60)
        assert all(stack.simulator.job(job_id).status == "in_progress" for job_id in job_ids[:2])
        await stack.wait_jobs_finished(job_ids, within_s=300)
        await until(two_idle, within_s=120)
        status = await warm_status(stack, pool_name)
        await stack.set_min_idle(0)
        await stack.client.get_workflow_handle(warm_pool_workflow_id(pool_name)).result()
        await until(lambda: nothing_left(stack), within_s=60)
    finally:
        await stack.stop()
    jobs = [stack.simulator.job(job_id) for job_id in job_ids]
    assert all(job.conclusion == "success" for job in jobs)
    prefix = "mayfly"
    on_warm = [job.id for job in jobs if job.runner_name and is_warm_runner(job.runner_name, prefix)]
    print(f"jobs on warm runners: {len(on_warm)} of {len(jobs)}; runner processes: {len(probe.starts())}")
    assert len(on_warm) >= 2, "the two runners standing ready took the first jobs"
    assert set(on_warm) >= set(job_ids[:2])
    assert status.started_total >= 2 + len(on_warm), "each warm runner that took a job was replaced"
    assert probe.violations() == [], "more than 2 runner processes were alive at once"
    assert probe.held_now() == 0
    assert stack.simulator.runners() == []


async def test_a_warm_runner_whose_workflow_an_operator_terminates_is_swept_and_replaced(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    """Its teardown never runs: the sweepers remove its process and registration (they know warm
    runner names), the semaphore reclaims its slot, and the pool forgets it and starts another."""
    probe = ConcurrencyProbe(ledger=state_dir / "probe", cap=2)
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        max_runners=2,
        task_queue=task_queue,
        pool=pool_name,
        runner_command=probe.command,
        runner_env=probe.env,
        semaphore_reap_interval_s=2.0,
        sweep_interval_s=1.0,
        job_status_check_interval_s=2.0,
        min_idle=1,
    )
    await stack.start()
    try:

        async def one_idle() -> bool:
            return len((await warm_status(stack, pool_name)).idle) == 1

        await until(one_idle, within_s=120)
        [first] = (await warm_status(stack, pool_name)).idle
        await stack.client.get_workflow_handle(warm_runner_workflow_id(first)).terminate("operator")

        async def swept_and_replaced() -> bool:
            idle = (await warm_status(stack, pool_name)).idle
            alive = {r.name for r in await stack.backend.list() if r.state is ContainerState.RUNNING}
            registered = {r.name for r in stack.simulator.runners()}
            return len(idle) == 1 and idle != [first] and first not in alive | registered

        await until(swept_and_replaced, within_s=120)
        await stack.set_min_idle(0)
        await stack.client.get_workflow_handle(warm_pool_workflow_id(pool_name)).result()
        await until(lambda: nothing_left(stack), within_s=120)
    finally:
        await stack.stop()
    assert probe.violations() == []
    assert probe.held_now() == 0
    assert stack.simulator.runners() == []


async def test_lowering_min_idle_lets_a_busy_warm_runner_finish_its_job(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        max_runners=2,
        task_queue=task_queue,
        pool=pool_name,
        semaphore_reap_interval_s=2.0,
        sweep_interval_s=1.0,
        min_idle=1,
    )
    await stack.start()
    try:

        async def one_idle() -> bool:
            return len((await warm_status(stack, pool_name)).idle) == 1

        await until(one_idle, within_s=120)
        [warm] = (await warm_status(stack, pool_name)).idle
        [job_id] = stack.queue_jobs(1, duration_s=6.0)

        async def busy() -> bool:
            return (await warm_status(stack, pool_name)).busy == [warm]

        await until(busy, within_s=60)
        await stack.set_min_idle(0)
        final = await stack.client.get_workflow_handle(
            warm_pool_workflow_id(pool_name), result_type=WarmPoolStatus
        ).result()
        job = stack.simulator.job(job_id)
        await until(lambda: nothing_left(stack), within_s=60)
    finally:
        await stack.stop()
    # The pool ended only once the job it was running had completed, not killed.
    assert job.status == "completed" and job.conclusion == "success" and job.runner_name == warm
    assert final.served_total == 1 and final.busy == []


async def test_a_warm_runner_drained_while_waiting_for_a_slot_withdraws_its_request(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        max_runners=1,
        task_queue=task_queue,
        pool=pool_name,
        semaphore_reap_interval_s=2.0,
        sweep_interval_s=1.0,
    )
    await stack.start()
    try:
        [job_id] = stack.queue_jobs(1, duration_s=15.0)
        await until(in_phase(stack, job_id, JobPhase.RUNNING), within_s=60)
        await stack.set_min_idle(1)

        async def warm_runner_waits() -> bool:
            return (await stack.semaphore_status()).waiting == 1

        await until(warm_runner_waits, within_s=60)
        await stack.set_min_idle(0)
        final = await stack.client.get_workflow_handle(
            warm_pool_workflow_id(pool_name), result_type=WarmPoolStatus
        ).result()
        # Still running its job: the slot is the job's, and nobody waits for it any more.
        assert stack.simulator.job(job_id).status == "in_progress"
        semaphore = await stack.semaphore_status()
        await stack.wait_jobs_finished([job_id], within_s=120)
        await until(lambda: nothing_left(stack), within_s=60)
    finally:
        await stack.stop()
    assert final.started_total == 1 and final.served_total == 0
    assert semaphore.waiting == 0 and semaphore.waiters == []
    assert [holder.workflow_id for holder in semaphore.holders] == [f"mayfly-job-{job_id}"]


async def test_warm_runners_that_fail_to_register_back_the_pool_off(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    """Each runner exits before connecting: the next one starts 5 s, then 10 s after the last
    failure (a durable timer never fires early, so these lower bounds cannot flake)."""
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        max_runners=1,
        task_queue=task_queue,
        pool=pool_name,
        runner_env={"MAYFLY_SIM_RUNNER_CONNECT_FAIL": "1"},
        semaphore_reap_interval_s=2.0,
        sweep_interval_s=1.0,
        min_idle=1,
    )
    await stack.start()
    runners: list[WorkflowExecution] = []
    try:

        async def three_started_two_closed() -> bool:
            runners[:] = [
                execution
                async for execution in stack.client.list_workflows(
                    f"WorkflowType = 'WarmRunner' AND MayflyPool = '{pool_name}'"
                )
            ]
            return len(runners) >= 3 and sum(r.close_time is not None for r in runners) >= 2

        await until(three_started_two_closed, within_s=120)
        await stack.set_min_idle(0)
        await stack.client.get_workflow_handle(warm_pool_workflow_id(pool_name)).result()
        await until(lambda: nothing_left(stack), within_s=60)
    finally:
        await stack.stop()
    # Start to start: each start follows the previous runner's failure, itself after that
    # runner's start, so these hold whatever the lag between a failure and its workflow's close.
    first, second, third = sorted(runners, key=lambda r: r.start_time)[:3]
    assert (second.start_time - first.start_time).total_seconds() >= 5
    assert (third.start_time - second.start_time).total_seconds() >= 10
    result = await stack.client.get_workflow_handle(first.id, result_type=WarmRunnerResult).result()
    assert not result.registered and "did not come online" in result.reason


def test_min_idle_above_the_cap_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"min_idle \(4\) must not exceed max_runners \(3\)"):
        PoolSettings(name="gpu", labels=["gpu"], max_runners=3, min_idle=4)
    with pytest.raises(ValueError, match="min_idle"):
        PoolSettings(name="gpu", labels=["gpu"], max_runners=3, min_idle=-1)
