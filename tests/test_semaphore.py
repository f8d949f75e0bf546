"""The slot semaphore on the real dev server: the cap holds under bursts, nothing leaks."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import AsyncIterator

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import CancelledError
from temporalio.worker import Worker

from activities.slots import SlotActivities
from bench.slot_holder import HolderInput, Ledger, SlotHolderWorkflow
from mayfly.devserver import temporal_cli
from mayfly.models import AcquireRequest, ReleaseRequest, SemaphoreStatus, semaphore_workflow_id
from workflows.slot_semaphore import SlotSemaphoreWorkflow


@pytest.fixture
async def ledger(client: Client, task_queue: str) -> AsyncIterator[Ledger]:
    ledger = Ledger()
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[SlotSemaphoreWorkflow, SlotHolderWorkflow],
        activities=[
            *SlotActivities({}).all(),
            ledger.enter,
            ledger.exit,
        ],
        max_concurrent_workflow_tasks=50,
    ):
        yield ledger


async def start_holder(
    client: Client, task_queue: str, pool: str, name: str, *, capacity: int, hold_s: float
) -> WorkflowHandle[SlotHolderWorkflow, None]:
    return await client.start_workflow(
        SlotHolderWorkflow.run,
        HolderInput(pool=pool, capacity=capacity, hold_s=hold_s),
        id=f"{pool}-{name}",
        task_queue=task_queue,
    )


async def status(client: Client, pool: str) -> SemaphoreStatus:
    result: SemaphoreStatus = await client.get_workflow_handle(semaphore_workflow_id(pool)).query(
        SlotSemaphoreWorkflow.status
    )
    return result


async def until_status(client: Client, pool: str, check: object, within_s: float = 30) -> SemaphoreStatus:
    """Queries see the state as of the last workflow task; poll until signals sent earlier are applied."""
    assert callable(check)
    async with asyncio.timeout(within_s):
        while True:
            current = await status(client, pool)
            if check(current):
                return current
            await asyncio.sleep(0.1)


async def outcome(handle: WorkflowHandle[SlotHolderWorkflow, None]) -> str:
    try:
        await handle.result()
    except WorkflowFailureError as error:
        if isinstance(error.cause, CancelledError):
            return "cancelled"
        raise
    return "completed"


async def test_two_hundred_acquirers_never_exceed_the_cap(
    client: Client, task_queue: str, pool_name: str, ledger: Ledger
) -> None:
    cap, acquirers = 5, 200
    rng = random.Random(20261123)
    started = time.monotonic()
    handles = await asyncio.gather(
        *(
            start_holder(client, task_queue, pool_name, f"h{i}", capacity=cap, hold_s=rng.uniform(0, 0.3))
            for i in range(acquirers)
        )
    )
    # Cancel some while they are (mostly) still queued, and more once the burst is under way.
    early = rng.sample(range(acquirers), 15)
    await asyncio.gather(*(handles[i].cancel() for i in early))
    await ledger.until(lambda: ledger.entries >= 60, within_s=120)
    late = rng.sample(sorted(set(range(acquirers)) - set(early)), 15)
    await asyncio.gather(*(handles[i].cancel() for i in late))

    outcomes = await asyncio.wait_for(asyncio.gather(*(outcome(h) for h in handles)), timeout=300)
    elapsed = time.monotonic() - started
    final = await until_status(client, pool_name, lambda s: not s.holders and not s.waiters)
    semaphore = await client.get_workflow_handle(semaphore_workflow_id(pool_name)).describe()

    print(
        f"\n{acquirers} acquirers, cap {cap}: max concurrent holders seen by the ledger {ledger.max_seen}, "
        f"{ledger.entries} holds, {outcomes.count('cancelled')} cancelled, {elapsed:.1f}s, "
        f"semaphore continued-as-new: {semaphore.run_id != semaphore.raw_info.first_run_id}"
    )
    assert ledger.max_seen <= cap
    assert ledger.max_seen == cap, "the burst should have filled every slot"
    assert ledger.current == set()
    assert outcomes.count("completed") + outcomes.count("cancelled") == acquirers
    assert outcomes.count("completed") >= acquirers - 30
    assert ledger.entries >= outcomes.count("completed")
    assert final.granted_total >= ledger.entries
    assert semaphore.run_id != semaphore.raw_info.first_run_id, "the burst should span a continue-as-new"


async def test_duplicate_and_out_of_order_signals_are_harmless(
    client: Client, task_queue: str, pool_name: str, ledger: Ledger
) -> None:
    a = await start_holder(client, task_queue, pool_name, "a", capacity=1, hold_s=3600)
    await ledger.until(lambda: ledger.entries == 1, within_s=30)
    b = await start_holder(client, task_queue, pool_name, "b", capacity=1, hold_s=0)
    c = await start_holder(client, task_queue, pool_name, "c", capacity=1, hold_s=0)
    ids = {name: await h.query(SlotHolderWorkflow.request_id) for name, h in (("a", a), ("b", b), ("c", c))}
    await until_status(client, pool_name, lambda s: len(s.waiters) == 2)
    semaphore = client.get_workflow_handle(semaphore_workflow_id(pool_name))
    a_info = await a.describe()
    duplicate_acquire = AcquireRequest(
        request_id=ids["a"],
        holder_workflow_id=a.id,
        holder_run_id=a_info.run_id,
        requested_at=a_info.start_time,
    )

    await semaphore.signal(SlotSemaphoreWorkflow.acquire, duplicate_acquire)
    # Releasing a request that is still queued removes it without granting anything.
    await semaphore.signal(SlotSemaphoreWorkflow.release, ReleaseRequest(request_id=ids["c"]))
    s = await until_status(client, pool_name, lambda s: s.waiters == [ids["b"]])
    assert [h.request_id for h in s.holders] == [ids["a"]]

    await a.cancel()
    await semaphore.signal(SlotSemaphoreWorkflow.release, ReleaseRequest(request_id=ids["a"]))
    await semaphore.signal(SlotSemaphoreWorkflow.acquire, duplicate_acquire)  # late duplicate after release
    assert await outcome(a) == "cancelled"
    assert await outcome(b) == "completed"
    await c.cancel()
    assert await outcome(c) == "cancelled"
    final = await until_status(client, pool_name, lambda s: not s.holders and not s.waiters)
    assert ledger.max_seen == 1 and ledger.entries == 2  # a and b held; c never did
    assert final.granted_total == 2


async def test_a_terminated_holder_loses_its_slot_to_the_next_waiter(
    client: Client, task_queue: str, pool_name: str, ledger: Ledger
) -> None:
    a = await start_holder(client, task_queue, pool_name, "a", capacity=1, hold_s=3600)
    await ledger.until(lambda: ledger.entries == 1, within_s=30)
    b = await start_holder(client, task_queue, pool_name, "b", capacity=1, hold_s=0)
    await until_status(client, pool_name, lambda s: len(s.waiters) == 1)

    # The way an operator does it; `terminate` skips every finally block in the holder.
    terminated_at = time.monotonic()
    subprocess.run(
        [
            temporal_cli(),
            "workflow",
            "terminate",
            "--address",
            client.service_client.config.target_host,
            "--workflow-id",
            a.id,
            "--reason",
            "operator test",
        ],
        check=True,
        capture_output=True,
    )
    b_id = await b.query(SlotHolderWorkflow.request_id)
    await ledger.until(lambda: b_id in ledger.entered_at, within_s=60)
    handoff_s = ledger.entered_at[b_id] - terminated_at
    print(f"\nslot of terminated holder reached the next waiter after {handoff_s:.1f}s")
    assert await outcome(b) == "completed"
    final = await until_status(client, pool_name, lambda s: not s.holders and not s.waiters)
    assert final.reclaimed_total == 1


async def test_lowering_capacity_never_revokes_a_held_slot(
    client: Client, task_queue: str, pool_name: str, ledger: Ledger
) -> None:
    a = await start_holder(client, task_queue, pool_name, "a", capacity=2, hold_s=3600)
    b = await start_holder(client, task_queue, pool_name, "b", capacity=2, hold_s=3600)
    await ledger.until(lambda: ledger.entries == 2, within_s=30)
    semaphore = client.get_workflow_handle(semaphore_workflow_id(pool_name))
    await semaphore.signal(SlotSemaphoreWorkflow.set_capacity, 1)
    c = await start_holder(client, task_queue, pool_name, "c", capacity=2, hold_s=0)
    s = await until_status(client, pool_name, lambda s: s.capacity == 1 and len(s.waiters) == 1)
    assert len(s.holders) == 2, "both holders keep their slots"

    await a.cancel()
    await until_status(client, pool_name, lambda s: len(s.holders) == 1 and len(s.waiters) == 1)
    await b.cancel()
    assert await outcome(c) == "completed"
    assert ledger.max_seen == 2
