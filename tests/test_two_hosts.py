"""Two worker hosts: each local runner is watched and terminated by the host that started it.

Two worker processes stand for two machines: each has its own host id (so its own host
queue) and its own state dir, and neither can see the other's records. They share the
Temporal task queue, so either may spawn any job's runner. A probe, sharing one ledger
across both "hosts", checks that the pool cap holds across them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus

from mayfly.app.embedded import DEMO_LABELS, EmbeddedStack
from mayfly.backends.local import LocalProcessBackend
from mayfly.config import LocalBackendSettings
from mayfly.models import host_task_queue, job_workflow_id
from simulator.probe import ConcurrencyProbe
from tests.test_metrics import free_port
from tests.test_worker_shutdown import ROOT, until_ready

CAP = 4
JOBS = 20
SECRET_KEY = "two-hosts-share-this-sealing-key-0123456789"


def host_config(
    stack: EmbeddedStack, client: Client, *, host_id: str, state_dir: Path, probe: ConcurrencyProbe, port: int
) -> str:
    assert stack.settings is not None
    github = stack.settings.github
    pool = stack.settings.pools[0]
    assert github.token is not None and github.webhook_secret is not None
    command = ", ".join(f'"{part}"' for part in probe.command)
    env = ", ".join(f'{key} = "{value}"' for key, value in probe.env.items())
    return f"""
secret_key = "{SECRET_KEY}"
host_id = "{host_id}"
worker_graceful_shutdown_s = 2
health_bind_address = "127.0.0.1:{port}"
semaphore_reap_interval_s = 2
sweep_interval_s = 2

[github]
api_url = "{github.api_url}"
repository = "{github.repository}"
token = "{github.token.get_secret_value()}"
webhook_secret = "{github.webhook_secret.get_secret_value()}"

[temporal]
address = "{client.service_client.config.target_host}"
task_queue = "{stack.settings.temporal.task_queue}"

[[pools]]
name = "{pool.name}"
labels = {list(DEMO_LABELS)!r}
max_runners = {CAP}
[pools.backend]
kind = "local"
command = [{command}]
state_dir = "{state_dir}"
env = {{ {env} }}
""".replace("'", '"')


@pytest.fixture
async def two_hosts(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> AsyncIterator[
    tuple[EmbeddedStack, ConcurrencyProbe, dict[str, tuple[asyncio.subprocess.Process, Path]]]
]:
    probe = ConcurrencyProbe(ledger=state_dir / "probe", cap=CAP)
    # The simulator and the webhook starter only; the workers are the two host processes.
    stack = EmbeddedStack(
        client, state_dir=state_dir, task_queue=task_queue, pool=pool_name, max_runners=CAP, run_worker=False
    )
    await stack.start()
    hosts: dict[str, tuple[asyncio.subprocess.Process, Path]] = {}
    try:
        for host_id in ("host-a", "host-b"):
            host_dir = state_dir / host_id
            host_dir.mkdir(parents=True)
            port = free_port()
            config = host_dir / "worker.toml"
            config.write_text(
                host_config(
                    stack, client, host_id=host_id, state_dir=host_dir / "runners", probe=probe, port=port
                )
            )
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(ROOT / "worker.py"),
                "--config",
                str(config),
                cwd=ROOT,
                stdout=(host_dir / "worker.log").open("wb"),
                stderr=asyncio.subprocess.STDOUT,
            )
            hosts[host_id] = (process, host_dir / "runners")
            await until_ready(f"http://127.0.0.1:{port}/readyz")
        yield stack, probe, hosts
    finally:
        for process, _ in hosts.values():
            if process.returncode is None:
                process.terminate()
                await process.wait()
        await stack.stop()


async def test_twenty_jobs_on_two_hosts_each_container_terminated_by_its_own_host(
    client: Client,
    task_queue: str,
    two_hosts: tuple[EmbeddedStack, ConcurrencyProbe, dict[str, tuple[asyncio.subprocess.Process, Path]]],
) -> None:
    stack, probe, hosts = two_hosts
    job_ids = stack.queue_jobs(JOBS, duration_s=1.0)
    await stack.wait_jobs_finished(job_ids, within_s=300)

    owner_of: dict[str, str] = {}  # container name -> host whose state dir has its log
    for host_id, (_, runners_dir) in hosts.items():
        for log in runners_dir.glob("*.log"):
            assert log.stem not in owner_of, f"{log.stem} ran on two hosts"
            owner_of[log.stem] = host_id
    pid_of = {host_id: process.pid for host_id, (process, _) in hosts.items()}

    # Gone means confirmed on the owning host: by a terminate, or by the watcher seeing it exit.
    confirmed_gone: set[str] = set()
    for job_id in job_ids:
        handle = client.get_workflow_handle(job_workflow_id(job_id))
        assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
        scheduled: dict[int, tuple[str, str, str]] = {}
        async for event in handle.fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                attributes = event.activity_task_scheduled_event_attributes
                summary = event.user_metadata.summary.data.decode().strip('"')
                scheduled[event.event_id] = (
                    attributes.activity_type.name,
                    attributes.task_queue.name,
                    summary,
                )
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                completed = event.activity_task_completed_event_attributes
                activity, queue, summary = scheduled[completed.scheduled_event_id]
                if activity in ("containers.terminate", "containers.wait_exit"):
                    confirmed_gone.add(summary.split()[-1])
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                started = event.activity_task_started_event_attributes
                activity, queue, summary = scheduled[started.scheduled_event_id]
                if activity not in ("containers.terminate", "containers.wait_exit"):
                    continue
                name = summary.split()[-1]
                host_id = owner_of[name]
                assert queue == host_task_queue(task_queue, host_id), f"{activity} of {name} went to {queue}"
                # Worker identities are "<pid>@<hostname>": the process that ran it is the owner.
                assert started.identity.startswith(f"{pid_of[host_id]}@"), (activity, name, started.identity)

    split = {host_id: sorted(owner_of.values()).count(host_id) for host_id in hosts}
    print(
        f"\ncontainers per host: {split}; confirmed gone on their host: {len(confirmed_gone)}; "
        f"violations: {probe.violations()}"
    )
    assert len(owner_of) >= JOBS and confirmed_gone == set(owner_of), "every container confirmed gone"
    assert all(count > 0 for count in split.values()), "both hosts ran runners"
    assert probe.violations() == [], f"more than {CAP} runners alive at once across the hosts"
    assert probe.held_now() == 0, "a runner process is still alive"
    for _, runners_dir in hosts.values():
        records = await LocalProcessBackend(LocalBackendSettings(state_dir=runners_dir)).list()
        assert records == [], "every record is gone once its exit was confirmed"
    assert stack.simulator.runners() == [], "registrations left in GitHub"
    semaphore = await stack.semaphore_status()
    assert semaphore.holders == [] and semaphore.waiters == []


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_a_terminated_jobs_slot_is_reclaimed_only_once_its_runner_is_gone_on_its_host(
    client: Client,
    two_hosts: tuple[EmbeddedStack, ConcurrencyProbe, dict[str, tuple[asyncio.subprocess.Process, Path]]],
) -> None:
    """Reclaim runs on either host, but only the owner host can see and stop the runner: the
    slot must stay held until that host has stopped it."""
    stack, _, hosts = two_hosts
    (job_id,) = stack.queue_jobs(1, duration_s=120.0)
    sim = stack.simulator
    await sim.wait_for(lambda: sim.job(job_id).status == "in_progress", 60)
    runner_pids = []
    for _, runners_dir in hosts.values():
        for record in await LocalProcessBackend(LocalBackendSettings(state_dir=runners_dir)).list():
            runner_pids.append(int(record.backend_id))
    assert len(runner_pids) == 1 and pid_alive(runner_pids[0])

    # An operator terminates the workflow: its teardown never runs.
    await client.get_workflow_handle(job_workflow_id(job_id)).terminate(reason="test")
    async with asyncio.timeout(120):
        while (await stack.semaphore_status()).holders:  # noqa: ASYNC110 (a query result raises no event)
            await asyncio.sleep(0.1)
    # The moment the slot is free, the runner must already be gone.
    assert not pid_alive(runner_pids[0]), "the slot was reclaimed while its runner was still running"
