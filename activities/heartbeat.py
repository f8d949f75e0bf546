"""Keep an activity visibly alive while it awaits one long call."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from temporalio import activity

T = TypeVar("T")

# Well inside every heartbeat timeout the workflows set (30 s and more).
HEARTBEAT_EVERY_S = 10.0


async def heartbeating(work: Coroutine[Any, Any, T], *details: Any) -> T:
    """Await `work`, heartbeating meanwhile. A single call can outlast a heartbeat timeout: a GPU
    sandbox create blocks for minutes, and a listing of thousands of jobs takes many pages. A
    missed heartbeat would retry the whole call from the start, and so would its retry. The
    heartbeats also let a cancellation reach the activity."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_EVERY_S)
            if done:
                return task.result()
            activity.heartbeat(*details)
    finally:
        if not task.done():
            task.cancel()
