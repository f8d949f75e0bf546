"""The semaphore's waiter queue and its memory of released requests, both O(1) per operation.

Pure data structures with no Temporal calls, so the semaphore workflow stays deterministic and
the queue can be tested and measured on its own. Each signal the semaphore handles touches a
constant number of entries, however long the backlog: a waiter list that is scanned or rebuilt
per signal is what stalled workflow tasks past the deadlock detector at 9,000 waiters.
"""

from __future__ import annotations

import base64
import itertools
import json
import zlib
from collections import OrderedDict, deque
from datetime import UTC, datetime

from mayfly.models import AcquireRequest

# Beyond this many waiters an acquire is not queued; the waiter finds out on its next recheck
# and asks again. It bounds the carried state: about 40 bytes per waiter once packed.
MAX_QUEUED_WAITERS = 20_000
RECENTLY_RELEASED_KEPT = 2_000


class WaiterQueue:
    """FIFO of acquire requests, indexed by request id (an OrderedDict: O(1) append, pop, remove)."""

    def __init__(self, waiters: list[AcquireRequest] | None = None, limit: int = MAX_QUEUED_WAITERS) -> None:
        self._limit = limit
        self._waiters: OrderedDict[str, AcquireRequest] = OrderedDict(
            (waiter.request_id, waiter) for waiter in waiters or []
        )

    def __len__(self) -> int:
        return len(self._waiters)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiters

    def push(self, request: AcquireRequest) -> bool:
        """False when the queue is full; a duplicate is a no-op that reports True."""
        if request.request_id in self._waiters:
            return True
        if len(self._waiters) >= self._limit:
            return False
        self._waiters[request.request_id] = request
        return True

    def pop_first(self) -> AcquireRequest:
        return self._waiters.popitem(last=False)[1]

    def remove(self, request_id: str) -> None:
        self._waiters.pop(request_id, None)

    def head(self, count: int) -> list[str]:
        ids: list[str] = []
        for request_id in self._waiters:
            if len(ids) >= count:
                break
            ids.append(request_id)
        return ids

    def first(self, count: int) -> list[AcquireRequest]:
        """The `count` oldest waiters: O(count), whatever the backlog."""
        return list(itertools.islice(self._waiters.values(), count))

    def position_of(self, holder_workflow_id: str) -> int | None:
        """1-based place in the queue of that workflow's first request. A scan: for an operator's
        question, never for a signal handler."""
        for place, request in enumerate(self._waiters.values(), start=1):
            if request.holder_workflow_id == holder_workflow_id:
                return place
        return None

    def all(self) -> list[AcquireRequest]:
        return list(self._waiters.values())


class ReleasedMemory:
    """The last N released request ids, so a duplicate acquire arriving after its release
    cannot take a slot nobody will give back."""

    def __init__(self, released: list[str] | None = None, kept: int = RECENTLY_RELEASED_KEPT) -> None:
        self._kept = kept
        self._order: deque[str] = deque()
        self._ids: set[str] = set()
        for request_id in released or []:
            self.add(request_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids

    def add(self, request_id: str) -> None:
        if request_id in self._ids:
            return
        self._ids.add(request_id)
        self._order.append(request_id)
        if len(self._order) > self._kept:
            self._ids.discard(self._order.popleft())

    def all(self) -> list[str]:
        return list(self._order)


def pack(waiters: WaiterQueue, released: ReleasedMemory) -> str:
    """One compact, deterministic string: JSON rows, zlib, base64.

    A request id usually repeats its holder's workflow and run ids, which zlib removes, so a
    waiter costs about 40 bytes instead of the ~250 of a serialised `AcquireRequest`.
    """
    rows = [
        [w.request_id, w.holder_workflow_id, w.holder_run_id, _to_ms(w.requested_at)] for w in waiters.all()
    ]
    raw = json.dumps({"w": rows, "r": released.all()}, separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(raw, 6)).decode("ascii")


def unpack(packed: str) -> tuple[list[AcquireRequest], list[str]]:
    if not packed:
        return [], []
    data = json.loads(zlib.decompress(base64.b64decode(packed)))
    waiters = [
        AcquireRequest.model_construct(
            request_id=row[0], holder_workflow_id=row[1], holder_run_id=row[2], requested_at=_from_ms(row[3])
        )
        for row in data["w"]
    ]
    return waiters, list(data["r"])


def _to_ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
