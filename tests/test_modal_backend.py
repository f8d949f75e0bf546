"""The Modal backend, driving the real `modal` client (1.6.4) against the in-process fake control plane."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpclib import Status
from temporalio.client import Client, WorkflowExecutionStatus

from mayfly.app.embedded import EmbeddedStack
from mayfly.backends import BackendError, ContainerState, NameTakenByAnother
from mayfly.backends.modal import ModalBackend, ModalCapacityError, ModalConfigError
from mayfly.config import ModalBackendSettings
from simulator.probe import ConcurrencyProbe
from tests.fake_modal import FakeModal, FakeSandbox, serve_fake_modal

JIT = "eyJzZWNyZXQiOiAiaml0In0="


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeModal]:
    async with serve_fake_modal(tmp_path) as fake:
        yield fake
    assert not fake.unimplemented, f"the client needed RPCs the fake lacks: {fake.unimplemented}"


def backend(**overrides: object) -> ModalBackend:
    settings = ModalBackendSettings(app_name="mayfly-test", **overrides)
    return ModalBackend(settings, "gpu")


async def spawn(modal: ModalBackend, name: str = "mayfly-7-a1", owner: str = "mayfly-job-7") -> str:
    record = await modal.spawn(
        name=name, owner_workflow_id=owner, job_id=7, jit_config=JIT, max_lifetime_s=3600
    )
    return record.backend_id


async def test_create_passes_the_jit_config_as_a_secret_and_tags_the_sandbox(fake: FakeModal) -> None:
    modal = backend(gpu="A100", cpu=4, memory_mib=8192)
    sandbox_id = await spawn(modal)
    sandbox = fake.sandboxes[sandbox_id]
    assert sandbox.env["ACTIONS_RUNNER_INPUT_JITCONFIG"] == JIT
    assert JIT not in " ".join(sandbox.entrypoint_args)
    assert sandbox.entrypoint_args == ["/opt/actions-runner/bin/Runner.Listener", "run"]
    assert sandbox.tags == {
        "mayfly-owner": "mayfly-job-7",
        "mayfly-job-id": "7",
        "mayfly-pool": "gpu",
        "mayfly-runner": "mayfly-7-a1",
    }
    assert (sandbox.gpu, sandbox.cpu, sandbox.memory_mb, sandbox.timeout_secs) == ("A100", 4.0, 8192, 3600)
    assert sandbox.name == "mayfly-7-a1"


async def test_a_second_spawn_adopts_and_another_owner_is_refused(fake: FakeModal) -> None:
    modal = backend()
    first = await spawn(modal)
    assert await spawn(modal) == first
    assert len(fake.running()) == 1
    with pytest.raises(NameTakenByAnother):
        await spawn(modal, owner="mayfly-job-8")


async def test_a_lost_create_response_is_adopted_on_retry(fake: FakeModal) -> None:
    modal = backend()
    fake.lose_next_response("SandboxCreateV2")
    with pytest.raises(BackendError) as lost:
        await spawn(modal)
    assert lost.value.retryable
    assert len(fake.running()) == 1, "the create happened although the client saw an error"
    adopted = await spawn(modal)
    assert [s.sandbox_id for s in fake.running()] == [adopted]


async def test_list_inspect_and_terminate(fake: FakeModal) -> None:
    modal = backend()
    a = await spawn(modal, "mayfly-7-a1")
    b = await spawn(modal, "mayfly-8-a1", owner="mayfly-job-8")
    other_pool = ModalBackend(ModalBackendSettings(app_name="mayfly-test"), "cpu")
    await spawn(other_pool, "mayfly-9-a1", owner="mayfly-job-9")
    listed = sorted((r.name, r.owner_workflow_id, r.job_id) for r in await modal.list())
    assert listed == [("mayfly-7-a1", "mayfly-job-7", 7), ("mayfly-8-a1", "mayfly-job-8", 7)]

    fake.finish(b, exit_code=3)
    finished = await modal.inspect("mayfly-8-a1")
    assert finished is not None and finished.state is ContainerState.EXITED and finished.exit_code == 3
    running = await modal.inspect("mayfly-7-a1")
    assert running is not None and running.state is ContainerState.RUNNING

    gone = await modal.terminate("mayfly-7-a1")
    assert gone is not None and gone.state is ContainerState.EXITED and gone.exit_code == 137
    assert not fake.sandboxes[a].running
    again = await modal.terminate("mayfly-7-a1")
    assert again is not None and again.exit_code == 137, "terminate is idempotent"
    assert await modal.terminate("never-created") is None
    assert await spawn(modal, "mayfly-7-a1") != a, "the name is free again once terminated"


@pytest.mark.parametrize(
    ("status", "error_type", "retryable"),
    [
        (Status.RESOURCE_EXHAUSTED, ModalCapacityError, True),
        (Status.PERMISSION_DENIED, ModalConfigError, False),
        (Status.UNAUTHENTICATED, ModalConfigError, False),
        (Status.INVALID_ARGUMENT, ModalConfigError, False),
        (Status.UNAVAILABLE, BackendError, True),
    ],
)
async def test_modal_errors_map_to_retry_decisions(
    fake: FakeModal, status: Status, error_type: type[BackendError], retryable: bool
) -> None:
    modal = backend()
    # Enough failures to outlast the client's own retries of transient codes.
    fake.fail_next("SandboxCreateV2", status, "injected", times=4)
    with pytest.raises(error_type) as raised:
        await spawn(modal)
    assert raised.value.retryable is retryable
    assert "injected" in str(raised.value)


class SandboxProcesses:
    """Runs each fake sandbox's entrypoint as a local process with the sandbox's environment,
    so a runner in a "Modal sandbox" really connects to the GitHub simulator."""

    def __init__(self, fake: FakeModal, probe: ConcurrencyProbe) -> None:
        self._fake = fake
        self._probe = probe
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        fake.on_start = self._start
        fake.on_settle = self._stop

    def _start(self, sandbox: FakeSandbox) -> None:
        task = asyncio.create_task(self._run(sandbox))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _run(self, sandbox: FakeSandbox) -> None:
        process = await asyncio.create_subprocess_exec(
            *sandbox.entrypoint_args,
            env={**sandbox.env, **self._probe.env},
            start_new_session=True,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self._processes[sandbox.sandbox_id] = process
        code = await process.wait()
        self._fake.finish(sandbox.sandbox_id, exit_code=code)

    def _stop(self, sandbox: FakeSandbox) -> None:
        process = self._processes.get(sandbox.sandbox_id)
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGKILL)

    async def close(self) -> None:
        for process in self._processes.values():
            if process.returncode is None:
                process.kill()
        await asyncio.gather(*self._watchers, return_exceptions=True)


async def test_full_lifecycle_on_modal_with_capacity_errors_and_a_lost_create(
    fake: FakeModal, client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    cap = 3
    probe = ConcurrencyProbe(ledger=state_dir / "probe", cap=cap)
    processes = SandboxProcesses(fake, probe)
    modal = ModalBackend(ModalBackendSettings(app_name="mayfly-e2e", command=[*probe.command]), pool_name)
    # Capacity runs out twice, then a create's answer is lost; the jobs still all run.
    fake.fail_next("SandboxCreateV2", Status.RESOURCE_EXHAUSTED, "no A100s left", times=2)
    fake.lose_next_response("SandboxCreateV2")
    stack = EmbeddedStack(
        client, state_dir=state_dir, task_queue=task_queue, pool=pool_name, max_runners=cap, backend=modal
    )
    await stack.start()
    try:
        job_ids = stack.queue_jobs(6, duration_s=1.0)
        await stack.wait_jobs_finished(job_ids, within_s=180)
        statuses = [await stack.job_workflow_status(job_id) for job_id in job_ids]
        semaphore = await stack.semaphore_status()
        left = [r.name for r in await modal.list()]
    finally:
        await stack.stop()
        await processes.close()
    assert statuses == [WorkflowExecutionStatus.COMPLETED] * len(job_ids)
    assert all(stack.simulator.job(j).conclusion == "success" for j in job_ids)
    assert probe.violations() == []
    assert semaphore.holders == [] and semaphore.waiters == []
    assert left == [] and fake.running() == []
    assert stack.simulator.runners() == []
    assert fake.calls["SandboxCreateV2"] >= len(job_ids) + 2
