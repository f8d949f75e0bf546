"""The pools' semaphores in a process of their own, as `mayfly worker --role semaphores` runs them.

    .venv/bin/python -m bench.semaphore_process <temporal address> <holders' task queue>

Prints a line once its worker polls, and shuts the worker down on SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys

from temporalio.client import Client

from activities.slots import SlotActivities
from mayfly.app.wiring import semaphore_worker
from mayfly.process import exit_now, stop_on_signals
from mayfly.temporal import DATA_CONVERTER

READY = "semaphore worker polling"


async def main(address: str, task_queue: str) -> None:
    stop = stop_on_signals()
    client = await Client.connect(address, data_converter=DATA_CONVERTER)
    # Only the semaphores' own activities run here; they need no pool terms and no backend.
    async with semaphore_worker(client, SlotActivities({}, {}, task_queue), task_queue):
        print(READY, flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))
    exit_now(0)
