"""`mayfly status` tells an absent, a closed and an unresponsive semaphore apart."""

from __future__ import annotations

import pytest
from temporalio.client import Client

from mayfly.app.cli import _status
from mayfly.config import GitHubSettings, MayflySettings, PoolSettings, TemporalSettings
from mayfly.models import SemaphoreInput, semaphore_workflow_id
from workflows.slot_semaphore import SlotSemaphoreWorkflow


def settings(client: Client, task_queue: str, *pools: str) -> MayflySettings:
    return MayflySettings(
        github=GitHubSettings(repository="acme/widgets", token="t"),
        temporal=TemporalSettings(address=client.service_client.config.target_host, task_queue=task_queue),
        pools=[PoolSettings(name=pool, labels=["self-hosted"], max_runners=2) for pool in pools],
    )


async def test_status_names_why_a_pool_shows_no_slots(
    client: Client, task_queue: str, pool_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    silent, closed, absent = f"{pool_name}s", f"{pool_name}c", f"{pool_name}a"
    # No worker polls this task queue, so nobody can answer the query.
    for pool in (silent, closed):
        await client.start_workflow(
            SlotSemaphoreWorkflow.run,
            SemaphoreInput(pool=pool, capacity=2),
            id=semaphore_workflow_id(pool),
            task_queue=task_queue,
        )
    await client.get_workflow_handle(semaphore_workflow_id(closed)).terminate("test")

    assert await _status(settings(client, task_queue, silent, closed, absent), query_timeout_s=2) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{silent}: semaphore not answering (query timed out)")
    assert lines[1].startswith(f"{closed}: semaphore not running (TERMINATED)")
    assert lines[2] == f"{absent}: no semaphore yet"
