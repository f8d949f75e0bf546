"""Mayfly's real entry points (`mayfly worker`, `mayfly starter`) as processes, with a config
that points them at the session's dev server (or a proxy of it) and a GitHub simulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
from temporalio.client import Client

from mayfly.models import job_workflow_id
from simulator import GitHubSimulator

MAYFLY = str(Path(sys.executable).parent / "mayfly")
SECRET = "s" * 40
LABELS = ["self-hosted", "linux", "entry-points"]


def config_text(
    *,
    address: str,
    task_queue: str,
    pool: str,
    simulator: GitHubSimulator,
    state_dir: Path,
    tls: dict[str, Path | str],
    health_port: int,
    starter_port: int,
) -> str:
    tls_lines = "\n".join(f'{key} = "{value}"' for key, value in tls.items())
    runner = json.dumps([sys.executable, "-m", "simulator.runner"])
    return f"""
secret_key = "{SECRET}"
health_bind_address = "127.0.0.1:{health_port}"

[github]
api_url = "{simulator.url}"
repository = "{simulator.owner}/{simulator.repo}"
token = "{simulator.token}"
webhook_secret = "{SECRET}"

[temporal]
address = "{address}"
task_queue = "{task_queue}"
{tls_lines}

[starter]
port = {starter_port}

[[pools]]
name = "{pool}"
labels = {json.dumps(LABELS)}
max_runners = 2
[pools.backend]
kind = "local"
command = {runner}
state_dir = "{state_dir}"
"""


async def spawn(*args: str, log: Path, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """`mayfly <args>` with none of this process's MAYFLY_ variables, only `env`'s."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAYFLY_")} | (env or {})
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            MAYFLY, *args, cwd=log.parent, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )


async def until_ok(url: str, process: asyncio.subprocess.Process, log: Path, within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            assert process.returncode is None, log.read_text()[-3000:]
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(url, timeout=2)).status_code == 200:
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 0.3)
    raise AssertionError(f"{url} not ready within {within_s}s:\n{log.read_text()[-3000:]}")


async def stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode


async def start_starter(
    config: Path, port: int, simulator: GitHubSimulator, log: Path
) -> asyncio.subprocess.Process:
    """`mayfly starter`, ready, with the simulator's webhooks pointed at it."""
    starter = await spawn("starter", "--config", str(config), log=log)
    await until_ok(f"http://127.0.0.1:{port}/readyz", starter, log)
    simulator.webhook_url = f"http://127.0.0.1:{port}/webhook"
    return starter


async def run_one_job(client: Client, simulator: GitHubSimulator) -> int:
    """Queue a short job and wait until GitHub and its workflow both say it succeeded."""
    job_id = simulator.queue_job(LABELS, duration_s=0.5)
    await simulator.wait_for(lambda: simulator.job(job_id).status == "completed", 120)
    async with asyncio.timeout(60):
        await client.get_workflow_handle(job_workflow_id(job_id)).result()
    assert simulator.job(job_id).conclusion == "success"
    return job_id
