"""Prometheus metrics: the SDK's and Mayfly's per-pool figures on the worker's endpoint, and
the starter's delivery counters."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

import httpx
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from mayfly.app.embedded import EmbeddedStack
from mayfly.metrics import prometheus_runtime
from mayfly.models import SLOT_GRANTED_SIGNAL, job_workflow_id, semaphore_workflow_id
from mayfly.temporal import DATA_CONVERTER


@dataclass
class Recorded:
    """What the histories say happened, to hold the metrics against."""

    grants: int = 0
    spawns: int = 0
    # A metric recorded in a workflow task that then failed is recorded again when the task
    # runs again (a signal arriving as it completes is enough): workflow metrics are
    # at-least-once, by up to this many.
    task_failures: int = 0

    def allows(self, metric: float | None, exact: int) -> bool:
        return metric is not None and exact <= metric <= exact + self.task_failures


async def recorded(client: Client, pool: str, job_ids: list[int]) -> Recorded:
    """Slots granted and containers spawned, over the jobs' histories. (A lease that gave up
    waiting releases a slot it was never granted.)"""
    seen = Recorded()
    workflow_ids = [job_workflow_id(job_id) for job_id in job_ids]
    for workflow_id in [*workflow_ids, semaphore_workflow_id(pool)]:
        events = (await client.get_workflow_handle(workflow_id).fetch_history()).events
        seen.task_failures += sum(
            1 for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
        )
        if workflow_id not in workflow_ids:
            continue
        seen.grants += sum(
            1
            for event in events
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
            and event.workflow_execution_signaled_event_attributes.signal_name == SLOT_GRANTED_SIGNAL
        )
        spawn_ids = {
            event.event_id
            for event in events
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
            and event.activity_task_scheduled_event_attributes.activity_type.name == "containers.spawn"
        }
        seen.spawns += sum(
            1
            for event in events
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
            and event.activity_task_completed_event_attributes.scheduled_event_id in spawn_ids
        )
    return seen


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample of `name` whose labels include `labels`."""
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{key}="{value}"' in (match[1] or "") for key, value in labels.items()):
            return float(match[2])
    return None


async def test_worker_and_starter_expose_mayfly_metrics(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    port = free_port()
    metered = await Client.connect(
        client.service_client.config.target_host,
        data_converter=DATA_CONVERTER,
        runtime=prometheus_runtime(f"127.0.0.1:{port}"),
    )
    stack = EmbeddedStack(metered, state_dir=state_dir, task_queue=task_queue, pool=pool_name, max_runners=2)
    await stack.start()
    try:
        job_ids = stack.queue_jobs(3, duration_s=0.5)
        await stack.wait_jobs_finished(job_ids, within_s=120)
        # Runners are not bound to jobs: a job whose runner took another job takes a second slot
        # and spawns a second runner, so the histories say how many there were.
        seen = await recorded(metered, pool_name, job_ids)
        async with httpx.AsyncClient() as http:
            worker_metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            starter_metrics = (await http.get(stack.starter_url.replace("/webhook", "/metrics"))).text
    finally:
        await stack.stop()

    assert sample(worker_metrics, "temporal_workflow_completed_total") is not None, "SDK metrics are exported"
    assert sample(worker_metrics, "mayfly_slot_capacity", pool=pool_name) == 2
    assert sample(worker_metrics, "mayfly_slots_held", pool=pool_name) == 0
    assert sample(worker_metrics, "mayfly_slot_waiters", pool=pool_name) == 0
    assert seen.grants >= 3 and seen.spawns >= 3
    assert seen.allows(sample(worker_metrics, "mayfly_slot_wait_seconds_count", pool=pool_name), seen.grants)
    assert seen.allows(
        sample(worker_metrics, "mayfly_webhook_to_spawn_seconds_count", pool=pool_name), seen.spawns
    )
    done = sample(worker_metrics, "mayfly_job_phase_transitions_total", pool=pool_name, phase="done")
    # CI once saw 4 for these 3 jobs.
    assert seen.allows(done, 3), (done, seen)
    for usage in ("mayfly_job_slot_seconds", "mayfly_job_runner_seconds"):
        assert seen.allows(
            sample(
                worker_metrics, f"{usage}_count", pool=pool_name, repository="acme/widgets", scope="default"
            ),
            3,
        )
        assert (
            sample(worker_metrics, f"{usage}_sum", pool=pool_name, repository="acme/widgets", scope="default")
            or 0
        ) > 0
    remaining = sample(worker_metrics, "mayfly_github_ratelimit_remaining")
    assert remaining is not None and remaining > 0
    assert sample(starter_metrics, "mayfly_webhook_deliveries_total", outcome="accepted:queued") == 3
