"""Every `mayfly` command exits with its own status, never an abort at interpreter shutdown,
even on a loaded machine (where the SDK's native runtime once aborted `mayfly setup`)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

ROOT = Path(__file__).resolve().parent.parent
RUNS = 20


def _burn() -> None:
    while True:
        pass


@pytest.fixture
def cpu_load() -> Iterator[None]:
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(os.cpu_count() or 2)]
    for burner in burners:
        burner.start()
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.join()


@pytest.mark.parametrize("command", ["setup", "status"])
async def test_commands_exit_with_their_own_status_under_cpu_load(
    temporal_env: WorkflowEnvironment, tmp_path: Path, cpu_load: None, command: str
) -> None:
    config = tmp_path / "mayfly.toml"
    config.write_text(
        f"""
[github]
repository = "acme/widgets"
token = "ghp_example"

[temporal]
address = "{temporal_env.client.service_client.config.target_host}"

[[pools]]
name = "cpu"
labels = ["self-hosted"]
max_runners = 1
"""
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAYFLY_")}
    codes: list[int] = []
    for _ in range(RUNS):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mayfly.app.cli",
            command,
            "--config",
            str(config),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(120):
            output, _ = await process.communicate()
        assert process.returncode is not None
        assert "Fatal Python error" not in output.decode(), output.decode()[-2000:]
        codes.append(process.returncode)
    assert codes == [0] * RUNS
