"""Running cleanup to its end inside a workflow that is being cancelled."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import TypeVar

from temporalio import workflow

T = TypeVar("T")


async def uncancellable(work: Awaitable[T]) -> T:
    """Run `work` to its end even if the workflow is cancelled meanwhile; re-raise the cancel after.

    Cleanup (giving a slot back, tearing a runner down) must not stop half-way because an
    operator cancelled the workflow: that is exactly when it must run.
    """
    if not workflow.in_workflow():
        # The workflow is being evicted from the worker's cache (or the worker is stopping):
        # its coroutines are closed outside their event loop. It has not ended, and its next
        # worker replays it, so no cleanup belongs here.
        if inspect.iscoroutine(work):
            work.close()
        raise GeneratorExit
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError("workflow cancelled during cleanup")
    return result
