"""Group commit: one call at a time per key, everything that queued meanwhile in the next."""

from __future__ import annotations

import asyncio

import pytest

from mayfly.group_commit import GroupCommit


class Receiver:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.gate = asyncio.Event()
        self.called = asyncio.Event()
        self.fail_next = False

    async def send(self, key: str, items: list[int]) -> None:
        self.calls.append((key, items))
        self.called.set()
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("refused")


async def test_items_queued_during_a_call_go_out_together_in_order() -> None:
    receiver = Receiver()
    commit: GroupCommit[str, int] = GroupCommit(receiver.send, max_batch=3)
    first = asyncio.create_task(commit.submit("pool", 0))
    await receiver.called.wait()
    rest = [asyncio.create_task(commit.submit("pool", i)) for i in range(1, 6)]
    other = asyncio.create_task(commit.submit("other", 9))
    receiver.gate.set()
    await asyncio.gather(first, *rest, other)
    assert ("pool", [0]) in receiver.calls and ("other", [9]) in receiver.calls
    batches = [items for key, items in receiver.calls if key == "pool"]
    assert batches == [[0], [1, 2, 3], [4, 5]]


async def test_a_failed_call_fails_exactly_its_own_callers() -> None:
    receiver = Receiver()
    commit: GroupCommit[str, int] = GroupCommit(receiver.send, max_batch=10)
    receiver.fail_next = True
    first = asyncio.create_task(commit.submit("pool", 1))
    await receiver.called.wait()
    second = asyncio.create_task(commit.submit("pool", 2))
    receiver.gate.set()
    with pytest.raises(RuntimeError, match="refused"):
        await first
    await second
    assert receiver.calls == [("pool", [1]), ("pool", [2])]


async def test_calls_to_one_key_keep_the_minimum_gap() -> None:
    receiver = Receiver()
    receiver.gate.set()
    loop = asyncio.get_running_loop()
    started: list[float] = []

    async def timed_send(key: str, items: list[int]) -> None:
        started.append(loop.time())
        await receiver.send(key, items)

    commit: GroupCommit[str, int] = GroupCommit(timed_send, max_batch=10, min_gap_s=0.2)
    await commit.submit("pool", 1)
    await commit.submit("pool", 2)
    assert len(started) == 2 and started[1] - started[0] >= 0.2
