"""Group commit: many concurrent callers' items sent as one call, with no delay when idle.

A call goes out at once when none to the same key is in flight. Items submitted while one is
in flight wait for it and then go out together, at most `max_batch` a call, and no sooner than
`min_gap_s` after the previous call to that key started. Each caller returns once the call
that carried its item succeeded, or raises what that call raised: a caller never returns
before its item was delivered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
T = TypeVar("T")


class GroupCommit(Generic[K, T]):
    def __init__(
        self, send: Callable[[K, list[T]], Awaitable[None]], *, max_batch: int, min_gap_s: float = 0.0
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._min_gap_s = min_gap_s
        self._pending: dict[K, list[tuple[T, asyncio.Future[None]]]] = {}
        self._senders: dict[K, asyncio.Task[None]] = {}
        self._last_start: dict[K, float] = {}

    async def submit(self, key: K, item: T) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((item, waiter))
        if key not in self._senders:
            self._senders[key] = asyncio.create_task(self._drain(key))
        # A caller that is cancelled stops waiting; its item may still go out, which the
        # receiver must (and does) take idempotently.
        await waiter

    async def _drain(self, key: K) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending.get(key):
                last_start = self._last_start.get(key)
                if last_start is not None:
                    gap = last_start + self._min_gap_s - loop.time()
                    if gap > 0:
                        await asyncio.sleep(gap)
                queued = self._pending[key]
                batch, self._pending[key] = queued[: self._max_batch], queued[self._max_batch :]
                self._last_start[key] = loop.time()
                try:
                    await self._send(key, [item for item, _ in batch])
                except Exception as error:
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(error)
                    continue
                for _, waiter in batch:
                    if not waiter.done():
                        waiter.set_result(None)
        finally:
            del self._senders[key]
            # Left only when this sender was cancelled (the worker is stopping): fail them,
            # rather than leave their callers waiting forever.
            for _, waiter in self._pending.pop(key, []):
                waiter.cancel()
