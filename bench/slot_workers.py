"""Workers for the semaphore benchmarks, laid out as the product's (see `mayfly.app.wiring`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from temporalio.client import Client
from temporalio.worker import Worker

from activities.slots import SlotActivities
from mayfly.models import SemaphoreTerms, semaphore_task_queue
from mayfly.temporal import WORKFLOW_RUNNER
from workflows.slot_semaphore import SlotSemaphoreWorkflow


@contextlib.asynccontextmanager
async def slot_workers(
    client: Client,
    task_queue: str,
    terms: Mapping[str, SemaphoreTerms],
    holders: Sequence[type],
    holder_activities: Sequence[Callable[..., Awaitable[object]]] = (),
    *,
    shared_queue: bool = False,
) -> AsyncIterator[None]:
    """Holder workflows on `task_queue`, the semaphores on its slots queue as in the product
    (or on the holders' queue with `shared_queue`), both with the product's sandbox settings so
    the figures are its own. `terms` is read at each call: pools may be added while it runs."""
    slots = SlotActivities({}, terms, None if shared_queue else task_queue)
    workers = [
        Worker(
            client,
            task_queue=task_queue,
            workflows=[*holders, *([SlotSemaphoreWorkflow] if shared_queue else [])],
            activities=[*(slots.all() if shared_queue else slots.for_leases()), *holder_activities],
            workflow_runner=WORKFLOW_RUNNER,
        )
    ]
    if not shared_queue:
        workers.append(
            Worker(
                client,
                task_queue=semaphore_task_queue(task_queue),
                workflows=[SlotSemaphoreWorkflow],
                activities=slots.for_semaphores(),
                workflow_runner=WORKFLOW_RUNNER,
            )
        )
    async with contextlib.AsyncExitStack() as running:
        for worker in workers:
            await running.enter_async_context(worker)
        yield
