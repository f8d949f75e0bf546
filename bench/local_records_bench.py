"""Local backend records: list() over many records, and how long it stalls the event loop.

    .venv/bin/python -m bench.local_records_bench [--records 2000] [--live 50]

Writes `--records` records whose processes are gone (the worst case: each one needs a look
at its process group) plus `--live` real sleeping runners, then times `list()` while a
ticker measures the event loop's longest stall. Issue 12 measured 3 s on the event loop for
2,000 records before /proc scans moved off it. Target: stall well under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from mayfly.backends import ContainerState
from mayfly.backends.local import LocalProcessBackend
from mayfly.config import LocalBackendSettings

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


async def ticker(stop: asyncio.Event, stalls: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(0.005)
        stalls.append(loop.time() - before - 0.005)


async def ticks(stalls: list[float], count: int) -> None:
    """Until the ticker has completed `count` more ticks (so a stall in between is measured)."""
    target = len(stalls) + count
    while len(stalls) < target:  # noqa: ASYNC110 (the ticker itself is what is measured)
        await asyncio.sleep(0.001)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--live", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        state_dir = Path(scratch) / "state"
        local = LocalProcessBackend(LocalBackendSettings(command=SLEEPER, state_dir=state_dir))
        for index in range(args.records):
            # pid 2**22 - index: above the usual pid range, so no such process (a stale record).
            record = {
                "name": f"stale-{index}",
                "pid": 4_194_303 - index,
                "start_ticks": 1,
                "owner_workflow_id": "wf",
                "job_id": index,
            }
            (state_dir / f"stale-{index}.json").write_text(json.dumps(record))
        for index in range(args.live):
            await local.spawn(
                name=f"live-{index}", owner_workflow_id="wf", job_id=index, jit_config="x", max_lifetime_s=600
            )
        try:
            stop = asyncio.Event()
            stalls: list[float] = []
            tick = asyncio.create_task(ticker(stop, stalls))
            await ticks(stalls, 2)
            started = time.perf_counter()
            records = await local.list()
            took = time.perf_counter() - started
            await ticks(stalls, 2)
            stop.set()
            await tick
            running = sum(record.state is ContainerState.RUNNING for record in records)
            print(f"records listed: {len(records)} ({running} running, {len(records) - running} gone)")
            print(f"list() took: {took * 1000:.0f} ms")
            stall = max(stalls, default=0.0)
            print(f"longest event-loop stall during list(): {stall * 1000:.1f} ms (target < 100 ms)")
            print(f"ratio to the 3 s on-loop stall measured in issue 12: {stall / 3.0:.4f}")
        finally:
            for index in range(args.live):
                await local.terminate(f"live-{index}")


if __name__ == "__main__":
    asyncio.run(main())
