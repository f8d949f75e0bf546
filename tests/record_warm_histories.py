"""Record the warm-pool histories that tests/test_replay.py replays, next to the others.

    .venv/bin/python -m tests.record_warm_histories

A pool with `min_idle = 1`: its warm runner serves a job and is replaced, then `min_idle`
goes to 0 and the replacement is drained. Stores the WarmPool history and both WarmRunner
histories as tests/histories/warm-*.json; the other histories are left as they are.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from temporalio.client import Client

from mayfly.app.embedded import EmbeddedStack
from mayfly.devserver import local_environment
from mayfly.warm import WarmPoolStatus, warm_pool_workflow_id, warm_runner_workflow_id
from tests.record_histories import HISTORIES, _save

POOL = "record"


async def _idle(client: Client, within_s: float = 60) -> list[str]:
    handle = client.get_workflow_handle(warm_pool_workflow_id(POOL))
    async with asyncio.timeout(within_s):
        while True:
            status: WarmPoolStatus = await handle.query("status", result_type=WarmPoolStatus)
            if status.idle and status.started_total == len(status.idle) + status.served_total:
                return status.idle
            await asyncio.sleep(0.2)


async def record(client: Client, state_dir: Path) -> None:
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        task_queue="record-warm",
        pool=POOL,
        max_runners=2,
        semaphore_reap_interval_s=2.0,
        sweep_interval_s=1.0,
        min_idle=1,
    )
    await stack.start()
    try:
        [served_by] = await _idle(client)
        (job,) = stack.queue_jobs(1, duration_s=1.0)
        await stack.wait_jobs_finished([job], within_s=60)
        await client.get_workflow_handle(warm_runner_workflow_id(served_by)).result()
        [drained] = [name for name in await _idle(client) if name != served_by]
        await stack.set_min_idle(0)
        await client.get_workflow_handle(warm_pool_workflow_id(POOL)).result()
        await client.get_workflow_handle(warm_runner_workflow_id(drained)).result()

        HISTORIES.mkdir(exist_ok=True)
        for old in HISTORIES.glob("warm-*.json"):
            old.unlink()
        print(f"recorded into {HISTORIES}:")
        await _save(client, warm_pool_workflow_id(POOL), "warm-pool")
        await _save(client, warm_runner_workflow_id(served_by), "warm-runner-served")
        await _save(client, warm_runner_workflow_id(drained), "warm-runner-drained")
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
