"""An in-memory fake of Modal's gRPC control plane that the real `modal` client can talk to.

Pinned to modal==1.6.4. The RPCs implemented here (`SandboxCreateV2`, `AuthTokenGet`,
`EnvironmentGetOrCreate`, ...) are Modal's internal API, not a public contract: they are renamed
and reshaped between client releases, so upgrading `modal` means re-checking this module against
the new client's `modal_proto` and `modal/sandbox/` sources.

`serve_fake_modal(tmp_path)` serves a `FakeModal` with grpclib on a unix socket and points the
process-wide modal client at it (`MODAL_SERVER_URL` plus dummy `ak-`/`as-` tokens), so tests and
benchmarks exercise the client's real argument handling, error mapping and retries offline.

Modelled, from Modal's docs and the 1.6.4 client:
- Sandbox names are unique per app among running sandboxes (ALREADY_EXISTS otherwise), and a
  name is released when its sandbox finishes.
- `list` returns running sandboxes whose tags include the filter, newest first, paged on
  `before_timestamp`; `from_name` finds only running sandboxes (unless `include_terminated`).
- Terminating a finished sandbox changes nothing. Results follow the client's mapping: exit code
  as given, TERMINATED (137 to the client), TIMEOUT (124) once `timeout` seconds have passed.
- A sandbox with a GPU goes through the V1 RPCs and gets a V1-shaped id (`sb-` + 22
  alphanumerics); the client picks the RPC family for later calls from the id's shape.

Assumptions that the real service has not confirmed:
- V1 and V2 sandboxes share one name space per app; the V2 name lookup sees only V2 sandboxes
  and the V1 lookup only V1 ones (which is why the client falls back from one to the other).
- The list page size (`list_page_size`), the error messages, and rejecting timeouts over 24 h
  at create (the documented maximum) are guesses.
- The server does not deduplicate retries by `x-idempotency-key`, except in the lost-response
  mode, which models exactly one executed attempt whose replies never arrive.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import secrets
import shutil
import string
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpclib.const
import modal.client
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from grpclib import GRPCError, Status
from grpclib.server import Server, Stream
from modal._utils.async_utils import synchronizer
from modal_proto import api_grpc, api_pb2

# The documented maximum Sandbox lifetime.
MAX_TIMEOUT_SECS = 24 * 3600
_ALNUM = string.ascii_letters + string.digits
# Unix socket paths must fit in sockaddr_un (108 bytes on Linux).
_MAX_SOCKET_PATH = 100

Rpc = Callable[[Any], Awaitable[Message]]


def _new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(22))


def _result(
    status: api_pb2.GenericResult.GenericStatus.ValueType, exitcode: int = 0, exception: str = ""
) -> api_pb2.GenericResult:
    return api_pb2.GenericResult(status=status, exitcode=exitcode, exception=exception)


@dataclass
class FakeSandbox:
    """One sandbox as the control plane knows it, with the arguments it was created with."""

    sandbox_id: str
    app_id: str
    version: int  # which RPC family created it: 1 (GPU) or 2
    name: str | None
    tags: dict[str, str]
    # Every variable the container would see from secrets (ids or inline) and `env=`.
    env: dict[str, str]
    secret_ids: list[str]
    entrypoint_args: list[str]
    image_id: str
    gpu: str | None  # as the client sent it: "A10G", "H100:2"
    cpu: float | None
    memory_mb: int | None
    timeout_secs: int
    regions: list[str]
    cloud: str | None
    definition: api_pb2.Sandbox  # as sent, for anything not lifted out above
    created_at: float
    task_id: str
    result: api_pb2.GenericResult | None = None  # set once finished
    finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.result is None

    @property
    def state(self) -> str:
        return "running" if self.running else "finished"

    @property
    def exit_code(self) -> int | None:
        """The code `Sandbox.returncode` reports for this sandbox."""
        if self.result is None:
            return None
        if self.result.status == api_pb2.GenericResult.GENERIC_STATUS_TIMEOUT:
            return 124
        if self.result.status == api_pb2.GenericResult.GENERIC_STATUS_TERMINATED:
            return 137
        return int(self.result.exitcode)


class FakeModal:
    """The control-plane state and the RPC handlers; serve it with `serve_fake_modal`.

    Test hooks must be called on the event loop the server runs on.
    """

    image_builder_version = "2025.06"
    list_page_size = 10

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()  # every attempt received, failed ones included
        self.unimplemented: Counter[str] = Counter()  # RPCs the client needed that this fake lacks
        self.apps: dict[tuple[str, str], str] = {}  # (environment, app name) -> app id
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.secrets: dict[str, dict[str, str]] = {}  # secret id -> contents
        self._named_secrets: dict[tuple[str, str], str] = {}
        self._failures: defaultdict[str, deque[tuple[Status, str]]] = defaultdict(deque)
        self._lose_next: Counter[str] = Counter()
        self._lost_attempts: set[tuple[str, str]] = set()
        self._last_created_at = 0.0
        # Let a test run something for each sandbox (e.g. a local process standing in for its
        # entrypoint) and stop it when the sandbox is terminated or times out.
        self.on_start: Callable[[FakeSandbox], None] | None = None
        self.on_settle: Callable[[FakeSandbox], None] | None = None
        self._rpcs: dict[str, Rpc] = {
            "AuthTokenGet": self._auth_token_get,
            "AppGetOrCreate": self._app_get_or_create,
            "EnvironmentGetOrCreate": self._environment_get_or_create,
            "ImageGetOrCreate": self._image_get_or_create,
            "SecretGetOrCreate": self._secret_get_or_create,
            "MountGetOrCreate": self._mount_get_or_create,
            "SandboxCreateV2": self._sandbox_create_v2,
            "SandboxCreate": self._sandbox_create_v1,
            "SandboxGetTaskIdV2": self._sandbox_get_task_id,
            "SandboxGetTaskId": self._sandbox_get_task_id,
            "SandboxWaitV2": self._sandbox_wait,
            "SandboxWait": self._sandbox_wait,
            "SandboxTerminateV2": self._sandbox_terminate,
            "SandboxTerminate": self._sandbox_terminate,
            "SandboxListV2": self._sandbox_list,
            "SandboxList": self._sandbox_list,
            "SandboxTagsSetV2": self._sandbox_tags_set,
            "SandboxTagsSet": self._sandbox_tags_set,
            "SandboxTagsGetV2": self._sandbox_tags_get,
            "SandboxTagsGet": self._sandbox_tags_get,
            "SandboxGetFromNameV2": functools.partial(self._sandbox_get_from_name, 2),
            "SandboxGetFromName": functools.partial(self._sandbox_get_from_name, 1),
        }

    # ----- test hooks -----

    def fail_next(self, rpc: str, status: Status, message: str = "injected", *, times: int = 1) -> None:
        """Fail the next `times` attempts of `rpc` with `status`, before any state changes."""
        self._failures[rpc].extend([(status, message)] * times)

    def lose_next_response(self, rpc: str = "SandboxCreateV2") -> None:
        """Execute the next call of `rpc` once, but answer it and all its retries with UNAVAILABLE."""
        self._lose_next[rpc] += 1

    def finish(self, sandbox_id: str, exit_code: int = 0) -> None:
        """Simulate the entrypoint exiting by itself with `exit_code`."""
        status = (
            api_pb2.GenericResult.GENERIC_STATUS_SUCCESS
            if exit_code == 0
            else api_pb2.GenericResult.GENERIC_STATUS_FAILURE
        )
        self._settle(self.sandboxes[sandbox_id], _result(status, exitcode=exit_code))

    def time_out(self, sandbox_id: str) -> None:
        """Simulate the sandbox reaching its `timeout` now."""
        timeout = api_pb2.GenericResult.GENERIC_STATUS_TIMEOUT
        self._settle(self.sandboxes[sandbox_id], _result(timeout, exception="Sandbox timed out"))

    def add_secret(self, name: str, env: dict[str, str], environment: str = "") -> str:
        """Create a named Secret that `modal.Secret.from_name(name)` resolves to."""
        secret_id = _new_id("st-")
        self.secrets[secret_id] = dict(env)
        self._named_secrets[(environment, name)] = secret_id
        return secret_id

    def running(self, app_id: str | None = None) -> list[FakeSandbox]:
        return [s for s in self.sandboxes.values() if s.running and app_id in (None, s.app_id)]

    def named(self, name: str, app_id: str | None = None) -> FakeSandbox | None:
        """The running sandbox called `name`, if any."""
        return next((s for s in self.running(app_id) if s.name == name), None)

    def close(self) -> None:
        for sandbox in self.sandboxes.values():
            if sandbox.expiry is not None:
                sandbox.expiry.cancel()

    # ----- serving -----

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        # The generated base class knows every RPC's path and message types; borrow its table
        # with a stand-in `self` whose attributes are the RPC names, then route them all here.
        class _Names:
            def __getattr__(self, rpc: str) -> str:
                return rpc

        table = api_grpc.ModalClientBase.__mapping__(cast(Any, _Names()))
        return {path: h._replace(func=self._handler(h.func)) for path, h in table.items()}

    def _handler(self, rpc: str) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        async def handle(stream: Stream[Any, Any]) -> None:
            self.calls[rpc] += 1
            impl = self._rpcs.get(rpc)
            if impl is None:
                self.unimplemented[rpc] += 1
                raise GRPCError(Status.UNIMPLEMENTED, f"FakeModal does not implement {rpc}")
            request = await stream.recv_message()
            if self._failures[rpc]:
                raise GRPCError(*self._failures[rpc].popleft())
            # Retries of one client call share an idempotency key.
            key = str(stream.metadata.get("x-idempotency-key", "")) if stream.metadata else ""
            attempt = (rpc, key)
            if key and attempt in self._lost_attempts:
                raise GRPCError(Status.UNAVAILABLE, "connection reset (response lost)")
            if rpc.endswith("V2") and not (stream.metadata and "x-modal-auth-token" in stream.metadata):
                raise GRPCError(Status.UNAUTHENTICATED, "missing x-modal-auth-token")
            reply = await impl(request)
            if self._lose_next[rpc]:
                self._lose_next[rpc] -= 1
                self._lost_attempts.add(attempt)
                raise GRPCError(Status.UNAVAILABLE, "connection reset (response lost)")
            await stream.send_message(reply)

        return handle

    # ----- RPCs -----

    async def _auth_token_get(self, req: api_pb2.AuthTokenGetRequest) -> api_pb2.AuthTokenGetResponse:
        # The client reads `exp` from the payload and never checks the signature.
        payload = json.dumps({"exp": int(time.time()) + 3600}).encode()
        body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
        return api_pb2.AuthTokenGetResponse(token=f"eyJhbGciOiJub25lIn0.{body}.fake")

    async def _app_get_or_create(self, req: api_pb2.AppGetOrCreateRequest) -> api_pb2.AppGetOrCreateResponse:
        if req.app_name in self.apps.values():  # a lookup by app id
            return api_pb2.AppGetOrCreateResponse(app_id=req.app_name)
        key = (req.environment_name, req.app_name)
        if key not in self.apps:
            if req.object_creation_type != api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"App '{req.app_name}' not found")
            self.apps[key] = _new_id("ap-")
        return api_pb2.AppGetOrCreateResponse(app_id=self.apps[key])

    async def _environment_get_or_create(
        self, req: api_pb2.EnvironmentGetOrCreateRequest
    ) -> api_pb2.EnvironmentGetOrCreateResponse:
        settings = api_pb2.EnvironmentSettings(image_builder_version=self.image_builder_version)
        metadata = api_pb2.EnvironmentMetadata(name=req.deployment_name or "main", settings=settings)
        return api_pb2.EnvironmentGetOrCreateResponse(environment_id="en-fake", metadata=metadata)

    async def _image_get_or_create(
        self, req: api_pb2.ImageGetOrCreateRequest
    ) -> api_pb2.ImageGetOrCreateResponse:
        # An already-built result makes the client skip the build log stream.
        success = _result(api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
        return api_pb2.ImageGetOrCreateResponse(image_id=_new_id("im-"), result=success)

    async def _mount_get_or_create(
        self, req: api_pb2.MountGetOrCreateRequest
    ) -> api_pb2.MountGetOrCreateResponse:
        # Only named mounts, e.g. the Python build that `add_python=` layers in; file uploads are not faked.
        return api_pb2.MountGetOrCreateResponse(mount_id=_new_id("mo-"))

    async def _secret_get_or_create(
        self, req: api_pb2.SecretGetOrCreateRequest
    ) -> api_pb2.SecretGetOrCreateResponse:
        if not req.deployment_name:  # Secret.from_dict and friends
            secret_id = _new_id("st-")
            self.secrets[secret_id] = dict(req.env_dict)
        elif (secret_id := self._named_secrets.get((req.environment_name, req.deployment_name), "")) == "":
            raise GRPCError(Status.NOT_FOUND, f"Secret '{req.deployment_name}' not found")
        return api_pb2.SecretGetOrCreateResponse(secret_id=secret_id)

    async def _sandbox_create_v2(
        self, req: api_pb2.SandboxCreateV2Request
    ) -> api_pb2.SandboxCreateV2Response:
        env: dict[str, str] = {}
        for source in req.secret_sources:
            env |= self._secret(source.secret_id) if source.secret_id else dict(source.env.contents)
        sandbox = self._create(2, req, env)
        return api_pb2.SandboxCreateV2Response(
            sandbox_id=sandbox.sandbox_id,
            task_id=sandbox.task_id,
            metadata=api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id),
        )

    async def _sandbox_create_v1(self, req: api_pb2.SandboxCreateRequest) -> api_pb2.SandboxCreateResponse:
        sandbox = self._create(1, req, {})
        return api_pb2.SandboxCreateResponse(
            sandbox_id=sandbox.sandbox_id, metadata=api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id)
        )

    async def _sandbox_get_task_id(
        self, req: api_pb2.SandboxGetTaskIdRequest
    ) -> api_pb2.SandboxGetTaskIdResponse:
        sandbox = self._get(req.sandbox_id)
        return api_pb2.SandboxGetTaskIdResponse(task_id=sandbox.task_id, task_result=sandbox.result)

    async def _sandbox_wait(self, req: api_pb2.SandboxWaitRequest) -> api_pb2.SandboxWaitResponse:
        sandbox = self._get(req.sandbox_id)
        if sandbox.running and req.timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sandbox.finished.wait(), req.timeout)
        return api_pb2.SandboxWaitResponse(result=sandbox.result, metadata=self._metadata(sandbox))

    async def _sandbox_terminate(
        self, req: api_pb2.SandboxTerminateRequest
    ) -> api_pb2.SandboxTerminateResponse:
        sandbox = self._get(req.sandbox_id)
        if not sandbox.running:
            return api_pb2.SandboxTerminateResponse(existing_result=sandbox.result)
        terminated = api_pb2.GenericResult.GENERIC_STATUS_TERMINATED
        self._settle(sandbox, _result(terminated, exception="Sandbox terminated"))
        return api_pb2.SandboxTerminateResponse()

    async def _sandbox_list(self, req: api_pb2.SandboxListRequest) -> api_pb2.SandboxListResponse:
        wanted = {t.tag_name: t.tag_value for t in req.tags}
        matches = sorted(
            (
                s
                for s in self.sandboxes.values()
                if (s.running or req.include_finished)
                and req.app_id in ("", s.app_id)
                and (not req.before_timestamp or s.created_at < req.before_timestamp)
                and wanted.items() <= s.tags.items()
            ),
            key=lambda s: s.created_at,
            reverse=True,
        )
        return api_pb2.SandboxListResponse(sandboxes=[self._info(s) for s in matches[: self.list_page_size]])

    async def _sandbox_tags_set(self, req: api_pb2.SandboxTagsSetRequest) -> empty_pb2.Empty:
        self._get(req.sandbox_id).tags = {t.tag_name: t.tag_value for t in req.tags}
        return empty_pb2.Empty()

    async def _sandbox_tags_get(self, req: api_pb2.SandboxTagsGetRequest) -> api_pb2.SandboxTagsGetResponse:
        return api_pb2.SandboxTagsGetResponse(tags=self._tags(self._get(req.sandbox_id)))

    async def _sandbox_get_from_name(
        self, version: int, req: api_pb2.SandboxGetFromNameRequest
    ) -> api_pb2.SandboxGetFromNameResponse:
        app_id = self.apps.get((req.environment_name, req.app_name))
        candidates = sorted(
            (
                s
                for s in self.sandboxes.values()
                if s.app_id == app_id and s.name == req.sandbox_name and s.version == version
            ),
            key=lambda s: (s.running, s.created_at),
        )
        if not candidates or not (candidates[-1].running or req.include_terminated):
            raise GRPCError(Status.NOT_FOUND, f"Sandbox with name '{req.sandbox_name}' not found")
        sandbox = candidates[-1]
        return api_pb2.SandboxGetFromNameResponse(
            sandbox_id=sandbox.sandbox_id, metadata=self._metadata(sandbox)
        )

    # ----- helpers -----

    def _create(
        self,
        version: int,
        req: api_pb2.SandboxCreateRequest | api_pb2.SandboxCreateV2Request,
        env: dict[str, str],
    ) -> FakeSandbox:
        if req.app_id not in self.apps.values():
            raise GRPCError(Status.NOT_FOUND, f"App {req.app_id} not found")
        d = req.definition
        if not 0 < d.timeout_secs <= MAX_TIMEOUT_SECS:
            raise GRPCError(Status.INVALID_ARGUMENT, f"timeout must be between 1 and {MAX_TIMEOUT_SECS} s")
        name = d.name or None
        if name is not None and self.named(name, req.app_id) is not None:
            raise GRPCError(Status.ALREADY_EXISTS, f"Sandbox name '{name}' is already in use in this app")
        resolved: dict[str, str] = {}
        for secret_id in d.secret_ids:
            resolved |= self._secret(secret_id)
        gpu = d.resources.gpu_config
        created_at = max(time.time(), self._last_created_at + 1e-6)  # list pages on strict order
        self._last_created_at = created_at
        sandbox = FakeSandbox(
            sandbox_id=_new_id("sb-") if version == 1 else _new_id("sb-v2-"),
            app_id=req.app_id,
            version=version,
            name=name,
            tags={t.tag_name: t.tag_value for t in req.tags},
            env=resolved | env,
            secret_ids=list(d.secret_ids),
            entrypoint_args=list(d.entrypoint_args),
            image_id=d.image_id,
            gpu=(f"{gpu.gpu_type}:{gpu.count}" if gpu.count > 1 else gpu.gpu_type) or None,
            cpu=d.resources.milli_cpu / 1000 or None,
            memory_mb=d.resources.memory_mb or None,
            timeout_secs=d.timeout_secs,
            regions=list(d.scheduler_placement.regions),
            cloud=d.cloud_provider_str or None,
            definition=d,
            created_at=created_at,
            task_id=_new_id("ta-"),
        )
        sandbox.expiry = asyncio.get_running_loop().call_later(
            d.timeout_secs, self.time_out, sandbox.sandbox_id
        )
        self.sandboxes[sandbox.sandbox_id] = sandbox
        if self.on_start is not None:
            self.on_start(sandbox)
        return sandbox

    def _settle(self, sandbox: FakeSandbox, result: api_pb2.GenericResult) -> None:
        if not sandbox.running:
            return
        sandbox.result = result
        sandbox.finished.set()
        if sandbox.expiry is not None:
            sandbox.expiry.cancel()
        if self.on_settle is not None:
            self.on_settle(sandbox)

    def _get(self, sandbox_id: str) -> FakeSandbox:
        if sandbox_id not in self.sandboxes:
            raise GRPCError(Status.NOT_FOUND, f"Sandbox {sandbox_id} not found")
        return self.sandboxes[sandbox_id]

    def _secret(self, secret_id: str) -> dict[str, str]:
        if secret_id not in self.secrets:
            raise GRPCError(Status.NOT_FOUND, f"Secret {secret_id} not found")
        return self.secrets[secret_id]

    @staticmethod
    def _tags(sandbox: FakeSandbox) -> list[api_pb2.SandboxTag]:
        return [api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sandbox.tags.items()]

    @staticmethod
    def _metadata(sandbox: FakeSandbox) -> api_pb2.SandboxHandleMetadata:
        return api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id, result=sandbox.result)

    def _info(self, sandbox: FakeSandbox) -> api_pb2.SandboxInfo:
        return api_pb2.SandboxInfo(
            id=sandbox.sandbox_id,
            created_at=sandbox.created_at,
            app_id=sandbox.app_id,
            name=sandbox.name or "",
            tags=self._tags(sandbox),
            image_id=sandbox.image_id,
            timeout_secs=sandbox.timeout_secs,
            task_info=api_pb2.TaskInfo(
                id=sandbox.task_id, sandbox_id=sandbox.sandbox_id, result=sandbox.result
            ),
            metadata=self._metadata(sandbox),
        )


async def reset_modal_client() -> None:
    """Drop and close the process-wide client that `modal.Client.from_env()` caches.

    The cached client keeps its channel to whatever server it first met, so each fake server
    needs a fresh one.
    """
    client = modal.client._Client._client_from_env
    modal.client._Client._set_env_client(None)
    if client is not None:
        # The raw client lives on modal's own event loop thread; close it through the wrapper.
        await synchronizer._translate_out(client).close.aio()  # type: ignore[no-untyped-call]


@contextlib.asynccontextmanager
async def serve_fake_modal(tmp_path: Path) -> AsyncIterator[FakeModal]:
    """Serve a fresh `FakeModal` and point the `modal` client at it for the duration."""
    fake = FakeModal()
    short_dir = None
    socket_path = tmp_path / "modal.sock"
    if len(str(socket_path)) > _MAX_SOCKET_PATH:
        short_dir = tempfile.mkdtemp(prefix="fake-modal-")
        socket_path = Path(short_dir) / "modal.sock"
    env = {
        "MODAL_SERVER_URL": f"unix://{socket_path}",
        "MODAL_TOKEN_ID": "ak-fake",
        "MODAL_TOKEN_SECRET": "as-fake",
        # The default in 1.6.4; pinned so an outer environment cannot switch the RPC family.
        "MODAL_SANDBOX_V2": "1",
    }
    saved = {key: os.environ.get(key) for key in env}
    server = Server([fake])
    await server.start(path=str(socket_path))
    try:
        await reset_modal_client()
        os.environ.update(env)
        yield fake
    finally:
        await reset_modal_client()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        fake.close()
        server.close()
        await server.wait_closed()
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)
