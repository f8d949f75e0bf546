"""Queued -> in_progress latency with and without a warm pool, for runners slow to start.

    .venv/bin/python -m bench.warm_pool_bench [--jobs 20] [--every 2] [--start-delay 5] [--min-idle 4]

Each mode runs the embedded stack (real Temporal dev server, worker, starter, GitHub simulator,
local runner processes) with every runner sleeping `--start-delay` seconds before it connects,
as a GPU sandbox pulling its image would. Jobs are queued one every `--every` seconds; the
latency of a job runs from queueing it in the simulator to the simulator change that
assigned it to a runner (GitHub's own timestamps are whole seconds). The warm mode
waits until its `min_idle` runners stand ready before the first job.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
import uuid
from pathlib import Path

from temporalio.client import Client

from mayfly.app.embedded import SIMULATED_RUNNER, EmbeddedStack
from mayfly.devserver import local_environment
from mayfly.process import exit_now
from mayfly.warm import WarmPoolStatus, warm_pool_workflow_id

START_DELAY_ENV = "MAYFLY_SIM_RUNNER_START_DELAY_S"


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with 20 samples, p99 is the slowest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def run_mode(client: Client, args: argparse.Namespace, min_idle: int, state_dir: Path) -> list[float]:
    pool = f"b{uuid.uuid4().hex[:8]}"
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        max_runners=args.cap,
        task_queue=f"bench-{uuid.uuid4().hex[:6]}",
        pool=pool,
        runner_command=SIMULATED_RUNNER,
        runner_env={START_DELAY_ENV: str(args.start_delay)},
        registration_timeout_s=120,
        min_idle=min_idle,
    )
    await stack.start()
    try:
        if min_idle:
            deadline = time.monotonic() + 180
            handle = stack.client.get_workflow_handle(warm_pool_workflow_id(pool))
            while len((await handle.query("status", result_type=WarmPoolStatus)).idle) < min_idle:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the warm pool did not reach {min_idle} idle runners in 180 s")
                await asyncio.sleep(0.5)
        # The simulator stamps jobs to the second, as GitHub does: the bench keeps its own clock,
        # noting each job's start at the simulator change that assigned it.
        queued_at: dict[int, float] = {}
        started_at: dict[int, float] = {}

        def note_starts() -> bool:
            now = time.monotonic()
            for job_id in queued_at.keys() - started_at.keys():
                if stack.simulator.job(job_id).status in ("in_progress", "completed"):
                    started_at[job_id] = now
            return bool(len(started_at) == args.jobs)

        watcher = asyncio.create_task(stack.simulator.wait_for(note_starts, args.timeout))
        for _ in range(args.jobs):
            [job_id] = stack.queue_jobs(1, duration_s=args.job_seconds)
            queued_at[job_id] = time.monotonic()
            await asyncio.sleep(args.every)
        await watcher
        await stack.wait_jobs_finished(list(queued_at), within_s=args.timeout)
        latencies = [started_at[job_id] - queued_at[job_id] for job_id in queued_at]
        if min_idle:
            await stack.set_min_idle(0)
            await stack.client.get_workflow_handle(warm_pool_workflow_id(pool)).result()
        return latencies
    finally:
        await stack.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between queued jobs")
    parser.add_argument("--job-seconds", type=float, default=3.0)
    parser.add_argument("--start-delay", type=float, default=5.0, help="runner start time, seconds")
    parser.add_argument("--cap", type=int, default=8)
    parser.add_argument("--min-idle", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    env = await local_environment()
    results: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for min_idle in (0, args.min_idle):
            results[min_idle] = await run_mode(env.client, args, min_idle, Path(tmp) / f"warm{min_idle}")
    await env.shutdown()

    print(
        f"{args.jobs} jobs of {args.job_seconds:.0f}s, one every {args.every:.1f}s; runners take "
        f"{args.start_delay:.0f}s to start; cap {args.cap}"
    )
    print(f"{'queued -> in_progress':<24} {'p50':>9} {'p99':>9} {'max':>9}")
    for min_idle, latencies in results.items():
        print(
            f"{f'min_idle = {min_idle}':<24} {percentile(latencies, 50):>8.3f}s "
            f"{percentile(latencies, 99):>8.3f}s {max(latencies):>8.3f}s"
        )
    cold, warm = results[0], results[args.min_idle]
    print(
        f"warm pool saves {percentile(cold, 50) - percentile(warm, 50):.2f}s at p50 and "
        f"{percentile(cold, 99) - percentile(warm, 99):.2f}s at p99 "
        f"(runner start time {args.start_delay:.1f}s)"
    )


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    exit_now(0)
