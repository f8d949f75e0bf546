"""`mayfly explain` and `mayfly jobs` say what an operator asks: for a running, a waiting and a
failed job, on the real stack."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from temporalio.client import WorkflowFailureError

from mayfly.app.embedded import EmbeddedStack
from mayfly.app.explain import explain, list_jobs
from mayfly.github_factory import scope_clients
from mayfly.models import JobPhase, job_workflow_id
from simulator import FaultConfig
from tests.jobs import in_phase, job_handle, until

StackFactory = Callable[..., Awaitable[EmbeddedStack]]


async def explained(stack: EmbeddedStack, job_id: int) -> str:
    assert stack.settings is not None
    async with scope_clients(stack.settings) as github:
        return "\n".join(await explain(stack.client, stack.settings, job_id, github))


async def test_explain_and_jobs_for_a_running_a_waiting_and_a_failed_job(stack_factory: StackFactory) -> None:
    stack = await stack_factory(max_runners=1)
    sim = stack.simulator
    (running,) = stack.queue_jobs(1, duration_s=120.0)
    await until(in_phase(stack, running, JobPhase.RUNNING))
    await sim.wait_for(lambda: sim.job(running).status == "in_progress", 30)
    (waiting,) = stack.queue_jobs(1, duration_s=1.0)
    await until(in_phase(stack, waiting, JobPhase.WAITING_FOR_SLOT))

    text = await explained(stack, running)
    assert "RUNNING" in text and "phase: running" in text and "slot: held" in text
    assert f"GitHub: in_progress on runner mayfly-{running}-a1" in text
    assert f"/workflows/{job_workflow_id(running)}/" in text

    text = await explained(stack, waiting)
    assert "phase: waiting-for-slot" in text and "place 1 of 1 in the queue" in text
    assert f"holders: {job_workflow_id(running)}" in text
    assert "GitHub: queued" in text

    assert stack.settings is not None
    pool = stack.settings.pools[0].name  # unique to this test: other tests share the server
    listed = "\n".join(await list_jobs(stack.client, pool=pool, state="waiting-for-slot", limit=50))
    assert job_workflow_id(waiting) in listed and job_workflow_id(running) not in listed

    # A mint GitHub refuses for good fails the job's workflow, which explain then reports.
    sim.cancel_job(running)
    await job_handle(stack, waiting).result()
    sim.set_faults(FaultConfig(jit_error_status=422))
    (failed,) = stack.queue_jobs(1, duration_s=1.0)
    await stack.wait_workflow_started(failed)
    try:
        await job_handle(stack, failed).result()
    except WorkflowFailureError:
        pass
    text = await explained(stack, failed)
    assert "FAILED" in text and "last error:" in text and "422" in text
    assert "GitHub: queued" in text
