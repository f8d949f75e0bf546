"""A minimal semaphore holder for tests and benchmarks, plus an independent ledger of holders.

The ledger lives in the test process and is told by the holder itself (after its grant,
before its release), so it checks the semaphore from outside the semaphore's own state.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import BaseModel
from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    from activities.slots import SlotActivities
    from mayfly.models import ReleaseRequest, SlotGrant, SlotRelease, SlotSoon
    from workflows.shield import uncancellable
    from workflows.slot_lease import SlotLease


class HolderInput(BaseModel):
    pool: str
    hold_s: float = 0.0
    # More than one cycle takes and returns a slot repeatedly, as a busy pool sees it.
    cycles: int = 1
    # Ask in the semaphore's front lane, as a job whose runner went to another job does.
    front: bool = False
    # The GitHub job the slot would be for: it orders the semaphore's waiters.
    job_id: int | None = None


@dataclass
class Ledger:
    current: set[str] = field(default_factory=set)
    exited: set[str] = field(default_factory=set)
    max_seen: int = 0
    entries: int = 0
    # An entry after the request's exit: a slot granted twice.
    duplicates: int = 0
    # An entry while the request is still held: the enter ran twice (an activity retried
    # after its result was lost), not a second grant.
    repeated_enters: int = 0
    entered_at: dict[str, float] = field(default_factory=dict)
    exited_at: dict[str, float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @activity.defn(name="test.ledger_enter")
    async def enter(self, request_id: str) -> None:
        if request_id in self.current:
            self.repeated_enters += 1
            return
        if request_id in self.exited:
            self.duplicates += 1
            return
        self.current.add(request_id)
        self.entries += 1
        self.entered_at[request_id] = time.monotonic()
        self.max_seen = max(self.max_seen, len(self.current))
        self._notify()

    @activity.defn(name="test.ledger_exit")
    async def exit(self, request_id: str) -> None:
        self.current.discard(request_id)
        self.exited.add(request_id)
        self.exited_at[request_id] = time.monotonic()
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def until(self, predicate: object, within_s: float) -> None:
        assert callable(predicate)
        async with asyncio.timeout(within_s):
            while not predicate():
                await self.changed.wait()


@workflow.defn(name="TestSlotHolder")
class SlotHolderWorkflow:
    @workflow.init
    def __init__(self, params: HolderInput) -> None:
        self._request_id = ""

    @workflow.query
    def request_id(self) -> str:
        return self._request_id

    @workflow.run
    async def run(self, params: HolderInput) -> None:
        for cycle in range(params.cycles):
            async with SlotLease(
                params.pool, key=str(cycle) if cycle else "", front=params.front, job_id=params.job_id
            ) as lease:
                self._request_id = lease.request_id
                await lease.acquire()
                await self._hold(lease.request_id, params.hold_s)

    async def _hold(self, request_id: str, hold_s: float) -> None:
        # Activities, not local ones: a local activity runs again when the workflow task that
        # ran it fails (a signal arrived as it completed), and the ledger would count that
        # second entry as a slot granted twice.
        # Both run to their end even when the holder is cancelled meanwhile. A cancelled activity
        # call returns at once but the activity may still run later: an enter would then stand
        # in the ledger with no exit, and a slot given back would look held for ever after.
        try:
            await uncancellable(
                workflow.execute_activity_method(
                    Ledger.enter, request_id, start_to_close_timeout=timedelta(seconds=5)
                )
            )
            if hold_s > 0:
                await workflow.sleep(hold_s)
        finally:
            await uncancellable(
                workflow.execute_activity_method(
                    Ledger.exit, request_id, start_to_close_timeout=timedelta(seconds=5)
                )
            )


@workflow.defn(name="LightSlotHolder", sandboxed=False)
class LightSlotHolderWorkflow(SlotHolderWorkflow):
    """The same holder outside the workflow sandbox, for a benchmark that starts thousands.

    A sandboxed workflow re-imports its modules on creation; at 10,000 acquirers on two
    cores that, not the semaphore under test, would set the pace.
    """

    @workflow.run
    async def run(self, params: HolderInput) -> None:
        await super().run(params)


class CycleTimes(BaseModel):
    granted: list[datetime]
    released: list[datetime]


@workflow.defn(name="BenchSlotHolder")
class BenchHolderWorkflow:
    """Takes and returns a slot `cycles` times; no instrumentation activities on the hot path."""

    @workflow.run
    async def run(self, params: HolderInput) -> CycleTimes:
        times = CycleTimes(granted=[], released=[])
        for cycle in range(params.cycles):
            async with SlotLease(params.pool, key=str(cycle) if cycle else "") as lease:
                await lease.acquire()
                times.granted.append(workflow.now())
                times.released.append(workflow.now())
        return times


@workflow.defn(name="GrantSink")
class GrantSinkWorkflow:
    """Stands in for many holders at once: gives back every slot it is granted, at once.

    Lets a test or benchmark push thousands of grants through a semaphore with a handful of
    workflows instead of one workflow per acquirer.
    """

    @workflow.init
    def __init__(self, pool: str) -> None:
        self._granted: list[str] = []
        self.released = 0

    @workflow.signal(name="slot_granted")
    def slot_granted(self, grant: SlotGrant) -> None:
        self._granted.append(grant.request_id)

    @workflow.signal(name="slot_soon")
    def slot_soon(self, soon: SlotSoon) -> None:
        """Nothing to prepare: a sink gives slots straight back."""

    @workflow.query
    def released_count(self) -> int:
        return self.released

    @workflow.run
    async def run(self, pool: str) -> None:
        while True:
            await workflow.wait_condition(lambda: bool(self._granted))
            batch, self._granted = self._granted, []
            await asyncio.gather(
                *(
                    workflow.execute_local_activity_method(
                        SlotActivities.release,
                        SlotRelease(pool=pool, release=ReleaseRequest(request_id=request_id)),
                        start_to_close_timeout=timedelta(seconds=10),
                    )
                    for request_id in batch
                )
            )
            self.released += len(batch)
