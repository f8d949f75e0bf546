"""Running cleanup to its end inside a workflow that is being cancelled."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Awaitable
from typing import TypeVar

from temporalio import workflow

T = TypeVar("T")

_log = logging.getLogger(__name__)


async def uncancellable(work: Awaitable[T]) -> T:
    """Run `work` to its end even if the workflow is cancelled meanwhile; re-raise the cancel after.

    Cleanup (giving a slot back, tearing a runner down) must not stop half-way because an
    operator cancelled the workflow: that is exactly when it must run.
    """
    if _being_closed():
        # The coroutine is being closed, not cancelled: a workflow evicted from the worker's
        # cache left it behind and the garbage collector is finishing it off. That can happen
        # in the middle of another workflow's task, and `workflow.in_workflow()` is then true of
        # that other workflow: cleanup started here would issue commands in its history (a
        # teardown, a release) that its replay cannot produce, wedging it on a
        # non-determinism error, and would act on a runner the evicted workflow's next replay
        # still owns. That replay does the cleanup when it is due.
        _log.warning(
            "cleanup in %s skipped: its workflow was evicted and its next replay owns it",
            sys._getframe(1).f_code.co_qualname,
        )
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


def _being_closed() -> bool:
    """True when called, directly or through `finally`/`__aexit__`, from a coroutine's close()."""
    return isinstance(sys.exc_info()[1], GeneratorExit) or not workflow.in_workflow()
