"""No JIT config appears in plaintext in workflow history, logs or search attributes, even when
a failure message carries it."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest
from temporalio.api.history.v1 import History
from temporalio.client import Client

from mayfly.backends import BackendError, ContainerBackend, ContainerRecord
from mayfly.embedded import EmbeddedStack
from mayfly.models import job_workflow_id, semaphore_workflow_id
from tests.backends import DelegatingBackend


class LeakyBackend(DelegatingBackend):
    """Fails the first spawn with an error that quotes the JIT config, as a careless provider might."""

    def __init__(self, inner: ContainerBackend) -> None:
        super().__init__(inner)
        self.seen: list[str] = []

    async def spawn(
        self, *, name: str, owner_workflow_id: str, job_id: int, jit_config: str, max_lifetime_s: float
    ) -> ContainerRecord:
        self.seen.append(jit_config)
        if len(self.seen) == 1:
            raise BackendError(f"rejected env ACTIONS_RUNNER_INPUT_JITCONFIG={jit_config}")
        return await super().spawn(
            name=name,
            owner_workflow_id=owner_workflow_id,
            job_id=job_id,
            jit_config=jit_config,
            max_lifetime_s=max_lifetime_s,
        )


async def raw_history(client: Client, workflow_id: str) -> bytes:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return History(events=history.events).SerializeToString() + history.to_json().encode()


async def test_jit_config_never_appears_in_history_logs_or_search_attributes(
    client: Client,
    task_queue: str,
    pool_name: str,
    state_dir: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    leaky: list[LeakyBackend] = []

    def wrap(inner: ContainerBackend) -> ContainerBackend:
        leaky.append(LeakyBackend(inner))
        return leaky[0]

    stack = EmbeddedStack(
        client, state_dir=state_dir, task_queue=task_queue, pool=pool_name, wrap_backend=wrap
    )
    await stack.start()
    try:
        (job_id,) = stack.queue_jobs(1, duration_s=0.5)
        await stack.wait_jobs_finished([job_id], within_s=120)
        (jit,) = set(leaky[0].seen)
        credentials = json.loads(base64.b64decode(jit))[".credentials"]
        secrets = [jit.encode(), credentials.encode()]
        description = await client.get_workflow_handle(job_workflow_id(job_id)).describe()
        histories = [
            await raw_history(client, job_workflow_id(job_id)),
            await raw_history(client, semaphore_workflow_id(pool_name)),
        ]
    finally:
        await stack.stop()

    assert len(leaky[0].seen) == 2, "the leaky first spawn failed and the retry succeeded"
    assert b"[redacted]" in histories[0], "the failure was recorded, with the secret cut out"
    for history in histories:
        for secret in secrets:
            assert secret not in history
    logs = caplog.text + "".join(capfd.readouterr())
    assert jit not in logs and credentials not in logs
    attributes = str([(pair.key.name, pair.value) for pair in description.typed_search_attributes])
    assert "MayflyRunner" in attributes and jit not in attributes
