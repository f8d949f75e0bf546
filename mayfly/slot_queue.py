"""The semaphore's waiter queue and its memory of released requests, O(log n) at most per operation.

Pure data structures with no Temporal calls, so the semaphore workflow stays deterministic and
the queue can be tested and measured on its own. Each signal the semaphore handles touches a
constant number of entries, however long the backlog: a waiter list that is scanned or rebuilt
per signal is what stalled workflow tasks past the deadlock detector at 9,000 waiters.
"""

from __future__ import annotations

import base64
import bisect
import itertools
import json
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from datetime import UTC, datetime

from mayfly.models import AcquireRequest

# Beyond this many waiters an acquire is not queued; the waiter finds out on its next recheck
# and asks again. It bounds the carried state: about 40 bytes per waiter once packed.
MAX_QUEUED_WAITERS = 20_000
RECENTLY_RELEASED_KEPT = 2_000


class WaiterQueue:
    """Acquire requests, indexed by request id, in two lanes.

    The front lane is FIFO, for jobs asking again because a runner of theirs went to another
    job (runners are not bound to jobs). Such a job already waited its turn once, and the job
    its runner took leaves the queue in exchange; at the back it would wait for the whole
    backlog a second time and become the run's tail.

    The back lane serves older GitHub jobs first, then requests for no job in arrival order.
    GitHub gives an idle runner the oldest queued job; granting in the order the requests
    happened to arrive would start runners that take other waiters' jobs. A new job's id is
    higher than those waiting, so a push lands at the end: a binary search finds every place,
    and a pop or removal shifts the sorted list by one memmove, microseconds at 20,000 waiters.
    """

    def __init__(self, waiters: list[AcquireRequest] | None = None, limit: int = MAX_QUEUED_WAITERS) -> None:
        self._limit = limit
        self._front: OrderedDict[str, AcquireRequest] = OrderedDict()
        # Sorted (older job first, then arrival); `_back_keys` finds an entry to remove.
        self._back: list[tuple[int, int, int, str]] = []
        self._back_keys: dict[str, tuple[int, int, int, str]] = {}
        self._requests: dict[str, AcquireRequest] = {}
        self._arrivals = itertools.count()
        for waiter in waiters or []:
            self._store(waiter)

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def _store(self, request: AcquireRequest) -> None:
        rid = request.request_id
        self._requests[rid] = request
        if request.front:
            self._front[rid] = request
            return
        job_id = request.job_id
        key = (0 if job_id is not None else 1, job_id or 0, next(self._arrivals), rid)
        self._back_keys[rid] = key
        bisect.insort(self._back, key)

    def push(self, request: AcquireRequest) -> bool:
        """False when the queue is full; a duplicate is a no-op that reports True."""
        if request.request_id in self:
            return True
        if len(self) >= self._limit:
            return False
        self._store(request)
        return True

    def pop_first(self) -> AcquireRequest:
        if self._front:
            rid = self._front.popitem(last=False)[0]
        else:
            rid = self._back.pop(0)[3]
            del self._back_keys[rid]
        return self._requests.pop(rid)

    def remove(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is None:
            return
        self._front.pop(request_id, None)
        key = self._back_keys.pop(request_id, None)
        if key is not None:
            del self._back[bisect.bisect_left(self._back, key)]

    def _in_order(self) -> Iterator[AcquireRequest]:
        requests = self._requests
        return itertools.chain(self._front.values(), (requests[key[3]] for key in self._back))

    def head(self, count: int) -> list[str]:
        return [request.request_id for request in self.first(count)]

    def first(self, count: int) -> list[AcquireRequest]:
        """The `count` next waiters: O(count), whatever the backlog."""
        return list(itertools.islice(self._in_order(), count))

    def position_of(self, holder_workflow_id: str) -> int | None:
        """1-based place in the queue of that workflow's first request. A scan: for an operator's
        question, never for a signal handler."""
        for place, request in enumerate(self._in_order(), start=1):
            if request.holder_workflow_id == holder_workflow_id:
                return place
        return None

    def all(self) -> list[AcquireRequest]:
        return list(self._in_order())


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
        [w.request_id, w.holder_workflow_id, w.holder_run_id, _to_ms(w.requested_at), int(w.front), w.job_id]
        for w in waiters.all()
    ]
    raw = json.dumps({"w": rows, "r": released.all()}, separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(raw, 6)).decode("ascii")


def unpack(packed: str) -> tuple[list[AcquireRequest], list[str]]:
    if not packed:
        return [], []
    data = json.loads(zlib.decompress(base64.b64decode(packed)))
    waiters = [
        AcquireRequest.model_construct(
            request_id=row[0],
            holder_workflow_id=row[1],
            holder_run_id=row[2],
            requested_at=_from_ms(row[3]),
            front=bool(row[4]),
            job_id=row[5],
        )
        for row in data["w"]
    ]
    return waiters, list(data["r"])


def _to_ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
