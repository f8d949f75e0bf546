"""The semaphore's waiter queue on its own: cost per operation at a full backlog.

    .venv/bin/python -m bench.slot_queue_bench [--waiters 20000]

Prints microseconds per push, remove and pop, and the milliseconds to pack the queue for
continue-as-new and rebuild it in the next run, for three arrival patterns: requests for no job
(warm runners, test holders), jobs arriving in id order (the common case) and jobs arriving in
random order (the worst case for the sorted back lane). Target: every figure far below the
semaphore's workflow-task budget (well under 1 s per task at 10,000 waiters).
"""

from __future__ import annotations

import argparse
import random
import time
from datetime import UTC, datetime

from mayfly.models import AcquireRequest
from mayfly.slot_queue import ReleasedMemory, WaiterQueue, pack, unpack


def request(i: int, job_id: int | None) -> AcquireRequest:
    return AcquireRequest(
        request_id=f"mayfly-job-{i}/run-{i}",
        holder_workflow_id=f"mayfly-job-{i}",
        holder_run_id=f"run-{i}",
        requested_at=datetime.now(UTC),
        job_id=job_id,
    )


def measure(label: str, job_ids: list[int | None]) -> None:
    requests = [request(i, job_id) for i, job_id in enumerate(job_ids)]
    queue = WaiterQueue()
    started = time.perf_counter()
    for item in requests:
        queue.push(item)
    push_us = (time.perf_counter() - started) / len(requests) * 1e6
    removed = [item.request_id for item in random.Random(1).sample(requests, len(requests) // 10)]
    started = time.perf_counter()
    for request_id in removed:
        queue.remove(request_id)
    remove_us = (time.perf_counter() - started) / len(removed) * 1e6
    started = time.perf_counter()
    packed = pack(queue, ReleasedMemory())
    pack_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    rebuilt = WaiterQueue(unpack(packed)[0])
    rebuild_ms = (time.perf_counter() - started) * 1000
    assert rebuilt.head(len(rebuilt)) == queue.head(len(queue))
    count = len(queue)
    started = time.perf_counter()
    for _ in range(count):
        queue.pop_first()
    pop_us = (time.perf_counter() - started) / count * 1e6
    print(
        f"{label:<24} push {push_us:5.1f} us  remove {remove_us:5.1f} us  pop {pop_us:5.1f} us  "
        f"pack {pack_ms:4.0f} ms  rebuild {rebuild_ms:4.0f} ms  ({len(packed) // 1024} KiB packed)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--waiters", type=int, default=20_000)
    args = parser.parse_args()
    n = args.waiters
    print(f"{n:,} waiters")
    measure("no job, arrival order", [None] * n)
    measure("jobs in id order", list(range(n)))
    measure("jobs in random order", random.Random(2).sample(range(n), n))


if __name__ == "__main__":
    main()
