"""Opt-in smoke test against the real Modal service. It runs only with MODAL_TOKEN_ID and
MODAL_TOKEN_SECRET set (it creates one small CPU sandbox and terminates it)."""

from __future__ import annotations

import os
import uuid

import pytest

from mayfly.backends import ContainerState
from mayfly.backends.modal import ModalBackend
from mayfly.config import ModalBackendSettings

pytestmark = pytest.mark.skipif(
    not (os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET")),
    reason="live Modal smoke test skipped: set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET to run it",
)


async def test_a_sandbox_is_created_adopted_listed_and_terminated_on_real_modal() -> None:
    settings = ModalBackendSettings(
        app_name="mayfly-smoke", image="python:3.11-slim", command=["sleep", "600"], cpu=0.25, memory_mib=256
    )
    modal = ModalBackend(settings, "smoke")
    name = f"mayfly-smoke-{uuid.uuid4().hex[:8]}"
    record = await modal.spawn(
        name=name, owner_workflow_id="smoke", job_id=1, jit_config="x", max_lifetime_s=300
    )
    try:
        assert record.state is ContainerState.RUNNING
        again = await modal.spawn(
            name=name, owner_workflow_id="smoke", job_id=1, jit_config="x", max_lifetime_s=300
        )
        assert again.backend_id == record.backend_id
        assert name in [r.name for r in await modal.list()]
    finally:
        gone = await modal.terminate(name)
    assert gone is not None and gone.state is ContainerState.EXITED
