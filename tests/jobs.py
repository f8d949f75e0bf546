"""Helpers for tests that run jobs through an embedded stack."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from temporalio.client import WorkflowHandle

from mayfly.app.embedded import EmbeddedStack
from mayfly.backends import ContainerState
from mayfly.models import JobPhase, RunnerJobState, job_workflow_id
from workflows.runner_job import RunnerJobWorkflow


async def until(check: Callable[[], Awaitable[bool]], within_s: float = 60) -> None:
    """Poll a condition that has no event to wait on (process and workflow state), with a deadline."""
    async with asyncio.timeout(within_s):
        while not await check():  # noqa: ASYNC110 (process and query state raise no event)
            await asyncio.sleep(0.2)


def job_handle(stack: EmbeddedStack, job_id: int) -> WorkflowHandle[RunnerJobWorkflow, object]:
    return stack.client.get_workflow_handle_for(RunnerJobWorkflow.run, job_workflow_id(job_id))


async def phase(stack: EmbeddedStack, job_id: int) -> JobPhase | None:
    try:
        state: RunnerJobState = await job_handle(stack, job_id).query(RunnerJobWorkflow.state)
    except Exception:
        return None
    return state.phase


async def nothing_left(stack: EmbeddedStack) -> bool:
    running = [r for r in await stack.backend.list() if r.state is ContainerState.RUNNING]
    slots = await stack.semaphore_status()
    return not running and not stack.simulator.runners() and not slots.holders and not slots.waiters


async def _is(value: Awaitable[JobPhase | None], expected: JobPhase) -> bool:
    return await value == expected


def in_phase(stack: EmbeddedStack, job_id: int, expected: JobPhase) -> Callable[[], Awaitable[bool]]:
    return lambda: _is(phase(stack, job_id), expected)
