"""Runners as Modal Sandboxes (modal==1.6.4, async API).

Names are deterministic (the runner name) and unique per app among running sandboxes, so a
retried create meets AlreadyExistsError and adopts its own sandbox after checking the tags.
Before creating, the backend always looks first: an earlier attempt whose response was lost
may have created the sandbox already.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from mayfly.backends.base import BackendError, ContainerRecord, ContainerState, NameTakenByAnother
from mayfly.config import ModalBackendSettings

TAG_OWNER = "mayfly-owner"
TAG_JOB = "mayfly-job-id"
TAG_POOL = "mayfly-pool"
TAG_RUNNER = "mayfly-runner"
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class ModalCapacityError(BackendError):
    """Quota or capacity exhausted: retry with backoff; the UI shows it as such."""

    retryable = True


class ModalConfigError(BackendError):
    """Credentials, permissions or arguments are wrong: retrying cannot help."""

    retryable = False


def _map_error(error: Exception, action: str) -> BackendError:
    from modal import exception as modal_errors

    if isinstance(error, modal_errors.ResourceExhaustedError):
        return ModalCapacityError(f"Modal capacity or quota exhausted while trying to {action}: {error}")
    if isinstance(error, modal_errors.AuthError | modal_errors.PermissionDeniedError):
        return ModalConfigError(
            f"Modal refused to {action}: {error} (check MODAL_TOKEN_ID/MODAL_TOKEN_SECRET and the workspace)"
        )
    if isinstance(error, modal_errors.InvalidError):
        return ModalConfigError(
            f"Modal rejected the request to {action}: {error} (check the pool's modal settings)"
        )
    return BackendError(f"Modal failed to {action}: {type(error).__name__}: {error}")


class ModalBackend:
    # Any worker reaches a sandbox through Modal's API.
    host_bound = False

    def __init__(self, settings: ModalBackendSettings, pool: str) -> None:
        self._settings = settings
        self._pool = pool
        # modal reads it from the environment when a client is created: set it before that.
        os.environ.setdefault("MODAL_MAX_THROTTLE_WAIT", str(settings.max_throttle_wait_s))
        self._app: Any = None
        self._image: Any = None

    async def _get_app(self) -> Any:
        import modal

        if self._app is None:
            self._app = await modal.App.lookup.aio(
                self._settings.app_name, create_if_missing=True, environment_name=self._settings.environment
            )
        return self._app

    def _get_image(self) -> Any:
        import modal

        if self._image is None:
            if self._settings.image:
                self._image = modal.Image.from_registry(
                    self._settings.image, add_python=self._settings.image_add_python
                )
            else:
                version = self._settings.runner_version
                tarball = (
                    f"https://github.com/actions/runner/releases/download/v{version}/"
                    f"actions-runner-linux-x64-{version}.tar.gz"
                )
                self._image = (
                    modal.Image.debian_slim()
                    .apt_install("curl", "ca-certificates", "git", "jq", "sudo")
                    .run_commands(
                        "mkdir -p /opt/actions-runner",
                        f"curl -fsSL {tarball} | tar xz -C /opt/actions-runner",
                        "/opt/actions-runner/bin/installdependencies.sh",
                    )
                    .env({"RUNNER_ALLOW_RUNASROOT": "1", "ACTIONS_RUNNER_PRINT_LOG_TO_STDOUT": "1"})
                    .workdir("/opt/actions-runner")
                )
        return self._image

    async def _find(self, name: str, *, include_terminated: bool = False) -> Any | None:
        import modal
        from modal import exception as modal_errors

        try:
            return await modal.Sandbox.from_name.aio(
                self._settings.app_name,
                name,
                environment_name=self._settings.environment,
                include_terminated=include_terminated,
            )
        except modal_errors.NotFoundError:
            return None

    async def _record(self, sandbox: Any, name: str) -> ContainerRecord:
        tags: dict[str, str] = await sandbox.get_tags.aio()
        exit_code = await sandbox.poll.aio()
        return ContainerRecord(
            name=tags.get(TAG_RUNNER, name),
            backend_id=sandbox.object_id,
            owner_workflow_id=tags.get(TAG_OWNER, ""),
            job_id=int(tags.get(TAG_JOB, "0") or 0),
            state=ContainerState.RUNNING if exit_code is None else ContainerState.EXITED,
            exit_code=exit_code,
        )

    async def _adopt(self, sandbox: Any, name: str, owner_workflow_id: str) -> ContainerRecord:
        record = await self._record(sandbox, name)
        if record.owner_workflow_id != owner_workflow_id:
            raise NameTakenByAnother(
                f"sandbox {name} belongs to {record.owner_workflow_id or 'someone else'}"
            )
        return record

    async def spawn(
        self, *, name: str, owner_workflow_id: str, job_id: int, jit_config: str, max_lifetime_s: float
    ) -> ContainerRecord:
        import modal
        from modal import exception as modal_errors

        if not _NAME.match(name):
            raise ModalConfigError(f"sandbox name {name!r} must be 1-64 characters of [A-Za-z0-9._-]")
        try:
            existing = await self._find(name)
            if existing is not None:
                return await self._adopt(existing, name, owner_workflow_id)
            app = await self._get_app()
            settings = self._settings
            try:
                sandbox = await modal.Sandbox.create.aio(
                    *settings.command,
                    app=app,
                    name=name,
                    tags={
                        TAG_OWNER: owner_workflow_id,
                        TAG_JOB: str(job_id),
                        TAG_POOL: self._pool,
                        TAG_RUNNER: name,
                    },
                    image=self._get_image(),
                    # A Secret, not argv: the runner reads ACTIONS_RUNNER_INPUT_JITCONFIG and
                    # removes it from the environment its job steps see.
                    secrets=[modal.Secret.from_dict({"ACTIONS_RUNNER_INPUT_JITCONFIG": jit_config})],
                    timeout=max(60, int(max_lifetime_s)),
                    gpu=settings.gpu,
                    cpu=settings.cpu,
                    memory=settings.memory_mib,
                    region=settings.region,
                    cloud=settings.cloud,
                )
            except modal_errors.AlreadyExistsError:
                # Maybe ours: an earlier try created it and its answer was lost.
                adopted = await self._find(name)
                if adopted is None:
                    raise BackendError(f"sandbox {name} was reported existing but is gone; retry") from None
                return await self._adopt(adopted, name, owner_workflow_id)
            return await self._record(sandbox, name)
        except BackendError:
            raise
        except Exception as error:
            raise _map_error(error, f"create sandbox {name}") from None

    async def inspect(self, name: str) -> ContainerRecord | None:
        try:
            sandbox = await self._find(name) or await self._find(name, include_terminated=True)
            return None if sandbox is None else await self._record(sandbox, name)
        except Exception as error:
            raise _map_error(error, f"inspect sandbox {name}") from None

    async def wait(self, name: str, timeout_s: float) -> None:
        # Polled: a sandbox lookup per watcher costs Modal API calls either way, and Modal
        # sandboxes start in seconds, so a poll's latency matters less than for local runners.
        await asyncio.sleep(timeout_s)

    async def terminate(self, name: str) -> ContainerRecord | None:
        try:
            sandbox = await self._find(name)
            if sandbox is None:
                finished = await self._find(name, include_terminated=True)
                return None if finished is None else await self._record(finished, name)
            await sandbox.terminate.aio(wait=True)
            record = await self._record(sandbox, name)
        except Exception as error:
            raise _map_error(error, f"terminate sandbox {name}") from None
        if record.state is ContainerState.RUNNING:
            raise BackendError(f"sandbox {name} still running after terminate")
        return record

    async def list(self) -> list[ContainerRecord]:
        import modal

        try:
            app = await self._get_app()
            records = []
            async for sandbox in modal.Sandbox.list.aio(app_id=app.app_id, tags={TAG_POOL: self._pool}):
                records.append(await self._record(sandbox, ""))
            return records
        except Exception as error:
            raise _map_error(error, "list sandboxes") from None
