"""Runners as local child processes: the embedded default and the test backend.

Each container is a process group started in its own session. A JSON record per name in
`state_dir` (pid, process start time, owner, lifetime) lets a restarted worker find, adopt and
terminate processes it did not start itself; it is deleted once the exit is confirmed.

Isolation: a runner gets a minimal environment and a private HOME, and with `run_as_user` it
runs as that unprivileged user, so a job cannot read the worker's environment, memory or
credential files. The worker itself is marked non-dumpable (mayfly.hardening), which keeps
even a same-uid process out of /proc/<worker>/environ and /proc/<worker>/mem.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from mayfly.backends.base import BackendError, ContainerRecord, ContainerState, NameTakenByAnother
from mayfly.config import ConfigError, LocalBackendSettings

TERMINATE_GRACE_S = 5.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RECORD_SUFFIX = ".json"


class _Record(BaseModel):
    name: str
    pid: int
    # /proc/<pid>/stat field 22: with the pid, it names one process for the life of the machine.
    start_ticks: int
    owner_workflow_id: str
    job_id: int
    exit_code: int | None = None
    started_at: float = 0.0
    expires_at: float | None = None


@dataclass(frozen=True)
class _Stat:
    state: str
    pgid: int
    start_ticks: int


def _stat(pid: int) -> _Stat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after the last ')' are fixed.
    fields = text.rsplit(")", 1)[1].split()
    return _Stat(state=fields[0], pgid=int(fields[2]), start_ticks=int(fields[19]))


def _live_start_ticks(pid: int) -> int | None:
    """The start time of `pid` if it runs; a zombie only awaits reaping and does not count."""
    found = _stat(pid)
    return None if found is None or found.state == "Z" else found.start_ticks


def _group_members() -> dict[int, list[int]]:
    """Start ticks of the live processes of every process group, from one pass over /proc."""
    groups: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            found = _stat(int(entry.name))
        except (ValueError, IndexError):
            continue
        if found is not None and found.state != "Z":
            groups.setdefault(found.pgid, []).append(found.start_ticks)
    return groups


def _runs(record: _Record, groups: Mapping[int, list[int]] | None = None) -> bool:
    """Whether the runner's process group still has a live process.

    The kernel does not hand out a pid again while it is still some live group's id. So if
    the pid is now a process with another start time, the runner's group is gone (a stale
    record must never lead to signalling that process's group). If the leader is gone but the
    group is not, its surviving members started no earlier than the leader.
    """
    leader = _live_start_ticks(record.pid)
    if leader is not None:
        return leader == record.start_ticks
    members = (groups if groups is not None else _group_members()).get(record.pid, [])
    return any(ticks >= record.start_ticks for ticks in members)


def _resolve_user(spec: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except KeyError:
        raise ConfigError(f"run_as_user: no user {spec!r} on this host") from None


def _traversable_by(path: Path, user: pwd.struct_passwd) -> Path | None:
    """The first directory on the way to `path` that `user` cannot enter, or None."""
    groups = {user.pw_gid, *os.getgrouplist(user.pw_name, user.pw_gid)}
    for directory in [*reversed(path.parents), path]:
        info = directory.stat()
        if info.st_uid == user.pw_uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return directory
    return None


class LocalProcessBackend:
    host_bound = True

    def __init__(self, settings: LocalBackendSettings) -> None:
        self._settings = settings
        self._state_dir = settings.state_dir.absolute()
        self._homes = self._state_dir / "homes"
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self._homes.mkdir(exist_ok=True)
        self._run_as: pwd.struct_passwd | None = None
        if settings.run_as_user is not None:
            self._run_as = _resolve_user(settings.run_as_user)
            if os.geteuid() != 0 and self._run_as.pw_uid != os.geteuid():
                raise ConfigError(
                    f"run_as_user {settings.run_as_user!r}: the worker must run as root to start "
                    "runners as another user"
                )
            # Listing is not needed to reach a home, so other runners' names stay private.
            self._state_dir.chmod(0o711)
            self._homes.chmod(0o711)
            blocked = _traversable_by(self._homes, self._run_as)
            if blocked is not None:
                raise ConfigError(
                    f"run_as_user {settings.run_as_user!r} cannot enter {blocked}, so runners would "
                    f"have no HOME; put state_dir under a directory that user can traverse"
                )
        self._locks: dict[str, asyncio.Lock] = {}
        # Our own children: their exit codes are collected here once (waitpid can only be
        # called once), and only for the very process we started (pid and start time).
        self._children: dict[int, int] = {}
        self._exit_codes: dict[int, int] = {}
        self._reap_lock = threading.Lock()
        # Held only so Popen's finaliser never reaps a child behind our back.
        self._popens: dict[int, subprocess.Popen[bytes]] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _path(self, name: str) -> Path:
        return self._state_dir / f"{name}{RECORD_SUFFIX}"

    def _home(self, name: str) -> Path:
        return self._homes / name

    def _load(self, name: str) -> _Record | None:
        try:
            return _Record.model_validate_json(self._path(name).read_text())
        except FileNotFoundError:
            return None

    def _save(self, record: _Record) -> None:
        tmp = self._path(record.name).with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(record.model_dump_json())
        tmp.replace(self._path(record.name))

    def _forget(self, record: _Record) -> None:
        """The exit is confirmed: drop the record and the runner's private HOME."""
        self._path(record.name).unlink(missing_ok=True)
        shutil.rmtree(self._home(record.name), ignore_errors=True)
        with self._reap_lock:
            if self._children.get(record.pid) == record.start_ticks:
                self._children.pop(record.pid, None)
                self._exit_codes.pop(record.pid, None)
                self._popens.pop(record.pid, None)

    def _collect_exit(self, record: _Record) -> None:
        """Reap our own child once it has exited, so it leaves no zombie and its exit code is kept."""
        with self._reap_lock:
            if self._children.get(record.pid) != record.start_ticks:
                return
            if record.pid not in self._exit_codes:
                try:
                    reaped, status = os.waitpid(record.pid, os.WNOHANG)
                except ChildProcessError:
                    return
                if reaped == 0:
                    return
                self._exit_codes[record.pid] = os.waitstatus_to_exitcode(status)
                self._popens.pop(record.pid, None)
            record.exit_code = self._exit_codes[record.pid]

    def _alive(self, record: _Record, groups: Mapping[int, list[int]] | None = None) -> bool:
        self._collect_exit(record)
        return _runs(record, groups)

    def _view(self, record: _Record, groups: Mapping[int, list[int]] | None = None) -> ContainerRecord:
        state = ContainerState.RUNNING if self._alive(record, groups) else ContainerState.EXITED
        return ContainerRecord(
            name=record.name,
            backend_id=str(record.pid),
            owner_workflow_id=record.owner_workflow_id,
            job_id=record.job_id,
            state=state,
            exit_code=record.exit_code,
            expires_at=record.expires_at,
        )

    def _env(self, name: str, jit_config: str, home: Path) -> dict[str, str]:
        # Nothing else of the worker's environment: it holds credentials a job must never see.
        env = {"PATH": os.environ.get("PATH", DEFAULT_PATH), "HOME": str(home)}
        if "LANG" in os.environ:
            env["LANG"] = os.environ["LANG"]
        env.update(self._settings.env)
        env["ACTIONS_RUNNER_INPUT_JITCONFIG"] = jit_config
        env["MAYFLY_CONTAINER_NAME"] = name
        return env

    def _start(
        self, *, name: str, owner_workflow_id: str, job_id: int, jit_config: str, max_lifetime_s: float
    ) -> _Record:
        home = self._home(name)
        home.mkdir(mode=0o700, exist_ok=True)
        uid: int | None = None
        gid: int | None = None
        if self._run_as is not None:
            os.chown(home, self._run_as.pw_uid, self._run_as.pw_gid)
            if os.geteuid() == 0:
                # setgroups([]) too, or the runner would keep root's supplementary groups.
                uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
        log_fd = os.open(self._state_dir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        started_at = time.time()
        try:
            child = subprocess.Popen(
                self._settings.command,
                cwd=self._settings.workdir,
                env=self._env(name, jit_config, home),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=uid,
                group=gid,
                extra_groups=[] if uid is not None else None,
            )
        except (OSError, subprocess.SubprocessError) as error:
            shutil.rmtree(home, ignore_errors=True)
            raise BackendError(f"cannot start {self._settings.command[0]!r}: {error}") from error
        finally:
            os.close(log_fd)
        # Our unreaped child cannot vanish from /proc, so its start time is always readable here.
        found = _stat(child.pid)
        ticks = found.start_ticks if found is not None else -1
        with self._reap_lock:
            self._children[child.pid] = ticks
            self._popens[child.pid] = child
        record = _Record(
            name=name,
            pid=child.pid,
            start_ticks=ticks,
            owner_workflow_id=owner_workflow_id,
            job_id=job_id,
            started_at=started_at,
            expires_at=started_at + max_lifetime_s,
        )
        self._save(record)
        return record

    async def spawn(
        self, *, name: str, owner_workflow_id: str, job_id: int, jit_config: str, max_lifetime_s: float
    ) -> ContainerRecord:
        async with self._lock(name):
            existing = await asyncio.to_thread(self._load, name)
            if existing is not None:
                if existing.owner_workflow_id != owner_workflow_id:
                    raise NameTakenByAnother(f"container {name} belongs to {existing.owner_workflow_id}")
                # Look before creating again: an earlier try already started (or finished) it.
                return await asyncio.to_thread(self._view, existing)
            record = await asyncio.to_thread(
                self._start,
                name=name,
                owner_workflow_id=owner_workflow_id,
                job_id=job_id,
                jit_config=jit_config,
                max_lifetime_s=max_lifetime_s,
            )
            return await asyncio.to_thread(self._view, record)

    def _inspect(self, name: str) -> ContainerRecord | None:
        record = self._load(name)
        if record is None:
            return None
        known_exit = record.exit_code
        view = self._view(record)
        if record.exit_code != known_exit:
            self._save(record)
        return view

    async def inspect(self, name: str) -> ContainerRecord | None:
        return await asyncio.to_thread(self._inspect, name)

    async def wait(self, name: str, timeout_s: float) -> None:
        record = await asyncio.to_thread(self._load, name)
        if record is None:
            return
        try:
            # A pidfd turns readable when the process exits: an event, where polling /proc
            # would cost a slot-second per job on average at a one-second poll.
            pidfd = os.pidfd_open(record.pid)
        except OSError:
            await asyncio.sleep(timeout_s)
            return
        try:
            # Opened before the check, so the pidfd is known to be the very process recorded.
            if not await asyncio.to_thread(self._alive, record):
                return
            loop = asyncio.get_running_loop()
            exited = asyncio.Event()
            loop.add_reader(pidfd, exited.set)
            try:
                await asyncio.wait_for(exited.wait(), timeout_s)
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(pidfd)
        finally:
            os.close(pidfd)

    async def terminate(self, name: str) -> ContainerRecord | None:
        async with self._lock(name):
            record = await asyncio.to_thread(self._load, name)
            if record is None:
                return None
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGKILL):
                # Only a group proven to be the runner's (pid and start time) is ever signalled.
                if not await asyncio.to_thread(self._alive, record):
                    break
                try:
                    os.killpg(record.pid, sig)
                except ProcessLookupError:
                    break
                deadline = loop.time() + TERMINATE_GRACE_S
                # A process group's exit raises no event we can await; poll it briefly.
                while await asyncio.to_thread(self._alive, record) and loop.time() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            if await asyncio.to_thread(self._alive, record):
                raise BackendError(f"process group {record.pid} of {name} survived SIGKILL")
            view = await asyncio.to_thread(self._view, record)
            await asyncio.to_thread(self._forget, record)
            return view

    def _list(self) -> list[ContainerRecord]:
        records = []
        for path in sorted(self._state_dir.glob(f"*{RECORD_SUFFIX}")):
            try:
                records.append(_Record.model_validate_json(path.read_text()))
            except (OSError, ValueError):
                continue
        # One pass over /proc for all records whose leader is gone, not one per record.
        groups = _group_members() if records else {}
        return [self._view(record, groups) for record in records]

    async def list(self) -> list[ContainerRecord]:
        return await asyncio.to_thread(self._list)
