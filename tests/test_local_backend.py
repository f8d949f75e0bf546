"""The local process backend: idempotent spawn, restart-proof teardown, no secrets in argv."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mayfly.backends import ContainerState, NameTakenByAnother
from mayfly.backends.local import LocalProcessBackend
from mayfly.config import LocalBackendSettings

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
        assert [r.name for r in await local.list()] == ["r-1"]
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
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert JIT.encode() not in cmdline, "the JIT config must never be on a command line"
    assert b"ACTIONS_RUNNER_INPUT_JITCONFIG=" + JIT.encode() in environ
    assert b"ghp_worker_credential" not in environ, "runners must not inherit the worker's credentials"

    restarted = backend(tmp_path)  # a new instance knows the process only from its record
    inspected = await restarted.inspect("r-2")
    assert inspected is not None and inspected.state is ContainerState.RUNNING
    gone = await restarted.terminate("r-2")
    assert gone is not None and gone.state is ContainerState.EXITED
    assert not alive(pid)
    assert await restarted.terminate("r-2") is not None, "terminate is idempotent"
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
