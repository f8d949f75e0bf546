"""The fake Modal control plane, driven by the real modal==1.6.4 client's async API.

These tests pin what the Modal backend may rely on: which exceptions the client raises for
which server answers, how many attempts it makes, and the Sandbox semantics the fake models.
They are tied to modal==1.6.4 because the fake speaks Modal's internal RPCs.
"""

from __future__ import annotations

import string
import time
from collections.abc import AsyncIterator
from pathlib import Path

import modal
import modal.exception
import pytest
from grpclib import Status

from tests.fake_modal import FakeModal, serve_fake_modal

APP = "mayfly-fake-test"
JIT = "c2VjcmV0LWppdC1jb25maWc="
# One first attempt plus the client's three retries of transient errors.
ATTEMPTS_ON_TRANSIENT = 4


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeModal]:
    async with serve_fake_modal(tmp_path) as fake:
        yield fake
        assert not fake.unimplemented, "the client called RPCs the fake does not implement"


@pytest.fixture
async def app(fake: FakeModal) -> modal.App:
    return await modal.App.lookup.aio(APP, create_if_missing=True)


def is_v1_id(sandbox_id: str) -> bool:
    prefix, _, rest = sandbox_id.partition("-")
    return prefix == "sb" and len(rest) == 22 and all(c in string.ascii_letters + string.digits for c in rest)


async def test_create_records_what_the_client_sent(fake: FakeModal, app: modal.App) -> None:
    sb = await modal.Sandbox.create.aio(
        "/opt/runner/bin/Runner.Listener",
        "run",
        app=app,
        name="runner-1-1",
        tags={"job_id": "1", "owner": "wf-a"},
        secrets=[modal.Secret.from_dict({"ACTIONS_RUNNER_INPUT_JITCONFIG": JIT})],
        env={"RUNNER_ALLOW_RUNASROOT": "1"},
        timeout=3600,
        cpu=2.0,
        memory=4096,
        region="us-east",
    )
    record = fake.sandboxes[sb.object_id]
    assert record.app_id == app.app_id and record.version == 2 and not is_v1_id(sb.object_id)
    assert (record.name, record.tags) == ("runner-1-1", {"job_id": "1", "owner": "wf-a"})
    assert record.entrypoint_args == ["/opt/runner/bin/Runner.Listener", "run"]
    assert (record.timeout_secs, record.cpu, record.memory_mb, record.regions) == (
        3600,
        2.0,
        4096,
        ["us-east"],
    )
    assert record.gpu is None and record.state == "running"
    # V2 sends Secret.from_dict contents inline: no Secret object is created server-side.
    assert record.env == {"ACTIONS_RUNNER_INPUT_JITCONFIG": JIT, "RUNNER_ALLOW_RUNASROOT": "1"}
    assert record.secret_ids == [] and fake.calls["SecretGetOrCreate"] == 0
    assert not any(JIT in arg for arg in record.entrypoint_args)


async def test_gpu_create_goes_through_v1_with_secret_ids(fake: FakeModal, app: modal.App) -> None:
    sb = await modal.Sandbox.create.aio(
        "run.sh",
        app=app,
        name="gpu-1",
        tags={"job_id": "2"},
        secrets=[modal.Secret.from_dict({"ACTIONS_RUNNER_INPUT_JITCONFIG": JIT})],
        gpu="a10g",
        timeout=600,
        cloud="aws",
    )
    record = fake.sandboxes[sb.object_id]
    assert is_v1_id(sb.object_id) and record.version == 1
    assert (record.gpu, record.cloud, record.timeout_secs) == ("A10G", "aws", 600)
    # V1 creates the Secret first and references it by id.
    assert fake.calls["SecretGetOrCreate"] == 1 and len(record.secret_ids) == 1
    assert record.env == {"ACTIONS_RUNNER_INPUT_JITCONFIG": JIT}
    assert fake.calls["SandboxCreate"] == 1 and fake.calls["SandboxGetTaskId"] == 1
    assert fake.calls["SandboxCreateV2"] == 0


async def test_registry_image_and_named_secret_resolve(fake: FakeModal, app: modal.App) -> None:
    fake.add_secret("github-app", {"GITHUB_APP_ID": "42"})
    image = (
        modal.Image.from_registry("ubuntu:24.04", add_python="3.12")
        .apt_install("git")
        .env({"RUNNER_ALLOW_RUNASROOT": "1"})
    )
    sb = await modal.Sandbox.create.aio(
        app=app,
        image=image,
        secrets=[modal.Secret.from_name("github-app"), modal.Secret.from_dict({"JIT": JIT})],
    )
    record = fake.sandboxes[sb.object_id]
    assert record.env == {"GITHUB_APP_ID": "42", "JIT": JIT}
    assert record.image_id == image.object_id
    with pytest.raises(modal.exception.NotFoundError):
        await modal.Sandbox.create.aio(app=app, secrets=[modal.Secret.from_name("missing")])


async def test_set_tags_replaces_the_whole_set(fake: FakeModal, app: modal.App) -> None:
    sb = await modal.Sandbox.create.aio(app=app, tags={"job_id": "1", "pool": "p"})
    await sb.set_tags.aio({"job_id": "2"})
    assert fake.sandboxes[sb.object_id].tags == {"job_id": "2"}
    listed = [s.object_id async for s in modal.Sandbox.list.aio(app_id=app.app_id, tags={"pool": "p"})]
    assert listed == []
    found = [s.object_id async for s in modal.Sandbox.list.aio(app_id=app.app_id, tags={"job_id": "2"})]
    assert found == [sb.object_id]


@pytest.mark.parametrize("gpu", [None, "T4"], ids=["v2", "v1-gpu"])
async def test_taken_name_is_already_exists_and_from_name_adopts_it(
    fake: FakeModal, app: modal.App, gpu: str | None
) -> None:
    first = await modal.Sandbox.create.aio(app=app, name="runner-7-1", tags={"job_id": "7"}, gpu=gpu)
    with pytest.raises(modal.exception.AlreadyExistsError):
        await modal.Sandbox.create.aio(app=app, name="runner-7-1", tags={"job_id": "other"}, gpu=gpu)
    assert len(fake.running(app.app_id)) == 1

    adopted = await modal.Sandbox.from_name.aio(APP, "runner-7-1")
    assert adopted.object_id == first.object_id
    assert await adopted.get_tags.aio() == {"job_id": "7"}
    # The client asks the V2 lookup first and falls back to V1 only on NOT_FOUND.
    assert fake.calls["SandboxGetFromNameV2"] == 1
    assert fake.calls["SandboxGetFromName"] == (1 if gpu else 0)


async def test_from_name_and_lookup_of_missing_things_are_not_found(fake: FakeModal, app: modal.App) -> None:
    with pytest.raises(modal.exception.NotFoundError):
        await modal.Sandbox.from_name.aio(APP, "nobody")
    with pytest.raises(modal.exception.NotFoundError):
        await modal.App.lookup.aio("no-such-app")


async def test_list_returns_running_sandboxes_of_the_app_with_a_tag_superset(
    fake: FakeModal, app: modal.App
) -> None:
    other_app = await modal.App.lookup.aio("another-app", create_if_missing=True)
    fake.list_page_size = 2  # make the client page on before_timestamp
    wanted = []
    for i in range(5):
        sb = await modal.Sandbox.create.aio(app=app, tags={"pool": "p1", "job_id": str(i)})
        wanted.append(sb.object_id)
    finished = await modal.Sandbox.create.aio(app=app, tags={"pool": "p1"})
    fake.finish(finished.object_id)
    await modal.Sandbox.create.aio(app=app, tags={"pool": "p2"})
    await modal.Sandbox.create.aio(app=other_app, tags={"pool": "p1"})

    found = [sb.object_id async for sb in modal.Sandbox.list.aio(app_id=app.app_id, tags={"pool": "p1"})]
    assert found == wanted[::-1]  # newest first
    one = [sb.object_id async for sb in modal.Sandbox.list.aio(app_id=app.app_id, tags={"job_id": "3"})]
    assert one == [wanted[3]]
    assert fake.calls["SandboxListV2"] >= 4


async def test_poll_is_none_while_running_and_the_exit_code_after(fake: FakeModal, app: modal.App) -> None:
    sb = await modal.Sandbox.create.aio(app=app, name="runner-1")
    assert await sb.poll.aio() is None and sb.returncode is None
    fake.finish(sb.object_id, 0)
    assert await sb.poll.aio() == 0
    await sb.wait.aio(raise_on_termination=False)
    assert sb.returncode == 0

    failing = await modal.Sandbox.create.aio(app=app, name="runner-1")  # the name was released
    fake.finish(failing.object_id, 3)
    await failing.wait.aio()
    assert failing.returncode == 3


async def test_timeout_ends_the_sandbox_during_a_long_poll(fake: FakeModal, app: modal.App) -> None:
    sb = await modal.Sandbox.create.aio(app=app, timeout=1)
    started = time.monotonic()
    with pytest.raises(modal.exception.SandboxTimeoutError):
        # A timed-out sandbox raises even with raise_on_termination=False.
        await sb.wait.aio(raise_on_termination=False)
    assert sb.returncode == 124 and time.monotonic() - started < 5
    assert fake.sandboxes[sb.object_id].exit_code == 124


async def test_terminate_gives_137_frees_the_name_and_is_idempotent(fake: FakeModal, app: modal.App) -> None:
    sb = await modal.Sandbox.create.aio(app=app, name="runner-9-1", tags={"job_id": "9"})
    await sb.terminate.aio()
    assert await sb.poll.aio() == 137
    with pytest.raises(modal.exception.SandboxTerminatedError):
        await sb.wait.aio()
    await sb.terminate.aio()  # no-op on a finished sandbox
    assert fake.sandboxes[sb.object_id].exit_code == 137

    again = await modal.Sandbox.create.aio(app=app, name="runner-9-1", tags={"job_id": "9"})
    assert again.object_id != sb.object_id
    assert (await modal.Sandbox.from_name.aio(APP, "runner-9-1")).object_id == again.object_id
    listed = [s.object_id async for s in modal.Sandbox.list.aio(app_id=app.app_id)]
    assert listed == [again.object_id]
    reattached = await modal.Sandbox.from_id.aio(sb.object_id)
    assert reattached.returncode == 137

    fake.time_out(again.object_id)
    assert await again.poll.aio() == 124


@pytest.mark.parametrize(
    ("status", "error", "attempts"),
    [
        (Status.RESOURCE_EXHAUSTED, modal.exception.ResourceExhaustedError, 1),
        (Status.PERMISSION_DENIED, modal.exception.PermissionDeniedError, 1),
        (Status.UNAUTHENTICATED, modal.exception.AuthError, 1),
        (Status.INVALID_ARGUMENT, modal.exception.InvalidError, 1),
        (Status.UNAVAILABLE, modal.exception.ServiceError, ATTEMPTS_ON_TRANSIENT),
    ],
)
async def test_create_errors_map_to_modal_exceptions(
    fake: FakeModal, app: modal.App, status: Status, error: type[Exception], attempts: int
) -> None:
    fake.fail_next("SandboxCreateV2", status, "injected", times=attempts)
    with pytest.raises(error):
        await modal.Sandbox.create.aio(app=app, name="runner-1")
    assert fake.calls["SandboxCreateV2"] == attempts
    assert fake.sandboxes == {}


async def test_transient_errors_below_the_retry_budget_are_invisible(fake: FakeModal, app: modal.App) -> None:
    fake.fail_next("SandboxCreateV2", Status.UNAVAILABLE, times=ATTEMPTS_ON_TRANSIENT - 1)
    sb = await modal.Sandbox.create.aio(app=app, name="runner-1")
    assert fake.calls["SandboxCreateV2"] == ATTEMPTS_ON_TRANSIENT
    assert [s.sandbox_id for s in fake.running()] == [sb.object_id]


@pytest.mark.parametrize(("gpu", "rpc"), [(None, "SandboxCreateV2"), ("T4", "SandboxCreate")])
async def test_lost_create_response_leaves_a_sandbox_the_caller_never_heard_of(
    fake: FakeModal, app: modal.App, gpu: str | None, rpc: str
) -> None:
    fake.lose_next_response(rpc)
    with pytest.raises(modal.exception.ServiceError):
        await modal.Sandbox.create.aio(app=app, name="runner-5-1", tags={"job_id": "5"}, gpu=gpu)
    assert fake.calls[rpc] == ATTEMPTS_ON_TRANSIENT
    orphan = fake.named("runner-5-1", app.app_id)
    assert orphan is not None and len(fake.sandboxes) == 1

    # A retry by the caller collides with the orphan, which it can then adopt.
    with pytest.raises(modal.exception.AlreadyExistsError):
        await modal.Sandbox.create.aio(app=app, name="runner-5-1", tags={"job_id": "5"}, gpu=gpu)
    adopted = await modal.Sandbox.from_name.aio(APP, "runner-5-1")
    assert adopted.object_id == orphan.sandbox_id
    assert await adopted.get_tags.aio() == {"job_id": "5"}
