"""Live runners per worker are not capped by activity slots (issue 11).

Every live runner has a `containers.wait_exit` activity in flight for its whole life. On the
worker's shared queue those took the default 100 activity slots, so a 101st runner could not
even be spawned. They now run on the host queue, whose worker has `max_watched_containers`
slots. This runs the full job path: 150 long jobs on one worker at cap 150.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client

from mayfly.app.embedded import EmbeddedStack
from mayfly.backends import ContainerBackend, ContainerState
from mayfly.models import job_workflow_id

RUNNERS = 150


async def unwatched_runners(client: Client, backend: ContainerBackend) -> dict[str, str]:
    """Owner workflows without one started exit watcher per live runner of theirs.

    Runners are not bound to jobs, so a runner may serve another job than the one whose workflow
    started it, and one workflow may own two runners (one finishing another job in the
    background): the watchers are counted per owner."""
    running = Counter(r.owner_workflow_id for r in await backend.list() if r.state is ContainerState.RUNNING)
    unwatched = {}
    for owner, count in running.items():
        description = await client.get_workflow_handle(owner).describe()
        watchers = [
            activity
            for activity in description.raw_description.pending_activities
            if activity.activity_type.name == "containers.wait_exit"
        ]
        started = [
            activity
            for activity in watchers
            if activity.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
            and activity.last_worker_identity
        ]
        if len(started) != count:
            unwatched[owner] = f"{len(started)} started watchers for {count} runners: " + (
                "; ".join(
                    f"{PendingActivityState.Name(w.state)} attempt {w.attempt} {w.last_failure.message!r}"
                    for w in watchers
                )
                or "no watcher"
            )
    return unwatched


async def test_150_long_jobs_on_one_worker_are_all_spawned_and_watched(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        task_queue=task_queue,
        pool=pool_name,
        max_runners=RUNNERS,
        # 150 runner processes start on a small machine: give registration time.
        registration_timeout_s=600,
        idle_ttl_s=900,
        max_lifetime_s=1800,
        sweep_interval_s=30,
    )
    await stack.start()
    assert stack.settings is not None
    started = time.monotonic()
    sim = stack.simulator
    try:
        job_ids = stack.queue_jobs(RUNNERS, duration_s=3600)
        await sim.wait_for(
            lambda: all(sim.job(job_id).status == "in_progress" for job_id in job_ids),
            600,
            description="every job running on its own runner",
        )
        all_running_s = time.monotonic() - started

        running = [r for r in await stack.backend.list() if r.state is ContainerState.RUNNING]
        assert len(running) == RUNNERS, f"{len(running)} runner processes alive"
        unwatched = await unwatched_runners(client, stack.backend)
        print(f"\n{RUNNERS} runners in progress after {all_running_s:.1f}s; unwatched at first: {unwatched}")
        # A watcher between a heartbeat timeout and its retry is pending, not started: allow it
        # to come back, within a deadline.
        async with asyncio.timeout(120):
            while unwatched:
                await asyncio.sleep(1)
                unwatched = await unwatched_runners(client, stack.backend)

        # The watchers work: ending the jobs ends the runners, and every workflow completes.
        for job_id in job_ids:
            sim.cancel_job(job_id)
        async with asyncio.timeout(600):
            for job_id in job_ids:
                await client.get_workflow_handle(job_workflow_id(job_id)).result()
        running = [r for r in await stack.backend.list() if r.state is ContainerState.RUNNING]
        assert running == []
    finally:
        await stack.stop()
