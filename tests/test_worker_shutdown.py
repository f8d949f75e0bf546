"""SIGTERM: the worker process stops gracefully, and the activity in flight is not lost."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import httpx
from temporalio.client import Client

from mayfly.app.embedded import DEMO_LABELS, SIMULATED_RUNNER, EmbeddedStack
from tests.test_metrics import free_port

ROOT = Path(__file__).resolve().parent.parent
GRACE_S = 2.0


def worker_config(stack: EmbeddedStack, client: Client, secret_key: str, health_port: int) -> str:
    assert stack.settings is not None
    github = stack.settings.github
    pool = stack.settings.pools[0]
    assert github.token is not None and github.webhook_secret is not None
    command = ", ".join(f'"{part}"' for part in SIMULATED_RUNNER)
    return f"""
secret_key = "{secret_key}"
worker_graceful_shutdown_s = {GRACE_S}
health_bind_address = "127.0.0.1:{health_port}"
semaphore_reap_interval_s = 2

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
max_runners = 2
[pools.backend]
kind = "local"
command = [{command}]
state_dir = "{stack.backend_state_dir}"
""".replace("'", '"')


async def until_ready(url: str, within_s: float = 30) -> None:
    """The worker process needs a moment to start; poll its readiness endpoint until it answers 200."""
    async with asyncio.timeout(within_s), httpx.AsyncClient() as http:
        while True:
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)


async def test_sigterm_exits_zero_and_the_job_finishes_on_another_worker(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    secret_key = "shared-by-all-workers-and-32-bytes-long"
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        task_queue=task_queue,
        pool=pool_name,
        run_worker=False,
        secret_key=secret_key,
    )
    await stack.start()
    config = state_dir / "worker.toml"
    health_port = free_port()
    config.write_text(worker_config(stack, client, secret_key, health_port))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "worker.py"),
        "--config",
        str(config),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await until_ready(f"http://127.0.0.1:{health_port}/readyz")
        (job_id,) = stack.queue_jobs(1, duration_s=6.0)
        sim = stack.simulator
        # The runner is working on the job: the worker has a container-watching activity in flight.
        await sim.wait_for(lambda: sim.job(job_id).status == "in_progress", 60)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=GRACE_S + 20)
        stopped_after = time.monotonic() - signalled
        output = (await process.stdout.read()).decode() if process.stdout else ""
        print(f"\nworker exited {code} {stopped_after:.1f}s after SIGTERM (grace {GRACE_S}s)")
        assert code == 0, output[-2000:]
        assert "worker stopped" in output

        # Another worker takes over the same task queue; the job and its teardown complete.
        await stack.start_workers()
        await stack.wait_jobs_finished([job_id], within_s=90)
        assert sim.job(job_id).conclusion == "success"
        assert sim.runners() == []
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await stack.stop()
