"""Runners as local child processes: the embedded default and the test backend.

Each container is a process group started in its own session. A JSON record per name in
`state_dir` (pid, process start time, owner) lets a restarted worker find, adopt and
terminate processes it did not start itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

from pydantic import BaseModel

from mayfly.backends.base import BackendError, ContainerRecord, ContainerState, NameTakenByAnother
from mayfly.config import LocalBackendSettings

# Only these variables reach a runner from the worker's own environment: the worker holds
# credentials (GitHub token, secret key) that a job must never see.
_INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
TERMINATE_GRACE_S = 5.0


class _Record(BaseModel):
    name: str
    pid: int
    start_ticks: int
    owner_workflow_id: str
    job_id: int
    exit_code: int | None = None
    terminated: bool = False


def _start_ticks(pid: int) -> int | None:
    """The kernel's start time of `pid`, which tells a live process from a recycled pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs; zombies do not count, they only await reaping."""
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _reap(pid: int) -> int | None:
    """Collect the exit code if `pid` is our child and has exited (so it leaves no zombie)."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if reaped == 0:
        return None
    return os.waitstatus_to_exitcode(status)


class LocalProcessBackend:
    def __init__(self, settings: LocalBackendSettings) -> None:
        self._settings = settings
        self._state_dir = settings.state_dir
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, asyncio.Lock] = {}
        # Held only so Popen's finaliser never reaps a child behind our back (it would take
        # the exit code with it); _reap() collects them.
        self._popens: dict[int, subprocess.Popen[bytes]] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _path(self, name: str) -> Path:
        return self._state_dir / f"{name}.json"

    def _load(self, name: str) -> _Record | None:
        try:
            return _Record.model_validate_json(self._path(name).read_text())
        except FileNotFoundError:
            return None

    def _save(self, record: _Record) -> None:
        tmp = self._path(record.name).with_suffix(".tmp")
        tmp.write_text(record.model_dump_json())
        tmp.replace(self._path(record.name))

    def _alive(self, record: _Record) -> bool:
        exit_code = _reap(record.pid)
        if exit_code is not None:
            record.exit_code = exit_code
            self._popens.pop(record.pid, None)
        leader_alive = _start_ticks(record.pid) == record.start_ticks
        return leader_alive or _group_alive(record.pid)

    def _view(self, record: _Record) -> ContainerRecord:
        state = ContainerState.RUNNING if self._alive(record) else ContainerState.EXITED
        return ContainerRecord(
            name=record.name,
            backend_id=str(record.pid),
            owner_workflow_id=record.owner_workflow_id,
            job_id=record.job_id,
            state=state,
            exit_code=record.exit_code,
        )

    def _env(self, name: str, jit_config: str) -> dict[str, str]:
        env = {key: os.environ[key] for key in _INHERITED_ENV if key in os.environ}
        env.update(self._settings.env)
        env["ACTIONS_RUNNER_INPUT_JITCONFIG"] = jit_config
        env["MAYFLY_CONTAINER_NAME"] = name
        return env

    async def spawn(
        self, *, name: str, owner_workflow_id: str, job_id: int, jit_config: str, max_lifetime_s: float
    ) -> ContainerRecord:
        async with self._lock(name):
            existing = self._load(name)
            if existing is not None:
                if existing.owner_workflow_id != owner_workflow_id:
                    raise NameTakenByAnother(f"container {name} belongs to {existing.owner_workflow_id}")
                # Look before creating again: an earlier try already started (or finished) it.
                return self._view(existing)
            log = (self._state_dir / f"{name}.log").open("ab")
            try:
                # Popen only forks and execs; the child's lifetime is tracked through the record.
                child = subprocess.Popen(  # noqa: ASYNC220
                    self._settings.command,
                    cwd=self._settings.workdir,
                    env=self._env(name, jit_config),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as error:
                raise BackendError(f"cannot start {self._settings.command[0]!r}: {error}") from error
            finally:
                log.close()
            self._popens[child.pid] = child
            ticks = _start_ticks(child.pid)
            record = _Record(
                name=name,
                pid=child.pid,
                start_ticks=ticks if ticks is not None else -1,
                owner_workflow_id=owner_workflow_id,
                job_id=job_id,
            )
            self._save(record)
            return self._view(record)

    async def inspect(self, name: str) -> ContainerRecord | None:
        record = self._load(name)
        if record is None:
            return None
        view = self._view(record)
        if record.exit_code is not None:
            self._save(record)
        return view

    async def terminate(self, name: str) -> ContainerRecord | None:
        async with self._lock(name):
            record = self._load(name)
            if record is None:
                return None
            for sig, wait_s in ((signal.SIGTERM, TERMINATE_GRACE_S), (signal.SIGKILL, TERMINATE_GRACE_S)):
                if not self._alive(record):
                    break
                try:
                    os.killpg(record.pid, sig)
                except ProcessLookupError:
                    break
                loop = asyncio.get_running_loop()
                deadline = loop.time() + wait_s
                # A process group's exit raises no event we can await; poll it briefly.
                while self._alive(record) and loop.time() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            if self._alive(record):
                raise BackendError(f"process group {record.pid} of {name} survived SIGKILL")
            record.terminated = True
            self._save(record)
            return self._view(record)

    async def list(self) -> list[ContainerRecord]:
        records = []
        for path in sorted(self._state_dir.glob("*.json")):
            try:
                record = _Record.model_validate(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
            records.append(self._view(record))
        return records
