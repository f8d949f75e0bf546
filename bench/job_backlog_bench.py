"""Thousands of queued jobs on the real stack, drained, with the cap checked independently.

    .venv/bin/python -m bench.job_backlog_bench [--jobs 2000] [--cap 20] [--job-seconds 0.5]

Everything is real but GitHub: the dev server, the worker, the starter receiving the
simulator's signed webhooks (8 in flight, as GitHub sends them) and local runner processes.
Each runner is wrapped by the flock() probe (simulator/probe_runner.py), which records a
violation whenever more than `--cap` runner processes are alive at once, whatever Mayfly's own
state says. Prints: jobs served, probe violations, runners started, makespan and drain rate,
the semaphore's longest workflow task and its task failures, and this process's RSS (worker,
starter and simulator). Exits 1 when a job is left unserved or the cap was exceeded.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.backlog_bench import sample_rss
from bench.semaphore_history import read_semaphore_history
from bench.slot_workers import start_semaphore_process
from mayfly.app.embedded import EmbeddedStack
from mayfly.devserver import local_environment
from mayfly.process import exit_now
from simulator.probe import ConcurrencyProbe


async def run(args: argparse.Namespace) -> bool:
    env = await local_environment()
    ok = False
    with tempfile.TemporaryDirectory() as scratch:
        probe = ConcurrencyProbe(Path(scratch) / "probe", args.cap)
        pool = f"j{uuid.uuid4().hex[:8]}"
        task_queue = f"bench-{uuid.uuid4().hex[:6]}"
        stack = EmbeddedStack(
            env.client,
            state_dir=Path(scratch) / "state",
            task_queue=task_queue,
            pool=pool,
            max_runners=args.cap,
            runner_command=probe.command,
            runner_env=probe.env,
            registration_timeout_s=120,
            sweep_interval_s=60,
            # The product defaults: the embedded stack's shorter semaphore interval makes
            # 2,000 waiters recheck the semaphore four times as often.
            registration_poll_s=10.0,
            reconcile_min_age_s=120.0,
            semaphore_reap_interval_s=20.0,
            run_semaphores=not args.semaphores_process,
        )
        await stack.start()
        semaphores = None
        if args.semaphores_process:
            semaphores = await start_semaphore_process(env.client, task_queue)
        peak_rss = [0.0, 0.0]
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(peak_rss, semaphores, stop_sampling))
        try:
            started = time.monotonic()
            job_ids = stack.queue_jobs(args.jobs, duration_s=args.job_seconds)
            queued_s = time.monotonic() - started
            await stack.wait_jobs_finished(job_ids, within_s=args.timeout)
            makespan = time.monotonic() - started
            served = sum(1 for job_id in job_ids if stack.simulator.job(job_id).conclusion == "success")
            stop_sampling.set()
            await sampler
            history = await read_semaphore_history(env.client, pool)
            violations = probe.violations()
            print(f"{args.jobs} jobs of {args.job_seconds}s queued in {queued_s:.1f}s, cap {args.cap}")
            print(f"served: {served}/{args.jobs}; runners started: {len(probe.starts())}")
            print(f"cap exceeded (probe violations): {len(violations)}")
            print(f"makespan {makespan:.1f}s; drain {args.jobs / makespan:.1f} jobs/s")
            print(
                f"semaphore: {len(history.runs)} runs, "
                f"longest workflow task {history.max_task_s * 1000:.0f} ms, "
                f"harmful task failures {len(history.harmful_task_failures)}"
            )
            print(
                f"peak RSS of worker + starter + simulator: {peak_rss[0]:.0f} MB; "
                f"of the semaphores' own process: {peak_rss[1]:.0f} MB"
            )
            ok = served == args.jobs and not violations
            print("PASS" if ok else "FAIL")
        finally:
            stop_sampling.set()
            await stack.stop()
            if semaphores is not None:
                await semaphores.stop()
    await env.shutdown()
    return ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--cap", type=int, default=20)
    parser.add_argument("--job-seconds", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument(
        "--semaphores-process",
        action="store_true",
        help="run the semaphores in a process of their own (mayfly worker --role semaphores)",
    )
    ok = asyncio.run(run(parser.parse_args()))
    sys.stdout.flush()
    # The SDK's runtime threads can abort the interpreter's shutdown; nothing is left to do.
    exit_now(0 if ok else 1)


if __name__ == "__main__":
    main()
