"""A backlog of thousands of acquirers on one pool, on a real Temporal dev server.

    .venv/bin/python -m bench.backlog_bench [--acquirers 10000] [--cap 20] [--enqueue-s 100]

Starts `--acquirers` holder workflows within `--enqueue-s` seconds (each asks the pool's
semaphore for a slot, holds it for `--hold-s`, gives it back), waits until all are served, and
prints what issue 11 asks for: the semaphore's longest workflow task, history events and bytes
per semaphore run, the largest carried state, worker RSS, time to first grant and drain
throughput. It checks, independently of the semaphore's own state, that every acquirer was
granted exactly once (the holders' ledger and the server's history), in FIFO order of arrival
(the history), and that the cap was never exceeded (the ledger). Targets: no workflow task
failure, RSS <= 512 MB, tasks well under 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time
import uuid
from pathlib import Path

from temporalio.client import Client

from bench.cpu import dev_server_cpu_s, own_cpu_s
from bench.semaphore_history import BENIGN_TASK_FAILURES, read_semaphore_history
from bench.slot_holder import HolderInput, Ledger, LightSlotHolderWorkflow
from bench.slot_workers import Layout, SemaphoreProcess, add_layout_argument, slot_workers
from mayfly.devserver import local_environment
from mayfly.models import SemaphoreTerms, waiter_recheck_s

RSS_TARGET_MB = 512


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def sample_rss(peak: list[float], child: SemaphoreProcess | None, stop: asyncio.Event) -> None:
    """Peaks of this process (holders, client) and of the semaphores' own process, if any."""
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mb())
        peak[1] = max(peak[1], child.rss_mb() if child else 0.0)
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            pass


async def enqueue(
    client: Client, task_queue: str, pool: str, args: argparse.Namespace
) -> tuple[float, list[str]]:
    """Start the acquirers at an even pace; returns when the last start returned."""
    interval = args.enqueue_s / args.acquirers
    started = time.monotonic()
    in_flight = asyncio.Semaphore(64)
    ids: list[str] = []

    async def one(i: int) -> None:
        delay = started + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        async with in_flight:
            handle = await client.start_workflow(
                LightSlotHolderWorkflow.run,
                HolderInput(pool=pool, hold_s=args.hold_s),
                id=f"{pool}-{i}",
                task_queue=task_queue,
            )
        ids.append(handle.id)

    await asyncio.gather(*(one(i) for i in range(args.acquirers)))
    return time.monotonic() - started, ids


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--acquirers", type=int, default=10_000)
    parser.add_argument("--cap", type=int, default=20)
    parser.add_argument("--enqueue-s", type=float, default=100.0, help="start all acquirers within this")
    parser.add_argument("--hold-s", type=float, default=0.0)
    add_layout_argument(parser, Layout.PROCESS)
    # The product's default: waiters recheck every 30 reap intervals (10 minutes).
    parser.add_argument("--reap-interval-s", type=float, default=20.0)
    parser.add_argument("--drain-timeout-s", type=float, default=1800.0)
    args = parser.parse_args()

    env = await local_environment()
    client = env.client
    task_queue = f"backlog-{uuid.uuid4().hex[:6]}"
    pool = f"backlog{uuid.uuid4().hex[:6]}"
    ledger = Ledger()
    peak_rss = [rss_mb(), 0.0]
    stop_sampling = asyncio.Event()
    cpu0, server_cpu0 = own_cpu_s(), dev_server_cpu_s()
    terms = {pool: SemaphoreTerms(capacity=args.cap, reap_interval_s=args.reap_interval_s)}
    async with slot_workers(
        client,
        task_queue,
        terms,
        [LightSlotHolderWorkflow],
        [ledger.enter, ledger.exit],
        layout=Layout(args.layout),
    ) as semaphores:
        sampler = asyncio.create_task(sample_rss(peak_rss, semaphores, stop_sampling))
        t0 = time.monotonic()
        enqueue_task = asyncio.create_task(enqueue(client, task_queue, pool, args))
        await ledger.until(lambda: ledger.entries >= 1, within_s=120)
        first_grant_s = time.monotonic() - t0
        enqueue_s, _ = await enqueue_task
        entries_at_enqueued = ledger.entries
        enqueued_at = time.monotonic()
        print(
            f"enqueued {args.acquirers} acquirers in {enqueue_s:.1f}s; {entries_at_enqueued} already served",
            flush=True,
        )
        async with asyncio.timeout(args.drain_timeout_s):
            while len(ledger.exited) < args.acquirers:
                # Three minutes without 200 more releases is a stall, and a failure.
                target = min(args.acquirers, len(ledger.exited) + 200)
                await ledger.until(lambda: len(ledger.exited) >= target, within_s=180)  # noqa: B023
                print(f"  served {len(ledger.exited)}/{args.acquirers}, rss {rss_mb():.0f} MB", flush=True)
        drained_at = time.monotonic()
        history = await read_semaphore_history(client, pool)
        semaphore_cpu = semaphores.cpu_s() if semaphores else 0.0
        stop_sampling.set()
        await sampler
    worker_cpu, server_cpu = own_cpu_s() - cpu0, dev_server_cpu_s() - server_cpu0
    rss_total = sum(peak_rss)
    await env.shutdown()

    makespan = drained_at - t0
    drain_rate = (args.acquirers - entries_at_enqueued) / max(1e-9, drained_at - enqueued_at)
    grants_per_request = collections.Counter(history.granted)
    granted_twice = sum(1 for n in grants_per_request.values() if n > 1)
    never_granted = args.acquirers - len(grants_per_request)
    failures = collections.Counter(c for run in history.runs for c in run.task_failures)
    harmful = {c: n for c, n in failures.items() if c not in BENIGN_TASK_FAILURES}
    runs = history.runs
    checks = {
        "every acquirer served once (ledger)": ledger.entries == args.acquirers and ledger.duplicates == 0,
        "every acquirer granted once (history)": granted_twice == 0 and never_granted == 0,
        "FIFO by arrival (history)": history.fifo_violations() == 0
        and len(history.acquired) == args.acquirers,
        "cap never exceeded (ledger)": ledger.max_seen <= args.cap,
        "no harmful workflow task failure": not harmful,
        f"worker RSS <= {RSS_TARGET_MB} MB": rss_total <= RSS_TARGET_MB,
    }

    print(
        f"\n{args.acquirers} acquirers, cap {args.cap}, hold {args.hold_s}s, enqueued in {enqueue_s:.1f}s; "
        f"semaphores laid out: {args.layout}"
    )
    print(f"time to first grant: {first_grant_s * 1000:.0f} ms")
    print(
        f"drain: {args.acquirers} served in {makespan:.1f}s overall ({args.acquirers / makespan:.1f}/s); "
        f"after the last start, {drain_rate:.1f} grants/s"
    )
    print(
        f"semaphore workflow tasks: max {history.max_task_s * 1000:.0f} ms "
        f"(target well under 1000 ms; measured/target {history.max_task_s:.2f})"
    )
    for index, run in history.slowest_tasks(5):
        print(
            f"  run {index}: slowest task {run.max_task_s * 1000:.0f} ms at event "
            f"{run.slowest_task_event_id}, after {run.slowest_task_signals} signals"
            f"{' (a replay: the task before it failed)' if run.slowest_task_replayed else ''}; "
            f"carried state {run.input_bytes / 1024:.0f} KiB"
        )
    print(
        f"semaphore runs: {len(runs)}; events per run max {max(r.events for r in runs)}, "
        f"mean {sum(r.events for r in runs) / len(runs):.0f}; history bytes per run max "
        f"{max(r.history_bytes for r in runs) / 1024:.0f} KiB, mean "
        f"{sum(r.history_bytes for r in runs) / len(runs) / 1024:.0f} KiB; largest carried state "
        f"{max(r.input_bytes for r in runs) / 1024:.0f} KiB (payload limit 2048 KiB)"
    )
    print(
        f"workflow task failures: {dict(failures) or 'none'} "
        f"(server-forced, nothing lost: {sorted(BENIGN_TASK_FAILURES)})"
    )
    print(
        f"ledger: max {ledger.max_seen} held at once (cap {args.cap}), duplicates {ledger.duplicates}, "
        f"enters repeated by a retried activity {ledger.repeated_enters}"
    )
    print(
        f"RSS peak: holders' worker+client {peak_rss[0]:.0f} MB, semaphores' process {peak_rss[1]:.0f} MB, "
        f"together {rss_total:.0f} MB (target <= {RSS_TARGET_MB}; measured/target "
        f"{rss_total / RSS_TARGET_MB:.2f})"
    )
    print(
        f"CPU: worker+client {worker_cpu:.0f}s, semaphores' process {semaphore_cpu:.0f}s, "
        f"dev server {server_cpu:.0f}s "
        f"over {makespan:.0f}s on 2 cores; "
        f"waiters recheck every {waiter_recheck_s(args.reap_interval_s):.0f}s"
    )
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    sys.stdout.flush()
    os._exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    asyncio.run(main())
