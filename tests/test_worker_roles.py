"""`mayfly worker --role jobs` and `mayfly worker --role semaphores` as two processes run a job
between them, and each polls only its own task queues: the semaphores' replays under a backlog
must not share an interpreter with the job workflows (see `mayfly.app.roles`)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from mayfly.models import semaphore_task_queue
from simulator import GitHubSimulator
from tests.mayfly_processes import SECRET, config_text, run_one_job, spawn, start_starter, stop, until_ok
from tests.test_metrics import free_port


async def workflow_pollers(client: Client, task_queue: str) -> set[str]:
    """Identities (`pid@host` by default) of the workers that polled `task_queue` for workflow tasks."""
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
    )
    return {poller.identity for poller in response.pollers}


async def test_a_jobs_worker_and_a_semaphores_worker_run_a_job_between_them(
    client: Client, task_queue: str, pool_name: str, tmp_path: Path
) -> None:
    simulator = GitHubSimulator(webhook_secret=SECRET, first_job_id=int(time.time() * 1000) % 10**12 * 10 + 5)
    await simulator.start()
    jobs_health, semaphores_health, starter_port = free_port(), free_port(), free_port()
    config = tmp_path / "mayfly.toml"
    config.write_text(
        config_text(
            address=client.service_client.config.target_host,
            task_queue=task_queue,
            pool=pool_name,
            simulator=simulator,
            state_dir=tmp_path / "local-backend",
            tls={},
            health_port=jobs_health,
            starter_port=starter_port,
        )
    )
    logs = {name: tmp_path / f"{name}.log" for name in ("jobs", "semaphores", "starter")}
    processes: dict[str, asyncio.subprocess.Process] = {}
    try:
        processes["semaphores"] = await spawn(
            "worker",
            "--config",
            str(config),
            "--role",
            "semaphores",
            log=logs["semaphores"],
            env={"MAYFLY_HEALTH_BIND_ADDRESS": f"127.0.0.1:{semaphores_health}"},
        )
        processes["jobs"] = await spawn("worker", "--config", str(config), "--role", "jobs", log=logs["jobs"])
        for name, port in (("semaphores", semaphores_health), ("jobs", jobs_health)):
            await until_ok(f"http://127.0.0.1:{port}/readyz", processes[name], logs[name])
        processes["starter"] = await start_starter(config, starter_port, simulator, logs["starter"])
        await run_one_job(client, simulator)

        semaphores_pid = f"{processes['semaphores'].pid}@"
        jobs_pid = f"{processes['jobs'].pid}@"
        slot_pollers = await workflow_pollers(client, semaphore_task_queue(task_queue))
        job_pollers = await workflow_pollers(client, task_queue)
        assert slot_pollers and all(identity.startswith(semaphores_pid) for identity in slot_pollers), (
            slot_pollers
        )
        assert job_pollers and all(identity.startswith(jobs_pid) for identity in job_pollers), job_pollers
    finally:
        codes = {name: await stop(process) for name, process in reversed(processes.items())}
        await simulator.stop()
    assert codes == {"starter": 0, "jobs": 0, "semaphores": 0}, {
        name: log.read_text()[-2000:] for name, log in logs.items()
    }
