"""The README's first command on its happy path: every job served, and a quiet log."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_the_demo_serves_its_jobs_and_logs_no_warning_and_no_traceback(tmp_path: Path) -> None:
    mayfly = Path(sys.executable).parent / "mayfly"
    process = await asyncio.create_subprocess_exec(
        str(mayfly),
        "dev",
        "--jobs",
        "3",
        "--exit-when-done",
        "--state-dir",
        str(tmp_path / "state"),
        "--temporal-port",
        str(free_port()),
        "--ui-port",
        str(free_port()),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(300):
        output, _ = await process.communicate()
    log = output.decode(errors="replace")
    assert process.returncode == 0, log
    assert "all 3 jobs done" in log, log
    noisy = [
        line
        for line in log.splitlines()
        if ("WARNING" in line or " WARN" in line or "Traceback" in line or "ERROR" in line)
        # The dev server's own start-up chatter, not Mayfly's.
        and "Cluster Id" not in line
    ]
    assert noisy == [], "\n".join(noisy)
