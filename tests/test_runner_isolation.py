"""A job on a local runner cannot reach the worker's credentials.

The worker holds the GitHub token, the sealing key and provider tokens in its environment,
and may hold key files. A runner started by the local backend must be unable to read
/proc/<worker>/environ or a credential file, whatever the job runs.

These tests need root (to start processes as `nobody`, uid 65534, which exists on every
Debian-like system); the suite runs as root here. `nobody` is used rather than a user the
test creates, so no test changes the machine's user database.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mayfly.backends import ContainerState
from mayfly.backends.local import LocalProcessBackend
from mayfly.config import LocalBackendSettings

ROOT = Path(__file__).resolve().parent.parent
SECRET = "ghp_worker_only_credential_0123456789"
# The system interpreter: the test venv's lives under /root, which `nobody` cannot enter.
SYSTEM_PYTHON = "/usr/bin/python3"

# What a hostile job would try: read the worker's environment and a credential file.
SNOOP = """
import json, os, sys
worker_pid, credential = sys.argv[1], sys.argv[2]
result = {"uid": os.getuid(), "groups": os.getgroups(), "home": os.environ.get("HOME")}
result["env"] = sorted(os.environ)
for key, path in (("environ", f"/proc/{worker_pid}/environ"), ("credential", credential)):
    try:
        with open(path, "rb") as f:
            result[key] = f.read().decode(errors="replace")
    except OSError as error:
        result[key] = "denied: " + type(error).__name__
home = os.environ["HOME"]
with open(os.path.join(home, "probe"), "w") as f:
    f.write("x")
result["home_writable"] = True
print(json.dumps(result), flush=True)
"""

# Stands for the worker process: its credential in its environment, marked non-dumpable
# through the very function worker.py calls at start (unless told not to).
WORKER_LIKE = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from mayfly.hardening import make_non_dumpable
if sys.argv[2] == "harden" and not make_non_dumpable():
    sys.exit(3)
print("ready", flush=True)
time.sleep(300)
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="starting processes as another user needs root")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory `nobody` can traverse (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="mayfly-isolation-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def start_worker_like(*, harden: bool, user: int | None = None) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON if user is not None else sys.executable,
        "-c",
        WORKER_LIKE,
        str(ROOT),
        "harden" if harden else "plain",
        env={"PATH": os.environ["PATH"], "MAYFLY_GITHUB__TOKEN": SECRET},
        stdout=asyncio.subprocess.PIPE,
        user=user,
        group=user,
        extra_groups=[] if user is not None else None,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
    assert line.strip() == b"ready", f"worker stand-in did not start: {line!r}"
    return process


@pytest.fixture
async def hardened_worker() -> AsyncIterator[asyncio.subprocess.Process]:
    process = await start_worker_like(harden=True)
    try:
        yield process
    finally:
        process.kill()
        await process.wait()


async def run_snoop(local: LocalProcessBackend, state_dir: Path, name: str) -> dict[str, object]:
    record = await local.spawn(
        name=name, owner_workflow_id="wf", job_id=1, jit_config="jit-config", max_lifetime_s=60
    )
    async with asyncio.timeout(30):
        while (await local.inspect(name) or record).state is ContainerState.RUNNING:  # noqa: ASYNC110 (a process exit raises no event here)
            await asyncio.sleep(0.05)
    log = (state_dir / f"{name}.log").read_text()
    lines = [line for line in log.splitlines() if line.startswith("{")]
    assert lines, f"the runner printed no result: {log[-2000:]}"
    result: dict[str, object] = json.loads(lines[-1])
    return result


@needs_root
async def test_a_runner_cannot_read_the_workers_environment_or_credential_files(
    shared_dir: Path, hardened_worker: asyncio.subprocess.Process
) -> None:
    credential = shared_dir / "github-app.pem"
    credential.write_text(SECRET)
    credential.chmod(0o600)
    local = LocalProcessBackend(
        LocalBackendSettings(
            command=[SYSTEM_PYTHON, "-c", SNOOP, str(hardened_worker.pid), str(credential)],
            state_dir=shared_dir / "state",
            run_as_user="nobody",
        )
    )
    result = await run_snoop(local, shared_dir / "state", "iso-1")
    seen = f"uid={result['uid']} environ={str(result['environ'])[:40]!r} credential={result['credential']!r}"
    print(f"\nrunner saw: {seen}")

    nobody = pwd.getpwnam("nobody")
    assert result["uid"] == nobody.pw_uid, "the runner runs as the configured unprivileged user"
    assert result["groups"] == [], "no supplementary groups of the worker"
    assert SECRET not in str(result["environ"]) and str(result["environ"]).startswith("denied")
    assert SECRET not in str(result["credential"]) and str(result["credential"]).startswith("denied")
    assert result["home"] == str((shared_dir / "state" / "homes" / "iso-1").absolute())
    assert result["home_writable"] is True
    assert set(str(key) for key in result["env"]) <= {  # type: ignore[attr-defined]
        "PATH",
        "HOME",
        "LANG",
        "ACTIONS_RUNNER_INPUT_JITCONFIG",
        "MAYFLY_CONTAINER_NAME",
        "LC_CTYPE",  # set by the interpreter itself under some locales
    }
    await local.terminate("iso-1")


@needs_root
@pytest.mark.parametrize("harden", [True, False], ids=["non-dumpable", "control"])
async def test_non_dumpable_keeps_a_same_uid_process_out_of_the_workers_environ(harden: bool) -> None:
    """Without a separate user, only the non-dumpable flag stands between a runner and the
    worker's environment. The control run shows the read succeeds without it."""
    nobody = pwd.getpwnam("nobody").pw_uid
    worker = await start_worker_like(harden=harden, user=nobody)
    try:
        reader = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON,
            "-c",
            "import sys\ntry:\n    print(open(sys.argv[1], 'rb').read().decode(errors='replace'))\n"
            "except OSError as e:\n    print('denied', type(e).__name__)",
            f"/proc/{worker.pid}/environ",
            stdout=asyncio.subprocess.PIPE,
            user=nobody,
            group=nobody,
            extra_groups=[],
            env={"PATH": os.environ["PATH"]},
        )
        output = (await asyncio.wait_for(reader.communicate(), timeout=30))[0].decode()
    finally:
        worker.kill()
        await worker.wait()
    if harden:
        assert SECRET not in output and output.startswith("denied"), output
    else:
        assert SECRET in output, "the control must be able to read it, or the test proves nothing"
