"""Workers for the semaphore benchmarks, laid out as the product's (see `mayfly.app.wiring`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

from activities.slots import SlotActivities
from bench.semaphore_process import READY
from mayfly.app.wiring import semaphore_worker
from mayfly.models import SemaphoreTerms
from mayfly.temporal import WORKFLOW_RUNNER
from workflows.slot_semaphore import SlotSemaphoreWorkflow


class Layout(StrEnum):
    # `mayfly worker --role jobs` beside `mayfly worker --role semaphores`.
    PROCESS = "process"
    # `mayfly worker` (role all): the semaphores' worker in the holders' process.
    WORKER = "worker"
    # The semaphores on the holders' own task queue, in the sandbox (as before they had their own).
    SHARED_QUEUE = "shared-queue"


def add_layout_argument(parser: argparse.ArgumentParser, default: Layout) -> None:
    parser.add_argument(
        "--layout",
        choices=[layout.value for layout in Layout],
        default=default.value,
        help="where the semaphores run: a process of their own (mayfly worker --role semaphores), "
        "the holders' process (mayfly worker), or the holders' task queue",
    )


class SemaphoreProcess:
    """The child running the semaphores under `Layout.PROCESS`, for its CPU and memory figures."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    def _proc(self, name: str) -> str:
        return (Path("/proc") / str(self.process.pid) / name).read_text()

    def rss_mb(self) -> float:
        for line in self._proc("status").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_s(self) -> float:
        fields = self._proc("stat").rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await self.process.wait()


@contextlib.asynccontextmanager
async def slot_workers(
    client: Client,
    task_queue: str,
    terms: Mapping[str, SemaphoreTerms],
    holders: Sequence[type],
    holder_activities: Sequence[Callable[..., Awaitable[object]]] = (),
    *,
    layout: Layout = Layout.WORKER,
) -> AsyncIterator[SemaphoreProcess | None]:
    """Holder workflows on `task_queue` and the semaphores as `layout` places them, with the
    product's workflow runners so the figures are its own. `terms` is read at each call: pools
    may be added while it runs. Yields the semaphores' process under `Layout.PROCESS`."""
    shared = layout is Layout.SHARED_QUEUE
    slots = SlotActivities({}, terms, None if shared else task_queue)
    holder_worker = Worker(
        client,
        task_queue=task_queue,
        workflows=[*holders, *([SlotSemaphoreWorkflow] if shared else [])],
        activities=[*(slots.all() if shared else slots.for_leases()), *holder_activities],
        workflow_runner=WORKFLOW_RUNNER,
    )
    async with contextlib.AsyncExitStack() as running:
        await running.enter_async_context(holder_worker)
        if layout is Layout.WORKER:
            await running.enter_async_context(semaphore_worker(client, slots, task_queue))
        child = None
        if layout is Layout.PROCESS:
            child = await start_semaphore_process(client, task_queue)
            running.push_async_callback(child.stop)
        yield child


async def start_semaphore_process(client: Client, task_queue: str) -> SemaphoreProcess:
    """`bench.semaphore_process` for the holders on `task_queue`, once its worker polls."""
    address = client.service_client.config.target_host
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.semaphore_process", address, task_queue, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    async with asyncio.timeout(60):
        while READY not in (line := (await process.stdout.readline()).decode()):
            if not line:
                raise RuntimeError(f"the semaphore process exited with {await process.wait()}")
    return SemaphoreProcess(process)
