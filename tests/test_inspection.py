"""What an operator sees in the Temporal UI: search attributes, summary and current details of a
running job and of a finished one, read through describe and queries as the UI does."""

from __future__ import annotations

import asyncio
from pathlib import Path

from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowHandle

from mayfly import search_attributes
from mayfly.app.embedded import EmbeddedStack
from mayfly.models import JobPhase, RunnerJobState, job_workflow_id
from workflows.runner_job import RunnerJobWorkflow


async def current_details(handle: WorkflowHandle[RunnerJobWorkflow, object]) -> str:
    metadata: WorkflowMetadata = await handle.query(
        "__temporal_workflow_metadata", result_type=WorkflowMetadata
    )
    return metadata.current_details


async def until_phase(handle: WorkflowHandle[RunnerJobWorkflow, object], phase: JobPhase) -> RunnerJobState:
    async with asyncio.timeout(60):
        while True:
            state: RunnerJobState = await handle.query(RunnerJobWorkflow.state)
            if state.phase is phase:
                return state
            await asyncio.sleep(0.1)


async def test_a_job_explains_itself_while_running_and_when_done(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    stack = EmbeddedStack(client, state_dir=state_dir, task_queue=task_queue, pool=pool_name)
    await stack.start()
    try:
        (job_id,) = stack.queue_jobs(1, duration_s=3.0)
        await stack.wait_workflow_started(job_id)
        handle = client.get_workflow_handle_for(RunnerJobWorkflow.run, job_workflow_id(job_id))
        running = await until_phase(handle, JobPhase.RUNNING)
        running_details = await current_details(handle)
        running_attributes = (await handle.describe()).typed_search_attributes
        description = await handle.describe()
        summary = await description.static_summary()
        details = await description.static_details()
        await handle.result()
        done_attributes = (await handle.describe()).typed_search_attributes
        done_details = await current_details(handle)
        done_state: RunnerJobState = await handle.query(RunnerJobWorkflow.state)
    finally:
        await stack.stop()

    runner = f"mayfly-{job_id}-a1"
    assert running.current_runner == runner and running.slot_held
    assert running_attributes.get(search_attributes.STATE) == "running"
    assert running_attributes.get(search_attributes.POOL) == pool_name
    assert running_attributes.get(search_attributes.JOB_ID) == job_id
    assert running_attributes.get(search_attributes.REPOSITORY) == "acme/widgets"
    assert running_attributes.get(search_attributes.RUNNER) == runner
    assert running_details.startswith("**running**") and runner in running_details
    assert summary is not None and str(job_id) in summary and pool_name in summary
    assert details is not None and "**Labels:**" in details

    assert done_attributes.get(search_attributes.STATE) == "done"
    assert done_details.startswith("**done**")
    assert done_state.phase is JobPhase.DONE and done_state.served_by is not None and not done_state.slot_held
