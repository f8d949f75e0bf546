"""Record the workflow histories that tests/test_replay.py replays.

    .venv/bin/python -m tests.record_histories

Runs a few jobs through the embedded stack on a fresh dev server (served, lost webhooks,
approval, cancelled while running, minted ahead behind a full pool) and stores the histories of their
RunnerJob workflows, of the pool's SlotSemaphore and of the Sweeper in tests/histories/.
Until a first release, a change that breaks replay regenerates these in the same commit,
with intent; after it, such a change needs versioning instead.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError

from mayfly.app.embedded import DEMO_LABELS, EmbeddedStack
from mayfly.devserver import local_environment
from mayfly.models import JobPhase, RunnerJobState, job_workflow_id, semaphore_workflow_id
from simulator import FaultConfig
from workflows.sweeper import sweeper_workflow_id

HISTORIES = Path(__file__).with_name("histories")
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


async def _until_phase(client: Client, job_id: int, phase: JobPhase) -> None:
    handle = client.get_workflow_handle(job_workflow_id(job_id))
    async with asyncio.timeout(60):
        while True:
            try:
                state = await handle.query("state", result_type=RunnerJobState)
                if state.phase is phase:
                    return
            except Exception:
                pass
            await asyncio.sleep(0.2)


async def _minted_before_grant(client: Client, job_id: int) -> bool:
    events = (await client.get_workflow_handle(job_workflow_id(job_id)).fetch_history()).events
    kinds: list[str] = []
    for e in events:
        if (
            e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
            and e.activity_task_scheduled_event_attributes.activity_type.name == "github.mint_runner"
        ):
            kinds.append("mint")
        elif (
            e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
            and e.workflow_execution_signaled_event_attributes.signal_name == "slot_granted"
        ):
            kinds.append("grant")
    return "mint" in kinds and "grant" in kinds and kinds.index("mint") < kinds.index("grant")


async def _save(client: Client, workflow_id: str, name: str) -> None:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    # The workflow id is part of the replay: holders' slot requests are named after it.
    (HISTORIES / f"{name}@{workflow_id}.json").write_text(history.to_json())
    print(f"  {name}: {len(history.events)} events")


async def record(client: Client, state_dir: Path) -> None:
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        task_queue="record",
        pool="record",
        max_runners=2,
        idle_ttl_s=4.0,
        job_status_check_interval_s=2.0,
        semaphore_reap_interval_s=2.0,
        sweep_interval_s=1.0,
    )
    await stack.start()
    sim = stack.simulator
    try:
        (served,) = stack.queue_jobs(1, duration_s=1.0)
        await stack.wait_jobs_finished([served], within_s=60)

        sim.set_faults(FaultConfig(webhook_drop_rate=1.0, webhook_drop_actions=["in_progress", "completed"]))
        (lost,) = stack.queue_jobs(1, duration_s=1.0)
        await stack.wait_jobs_finished([lost], within_s=60)
        sim.set_faults(FaultConfig())

        approved = sim.queue_job(DEMO_LABELS, 1.0, needs_approval=True)
        await _until_phase(client, approved, JobPhase.WAITING_FOR_APPROVAL)
        sim.approve_job(approved)
        await stack.wait_jobs_finished([approved], within_s=60)

        (cancelled,) = stack.queue_jobs(1, duration_s=3.0)
        await _until_phase(client, cancelled, JobPhase.RUNNING)
        await client.get_workflow_handle(job_workflow_id(cancelled)).cancel()
        try:
            await client.get_workflow_handle(job_workflow_id(cancelled)).result()
        except WorkflowFailureError:
            pass

        # A full pool: the waiters at the head of the queue are told their slot is near and
        # mint before their grant.
        behind = stack.queue_jobs(4, duration_s=2.0)
        await stack.wait_jobs_finished(behind, within_s=60)
        minted_ahead = [job_id for job_id in behind if await _minted_before_grant(client, job_id)]

        HISTORIES.mkdir(exist_ok=True)
        # The warm-pool histories have their own recorder (tests/record_warm_histories.py).
        for old in HISTORIES.glob("*.json"):
            if not old.name.startswith("warm-"):
                old.unlink()
        print(f"recorded into {HISTORIES}:")
        for job_id, name in ((served, "job-served"), (lost, "job-lost-webhooks"), (approved, "job-approved")):
            await _save(client, job_workflow_id(job_id), name)
        await _save(client, job_workflow_id(cancelled), "job-cancelled-running")
        await _save(client, job_workflow_id(minted_ahead[0]), "job-minted-ahead")
        await _save(client, semaphore_workflow_id("record"), "semaphore")
        await _save(client, sweeper_workflow_id("record"), "sweeper")
    finally:
        await stack.stop()


async def main() -> None:
    env = await local_environment()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            await record(env.client, Path(scratch))
    finally:
        await env.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
