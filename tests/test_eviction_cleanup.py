"""Cleanup left over from an evicted workflow never runs inside another workflow.

A workflow evicted from the worker's cache can leave coroutines behind; the garbage collector
closes them whenever it runs, possibly in the middle of another workflow's task. Their
`finally` blocks then run there. CI once saw a semaphore's history gain an activity of a test
holder evicted minutes before, after which every replay of the semaphore failed on a
non-determinism error and it granted nothing again.
"""

from __future__ import annotations

import types
from collections.abc import Coroutine, Generator
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import Worker

from workflows.shield import uncancellable

LEFTOVERS: list[Coroutine[Any, Any, None]] = []


@types.coroutine
def _suspended() -> Generator[None, None, None]:
    yield


async def _evicted_teardown() -> None:
    """A job's shape: suspended in its `try`, with cleanup in `finally`."""
    try:
        await _suspended()
    finally:
        await uncancellable(
            workflow.execute_activity("test.teardown", start_to_close_timeout=timedelta(seconds=5))
        )


@workflow.defn(name="TestBystander", sandboxed=False)
class BystanderWorkflow:
    @workflow.run
    async def run(self) -> str:
        leftover = LEFTOVERS.pop()
        # What the garbage collector does to a leftover coroutine, at whatever moment it runs.
        try:
            leftover.close()
        except RuntimeError as error:  # the cleanup awaited something while being closed
            return f"close failed: {error}"
        # Lets any task the close started run and issue its commands before the workflow ends.
        await workflow.sleep(timedelta(milliseconds=10))
        return "closed"


async def test_a_leftover_closed_during_another_workflows_task_issues_no_command_there(
    client: Client, task_queue: str
) -> None:
    leftover = _evicted_teardown()
    leftover.send(None)  # to its suspension point, where an eviction leaves it
    LEFTOVERS.append(leftover)
    async with Worker(client, task_queue=task_queue, workflows=[BystanderWorkflow]):
        # By name: a typed call to a workflow without arguments makes mypy misjudge other
        # modules' typed calls in the same run (seen with mypy on the whole tree).
        handle = await client.start_workflow(
            "TestBystander", id=f"bystander-{task_queue}", task_queue=task_queue, result_type=str
        )
        outcome = await handle.result()
    scheduled = [
        event.activity_task_scheduled_event_attributes.activity_type.name
        async for event in handle.fetch_history_events()
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert scheduled == [], f"the leftover's cleanup ran in the bystander's history: {scheduled}"
    assert outcome == "closed"


def test_a_leftover_closed_outside_any_workflow_starts_nothing() -> None:
    leftover = _evicted_teardown()
    leftover.send(None)
    leftover.close()  # raises if the cleanup tried to run
