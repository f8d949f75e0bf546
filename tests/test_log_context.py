"""Every log line names its job and, where there is one, its runner: an operator greps one
runner's story across the starter, the workflow and the activities of any host."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from temporalio.client import Client

from mayfly.app.embedded import EmbeddedStack
from mayfly.logs import JobContext
from mayfly.models import job_workflow_id
from simulator import FaultConfig
from tests.jobs import until


def mint_refused(stack: EmbeddedStack) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any(key.endswith("generate-jitconfig 502") for key in stack.simulator.calls)

    return check


async def test_a_retried_mint_logs_one_line_naming_its_job_and_runner(
    client: Client, task_queue: str, pool_name: str, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(JobContext())
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        task_queue=task_queue,
        pool=pool_name,
        faults=FaultConfig(registration_502_rate=1.0),
    )
    await stack.start()
    try:
        (job_id,) = stack.queue_jobs(1, duration_s=0.5)
        await until(mint_refused(stack))
        stack.simulator.set_faults(FaultConfig())
        await stack.wait_jobs_finished([job_id], within_s=120)
    finally:
        await stack.stop()

    runner = f"mayfly-{job_id}-a1"
    retried = [r for r in caplog.records if "502" in r.getMessage() and "retrying" in r.getMessage()]
    assert retried, "the retried 502 was logged"
    assert all(r.levelno == logging.INFO for r in retried), "an expected retry is no warning"
    assert {(getattr(r, "job", None), getattr(r, "runner", None)) for r in retried} == {
        (job_workflow_id(job_id), runner)
    }
    accepted = [r for r in caplog.records if f"job {job_id} queued -> pool" in r.getMessage()]
    assert accepted and all(getattr(r, "job", None) == job_workflow_id(job_id) for r in accepted)
