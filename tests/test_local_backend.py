"""The local process backend: idempotent spawn, restart-proof teardown, no secrets in argv."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities.containers import ContainerActivities
from mayfly.backends import ContainerState, NameTakenByAnother
from mayfly.backends.local import LocalProcessBackend
from mayfly.config import LocalBackendSettings
from mayfly.models import ContainerRef, ContainerSpec
from mayfly.sealing import Sealer

JIT = "c2VjcmV0LWppdC1jb25maWc="
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def backend(tmp_path: Path, command: list[str] = SLEEPER) -> LocalProcessBackend:
    return LocalProcessBackend(LocalBackendSettings(command=command, state_dir=tmp_path / "local"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return status != "Z"


async def environ_of(pid: int) -> bytes:
    """The process's environment, once the kernel has set it up: Popen returns when the exec is
    past its point of no return, a moment before the new environment is readable."""
    async with asyncio.timeout(10):
        while not (environ := Path(f"/proc/{pid}/environ").read_bytes()):  # noqa: ASYNC110 (no event for it)
            await asyncio.sleep(0.01)
    return environ


async def test_spawn_twice_adopts_and_another_owner_is_refused(tmp_path: Path) -> None:
    local = backend(tmp_path)
    first = await local.spawn(
        name="r-1", owner_workflow_id="wf-a", job_id=1, jit_config=JIT, max_lifetime_s=60
    )
    again = await local.spawn(
        name="r-1", owner_workflow_id="wf-a", job_id=1, jit_config=JIT, max_lifetime_s=60
    )
    try:
        assert again.backend_id == first.backend_id
        names = [r.name for r in await local.list()]
        assert names == ["r-1"]
        with pytest.raises(NameTakenByAnother):
            await local.spawn(
                name="r-1", owner_workflow_id="wf-b", job_id=2, jit_config=JIT, max_lifetime_s=60
            )
    finally:
        await local.terminate("r-1")


async def test_a_restarted_worker_finds_and_terminates_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAYFLY_GITHUB__TOKEN", "ghp_worker_credential")
    record = await backend(tmp_path).spawn(
        name="r-2", owner_workflow_id="wf-a", job_id=1, jit_config=JIT, max_lifetime_s=60
    )
    pid = int(record.backend_id)
    assert alive(pid)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    environ = await environ_of(pid)
    assert JIT.encode() not in cmdline, "the JIT config must never be on a command line"
    assert b"ACTIONS_RUNNER_INPUT_JITCONFIG=" + JIT.encode() in environ
    assert b"ghp_worker_credential" not in environ, "runners must not inherit the worker's credentials"

    restarted = backend(tmp_path)  # a new instance knows the process only from its record
    inspected = await restarted.inspect("r-2")
    assert inspected is not None and inspected.state is ContainerState.RUNNING
    gone = await restarted.terminate("r-2")
    assert gone is not None and gone.state is ContainerState.EXITED
    assert not alive(pid)
    # Once the exit is confirmed the record is forgotten: a retried terminate is a no-op.
    assert await restarted.terminate("r-2") is None, "terminate is idempotent"
    assert await restarted.inspect("r-2") is None and await restarted.list() == []
    assert await restarted.terminate("never-spawned") is None


async def test_exit_code_is_seen_and_a_missing_command_is_a_clear_error(tmp_path: Path) -> None:
    local = backend(tmp_path, [sys.executable, "-c", "raise SystemExit(3)"])
    await local.spawn(name="r-3", owner_workflow_id="wf", job_id=1, jit_config=JIT, max_lifetime_s=60)
    pid = int((await local.inspect("r-3") or pytest.fail("no record")).backend_id)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # block until it has exited, without reaping
    record = await local.inspect("r-3")
    assert record is not None and record.state is ContainerState.EXITED and record.exit_code == 3

    broken = backend(tmp_path / "b", ["/nonexistent/run.sh"])
    with pytest.raises(Exception, match="cannot start"):
        await broken.spawn(name="r-4", owner_workflow_id="wf", job_id=1, jit_config=JIT, max_lifetime_s=60)


def start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


async def test_a_stale_record_whose_pid_was_reused_never_touches_the_new_process(tmp_path: Path) -> None:
    """After pid reuse, the record's pid names another live process (here, like a runner, a
    session leader). Terminating the stale record must leave it alone."""
    local = backend(tmp_path)
    await local.spawn(name="r-5", owner_workflow_id="wf", job_id=5, jit_config=JIT, max_lifetime_s=60)
    await local.terminate("r-5")
    stranger = await asyncio.create_subprocess_exec(*SLEEPER, start_new_session=True)
    try:
        # The stale record: what the worker wrote for a runner long gone, whose pid the kernel
        # has since handed to `stranger` (which necessarily started later).
        stale = {
            "name": "r-5",
            "pid": stranger.pid,
            "start_ticks": start_ticks(stranger.pid) - 1,
            "owner_workflow_id": "wf",
            "job_id": 5,
            "started_at": time.time() - 3600,
        }
        (tmp_path / "local" / "r-5.json").write_text(json.dumps(stale))

        restarted = backend(tmp_path)
        inspected = await restarted.inspect("r-5")
        assert inspected is not None and inspected.state is ContainerState.EXITED
        states = [r.state for r in await restarted.list()]
        assert states == [ContainerState.EXITED]
        gone = await restarted.terminate("r-5")
        assert gone is not None and gone.state is ContainerState.EXITED
        assert alive(stranger.pid), "terminating a stale record signalled another process"
        assert await restarted.inspect("r-5") is None, "the stale record is forgotten"
    finally:
        stranger.kill()
        await stranger.wait()


async def test_a_runner_gets_a_minimal_environment_and_a_private_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/worker/only")
    monkeypatch.setenv("MAYFLY_SECRET_KEY", "worker-secret")
    local = LocalProcessBackend(
        LocalBackendSettings(command=SLEEPER, state_dir=tmp_path / "local", env={"RUNNER_EXTRA": "yes"})
    )
    record = await local.spawn(
        name="r-6", owner_workflow_id="wf", job_id=6, jit_config=JIT, max_lifetime_s=60
    )
    pid = int(record.backend_id)
    try:
        pairs = (await environ_of(pid)).split(b"\0")
        env = dict(pair.decode().split("=", 1) for pair in pairs if pair)
        assert set(env) <= {
            "PATH",
            "HOME",
            "LANG",
            "RUNNER_EXTRA",
            "MAYFLY_CONTAINER_NAME",
            "ACTIONS_RUNNER_INPUT_JITCONFIG",
        }
        assert env["RUNNER_EXTRA"] == "yes" and env["ACTIONS_RUNNER_INPUT_JITCONFIG"] == JIT
        home = Path(env["HOME"])
        assert home == (tmp_path / "local" / "homes" / "r-6").absolute() and home.is_dir()
        assert home.stat().st_mode & 0o777 == 0o700
        assert record.expires_at is not None and record.expires_at - time.time() == pytest.approx(60, abs=5)
    finally:
        await local.terminate("r-6")
    assert not home.exists(), "the private HOME goes with the confirmed exit"


async def test_the_watcher_terminates_a_runner_past_its_max_lifetime(tmp_path: Path) -> None:
    local = backend(tmp_path)
    activities = ContainerActivities({"pool": local}, Sealer.ephemeral(), poll_interval_s=0.1)
    record = await local.spawn(
        name="r-7", owner_workflow_id="wf", job_id=7, jit_config=JIT, max_lifetime_s=1.0
    )
    pid = int(record.backend_id)
    ref = ContainerRef(pool="pool", name="r-7", backend_id=record.backend_id)
    # The sleeper would run for two minutes; the watcher stops it once its lifetime is over.
    exit = await asyncio.wait_for(ActivityEnvironment().run(activities.wait_exit, ref), timeout=30)
    assert exit.exit_code == -signal.SIGTERM
    assert not alive(pid)
    assert await local.inspect("r-7") is None


async def test_a_retried_spawn_leaves_a_process_started_on_another_host_to_that_host(tmp_path: Path) -> None:
    """Only the host that started a process can adopt it. A spawn retried on another host must
    not start a second runner under the same slot: it hands back the first host's queue."""
    local = backend(tmp_path)
    sealer = Sealer.ephemeral()
    spec = ContainerSpec(
        pool="pool",
        name="r-8",
        job_id=8,
        owner_workflow_id="wf",
        runner_name="r-8",
        jit_config=sealer.seal(JIT, context="r-8"),
        max_lifetime_s=60,
    )
    here = ContainerActivities(
        {"pool": local}, sealer, host_task_queue="q-host-b", watch_task_queue="q-watch"
    )
    retry = ActivityEnvironment()
    # The first attempt ran on host a and named it in its heartbeat; this retry runs on host b.
    retry.info = dataclasses.replace(retry.info, attempt=2, heartbeat_details=["q-host-a"])
    ref = await retry.run(here.spawn, spec)
    assert ref.task_queue == "q-host-a"
    assert await local.list() == [], "no second process on this host"

    first = ActivityEnvironment()
    heartbeats: list[object] = []
    first.on_heartbeat = lambda *details: heartbeats.append(details)
    ref = await first.run(here.spawn, spec)
    try:
        assert ref.task_queue == "q-host-b" and ref.backend_id
        assert heartbeats and heartbeats[0] == ("q-host-b",), "the host is named before anything is created"
    finally:
        await local.terminate("r-8")


async def test_wait_returns_when_the_runner_exits_not_at_its_timeout(tmp_path: Path) -> None:
    # The runner exits once the test says so; the wait is given far longer than that.
    go = tmp_path / "go"
    local = backend(
        tmp_path,
        [sys.executable, "-c", f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)"],
    )
    await local.spawn(name="r-1", owner_workflow_id="wf-a", job_id=1, jit_config=JIT, max_lifetime_s=600)
    waiting = asyncio.create_task(local.wait("r-1", timeout_s=600))
    await asyncio.sleep(0)
    assert not waiting.done()
    go.touch()
    # Bounded far below the wait's own timeout: only an exit event can end it this soon.
    await asyncio.wait_for(waiting, timeout=60)
    record = await local.inspect("r-1")
    assert record is not None and record.state is ContainerState.EXITED and record.exit_code == 0
    await local.terminate("r-1")


async def test_the_watcher_that_sees_an_exit_removes_the_container_and_says_so(tmp_path: Path) -> None:
    # The workflow skips its terminate only on this answer, so it must mean "nothing is left".
    local = backend(tmp_path, [sys.executable, "-c", "raise SystemExit(3)"])
    activities = ContainerActivities({"pool": local}, Sealer.ephemeral(), poll_interval_s=0.1)
    record = await local.spawn(
        name="r-8", owner_workflow_id="wf", job_id=8, jit_config=JIT, max_lifetime_s=600
    )
    ref = ContainerRef(pool="pool", name="r-8", backend_id=record.backend_id)
    exit = await asyncio.wait_for(ActivityEnvironment().run(activities.wait_exit, ref), timeout=30)
    assert exit.exit_code == 3 and exit.gone
    assert await local.inspect("r-8") is None


async def test_a_watcher_that_lost_track_of_the_container_does_not_claim_it_gone(tmp_path: Path) -> None:
    local = backend(tmp_path)
    activities = ContainerActivities({"pool": local}, Sealer.ephemeral(), poll_interval_s=0.1)
    ref = ContainerRef(pool="pool", name="never-made", backend_id="")
    exit = await asyncio.wait_for(ActivityEnvironment().run(activities.wait_exit, ref), timeout=30)
    assert exit.exit_code is None and not exit.gone
