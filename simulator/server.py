"""HTTP face of the GitHub simulator: GitHub's REST shapes, the /_sim admin API, the agent
protocol used by ``simulator.runner``, and the embedding of uvicorn in a running loop."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import secrets
import socket
import string
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import uvicorn
from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from simulator import jitconfig
from simulator.faults import FaultConfig
from simulator.state import (
    DEFAULT_GROUP_ID,
    DEFAULT_GROUP_NAME,
    ApiError,
    AppAuth,
    Conclusion,
    JobStatus,
    JobView,
    RunnerView,
    SimState,
    WorkflowJobEvent,
    WorkflowJobView,
)
from simulator.webhooks import DeliveryRecord, WebhookSender

_DOCS_RUNNERS = "https://docs.github.com/rest/actions/self-hosted-runners"
_DOCS_AUTH = "https://docs.github.com/rest"
_DOCS_APP_TOKEN = "https://docs.github.com/rest/apps/apps#create-an-installation-access-token-for-an-app"
ACCESS_TOKENS_ROUTE = "POST /app/installations/{installation_id}/access_tokens"
_DOCS_SECONDARY = (
    "https://docs.github.com/rest/using-the-rest-api/rate-limits-for-the-rest-api#about-secondary-rate-limits"
)
_RATE_LIMIT = 5000
_RATE_WINDOW_S = 3600
AGENT_SESSION_HEADER = "X-Sim-Runner-Session"

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[Request], Awaitable[Response]]
CallKind = Literal["read", "mutate", "register"]


# ---------------------------------------------------------------------------------------------
# Request / response bodies.
# ---------------------------------------------------------------------------------------------


class JitConfigRequest(BaseModel):
    # Everything optional so missing keys produce GitHub's own 422 wording, not pydantic's.
    name: str | None = None
    runner_group_id: int | None = None
    labels: list[str] | None = None
    work_folder: str = "_work"


class JitConfigResponse(BaseModel):
    runner: RunnerView
    encoded_jit_config: str


class TokenResponse(BaseModel):
    token: str
    expires_at: datetime


class InstallationTokenResponse(BaseModel):
    token: str
    expires_at: str  # GitHub's exact form, "2016-07-11T22:14:10Z"
    permissions: dict[str, str]
    repository_selection: Literal["all", "selected"]


class RunnerList(BaseModel):
    total_count: int
    runners: list[RunnerView]


class RunnerGroupView(BaseModel):
    id: int
    name: str
    visibility: str
    default: bool
    inherited: bool
    allows_public_repositories: bool
    restricted_to_workflows: bool
    selected_workflows: list[str]
    runners_url: str


class RunnerGroupList(BaseModel):
    total_count: int
    runner_groups: list[RunnerGroupView]


class WorkflowRunView(BaseModel):
    id: int
    name: str
    run_attempt: int
    status: JobStatus
    conclusion: Conclusion | None
    head_branch: str
    head_sha: str
    created_at: datetime
    updated_at: datetime
    url: str
    html_url: str
    jobs_url: str


class WorkflowRunList(BaseModel):
    total_count: int
    workflow_runs: list[WorkflowRunView]


class WorkflowJobList(BaseModel):
    total_count: int
    jobs: list[WorkflowJobView]


class RateResource(BaseModel):
    limit: int
    remaining: int
    reset: int
    used: int
    resource: str


class RateLimitResponse(BaseModel):
    resources: dict[str, RateResource]
    rate: RateResource


class QueueJobsRequest(BaseModel):
    labels: list[str] = Field(min_length=1)
    duration_s: float = Field(default=1.0, ge=0.0)
    count: int = Field(default=1, ge=1, le=1000)
    name: str = "build"
    # All `count` jobs in one run, as a matrix is.
    matrix: bool = False
    needs_approval: bool = False
    # None: the default repository.
    repo: str | None = None


class QueueJobsResponse(BaseModel):
    job_ids: list[int]


class AgentConnectRequest(BaseModel):
    jitconfig: str


class AgentConnectResponse(BaseModel):
    runner_id: int
    runner_name: str
    session_id: str
    poll_wait_s: float
    heartbeat_interval_s: float


class AgentJob(BaseModel):
    job_id: int
    duration_s: float


class AgentCompleteRequest(BaseModel):
    job_id: int
    conclusion: Conclusion = "success"


class WebhookTarget(BaseModel):
    url: str | None


class SimStats(BaseModel):
    calls: dict[str, int]
    status_codes: dict[str, int]
    jobs: dict[str, int]
    runners: dict[str, int]
    deliveries: dict[str, int]


# ---------------------------------------------------------------------------------------------
# uvicorn embedding.
# ---------------------------------------------------------------------------------------------


class _EmbeddedUvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The host process (pytest, a demo) owns SIGINT/SIGTERM; an embedded server must not
        # swallow them.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


class BackgroundServer:
    """Serves an ASGI app with uvicorn as a task of the current event loop."""

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("server already started")
        # Binding here rather than inside uvicorn turns "port in use" into an ordinary OSError
        # (uvicorn would sys.exit() inside the task, which tears down the whole event loop).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.requested_port))
        except OSError:
            sock.close()
            raise
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=1,
        )
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="sim-uvicorn")
        ready = asyncio.create_task(self._server.ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            self._task.result()  # re-raises the startup failure
            raise RuntimeError("uvicorn exited during startup")
        # Discover the port from the listening socket, as port 0 means "kernel picks".
        listening = self._server.servers[0].sockets[0]
        self.port = int(listening.getsockname()[1])

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
        self._server = None


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------


def _error(status: int, message: str, documentation_url: str = _DOCS_RUNNERS) -> JSONResponse:
    return JSONResponse(
        {"message": message, "documentation_url": documentation_url, "status": str(status)},
        status_code=status,
    )


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), status_code=status, headers=headers)


async def _parse(request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            raise ApiError(400, "Problems parsing JSON") from exc
        raise ApiError(422, f"Invalid request.\n\n{exc.errors(include_url=False)}") from exc


def _int_query(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ApiError(422, f"Invalid value for parameter {name!r}") from exc
    return max(low, min(high, value))


def _paginate(request: Request, items: list[M]) -> tuple[list[M], dict[str, str]]:
    per_page = _int_query(request, "per_page", 30, 1, 100)
    page = _int_query(request, "page", 1, 1, 1_000_000)
    last = max(1, math.ceil(len(items) / per_page))
    chunk = items[(page - 1) * per_page : page * per_page]
    links: list[str] = []

    def link(target: int, rel: str) -> str:
        return f'<{request.url.include_query_params(per_page=per_page, page=target)}>; rel="{rel}"'

    if page > 1:
        links += [link(page - 1, "prev"), link(1, "first")]
    if page < last:
        links += [link(page + 1, "next"), link(last, "last")]
    return chunk, ({"Link": ", ".join(links)} if links else {})


def _registration_token() -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "A" + "".join(secrets.choice(alphabet) for _ in range(28))


# ---------------------------------------------------------------------------------------------
# The simulator.
# ---------------------------------------------------------------------------------------------


class GitHubSimulator:
    """A fake GitHub (REST + workflow_job webhooks + job scheduler) on a real HTTP port.

    All python-level methods must be called from the event loop the simulator runs in.

    The organization `owner` owns the repositories `repos` (default: just `repo`); `repo` must
    be one of them and is where jobs go when the caller names none. Runners are the
    organization's: any of them may take a job of any of its repositories.
    """

    def __init__(
        self,
        *,
        owner: str = "acme",
        repo: str = "widgets",
        repos: Sequence[str] | None = None,
        token: str = "sim-token",
        webhook_url: str | None = None,
        webhook_secret: str = "sim-secret",
        faults: FaultConfig | None = None,
        agent_timeout_s: float = 10.0,
        first_job_id: int = 1000,
        app_id: int | None = None,
        app_public_key_pem: str | None = None,
        installation_id: int = 1,
        installation_token_ttl_s: float = 3600,
        extra_runner_group_ids: Sequence[int] = (),
    ) -> None:
        if (app_id is None) != (app_public_key_pem is None):
            raise ValueError("app_id and app_public_key_pem go together: give both or neither")
        self.owner = owner
        self.token = token
        self.webhook_secret = webhook_secret
        self.agent_timeout_s = agent_timeout_s
        self.calls: Counter[str] = Counter()
        self.status_codes: Counter[int] = Counter()
        # Replaced on every change: waiters grab the current event and are woken by set().
        # Works from synchronous state code, where an asyncio.Condition could not be notified.
        self._changed = asyncio.Event()
        self._closing = False
        self._server: BackgroundServer | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._rate_reset = int(time.time()) + _RATE_WINDOW_S
        self._rate_used = 0
        self._rate_exhausted_until = 0.0
        self.state = SimState(
            owner=owner,
            repo=repo,
            agent_timeout_s=agent_timeout_s,
            first_job_id=first_job_id,
            repos=repos,
            installation_id=installation_id if app_id is not None else None,
            on_job_event=self._on_job_event,
            on_change=self._notify,
        )
        # The repository's own hook when there is one repository; one hook cannot cover several
        # repositories unless it is the organization's.
        org_hook = len(self.state.repository_names()) > 1
        self._webhooks = WebhookSender(
            secret=webhook_secret,
            hook_id=400_000 + secrets.randbelow(100_000),
            target_type="organization" if org_hook else "repository",
            target_id=self.state.organization_id if org_hook else self.state.repository_id,
            on_change=self._notify,
        )
        self._webhooks.url = webhook_url
        # With an App, the static token keeps working too, as a PAT would next to an App.
        self._app_auth: AppAuth | None = None
        if app_id is not None and app_public_key_pem is not None:
            self._app_auth = AppAuth(
                app_id=app_id,
                public_key_pem=app_public_key_pem,
                installation_id=installation_id,
                token_ttl_s=installation_token_ttl_s,
            )
        # Runner groups an organization created besides the default one.
        self._runner_group_ids = {DEFAULT_GROUP_ID, *extra_runner_group_ids}
        self._runner_groups: dict[str, int] = {}
        self.set_faults(faults or FaultConfig())
        self.app = self._build_app()

    # ----------------------------------------------------------------- lifecycle

    @property
    def repo(self) -> str:
        """The default repository: where jobs go when the caller names none."""
        return self.state.repo

    @property
    def repos(self) -> list[str]:
        """All the organization's repositories."""
        return self.state.repository_names()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("simulator not started")
        return self._server.url

    @property
    def webhook_url(self) -> str | None:
        return self._webhooks.url

    @webhook_url.setter
    def webhook_url(self, value: str | None) -> None:
        self._webhooks.url = value

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._server is not None:
            raise RuntimeError("simulator already started")
        server = BackgroundServer(self.app, host=host, port=port)
        await server.start()
        self._server = server
        self._closing = False
        self.state.api_base_url = server.url
        await self._webhooks.start()
        self._reaper = asyncio.create_task(self._reap_forever(), name="sim-agent-reaper")

    async def stop(self) -> None:
        # Wake long-polling agents first so uvicorn's graceful shutdown is not held up by them.
        self._closing = True
        self._notify()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        if self._server is not None:
            await self._server.stop()
            self._server = None
        await self._webhooks.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ----------------------------------------------------------------- python API

    @property
    def faults(self) -> FaultConfig:
        return self._faults

    def set_faults(self, faults: FaultConfig) -> None:
        self._faults = faults
        self._rng = faults.api_rng()
        self._webhooks.set_faults(faults)

    def queue_job(
        self,
        labels: list[str],
        duration_s: float = 1.0,
        *,
        name: str = "build",
        run_id: int | None = None,
        needs_approval: bool = False,
        repo: str | None = None,
    ) -> int:
        """Queue a job in `repo` (default: the default repository); ValueError for a repository
        the organization does not have."""
        return self.state.queue_job(
            labels, duration_s, name=name, run_id=run_id, needs_approval=needs_approval, repo=repo
        )

    def queue_run(
        self,
        labels: list[str],
        count: int,
        duration_s: float = 1.0,
        *,
        needs_approval: bool = False,
        repo: str | None = None,
    ) -> list[int]:
        """A matrix: `count` jobs in one workflow run of `repo` (default: the default repository)."""
        self.state.repository(repo)  # refuse an unknown repository before spending a run id
        run_id = self.state.new_run_id()
        return [
            self.queue_job(
                labels,
                duration_s,
                name=f"build ({index})",
                run_id=run_id,
                needs_approval=needs_approval,
                repo=repo,
            )
            for index in range(count)
        ]

    def approve_job(self, job_id: int) -> None:
        """Approve a job held in `waiting`. Raises ``ApiError`` (404 unknown, 409 not waiting)."""
        self.state.approve_job(job_id)

    def exhaust_rate_limit(self, reset_in_s: float) -> None:
        """Spend the primary rate limit: every API call answers 403 until the reset, `reset_in_s` away."""
        self._rate_exhausted_until = time.time() + reset_in_s
        self._rate_reset = int(self._rate_exhausted_until) + 1

    def cancel_job(self, job_id: int) -> None:
        """Cancel a job. Raises ``ApiError`` (404 unknown, 409 already completed)."""
        self.state.cancel_job(job_id)

    def jobs(self) -> list[JobView]:
        return self.state.job_views()

    def job(self, job_id: int) -> JobView:
        return self.state.job_view(job_id)

    def runners(self) -> list[RunnerView]:
        return self.state.runner_views()

    def runner_group_of(self, runner_name: str) -> int | None:
        """The runner group a JIT runner was registered into, by name."""
        return self._runner_groups.get(runner_name)

    def connected_runners(self) -> list[str]:
        """Names of the runners whose listener connected, in order: a JIT config is used once."""
        return list(self.state.connected_names)

    def runner_lifetimes(self) -> dict[str, float]:
        """Seconds from registration to removal of every runner removed so far, by name."""
        return dict(self.state.runner_lifetimes)

    def revoke_installation_tokens(self) -> None:
        """Invalidate every installation token issued so far, as uninstalling and reinstalling
        the App or a credential rotation would; the next use of one gets 401."""
        if self._app_auth is None:
            raise RuntimeError("the simulator was created without a GitHub App (app_id)")
        self._app_auth.revoke_all()

    @property
    def token_exchanges(self) -> int:
        """Installation tokens issued (successful ``POST .../access_tokens`` calls)."""
        return self.calls[f"{ACCESS_TOKENS_ROUTE} 201"]

    def deliveries(self) -> list[DeliveryRecord]:
        return self._webhooks.records()

    def redeliver(self, delivery_id: str) -> None:
        """Send a recorded delivery again with the same GUID, as GitHub's "Redeliver" does."""
        self._webhooks.redeliver(delivery_id)

    def ping(self) -> str:
        """Queue a ``ping`` delivery (GitHub sends one when a hook is created)."""
        now = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        hook_id = self._webhooks.hook_id
        org_hook = self._webhooks.target_type == "organization"
        payload: dict[str, Any] = {
            "zen": "Design for failure.",
            "hook_id": hook_id,
            "hook": {
                "type": "Organization" if org_hook else "Repository",
                "id": hook_id,
                "name": "web",
                "active": True,
                "events": ["workflow_job"],
                "config": {"content_type": "json", "insecure_ssl": "0", "url": self.webhook_url or ""},
                "created_at": now,
                "updated_at": now,
            },
            "organization": self.state.organization_view().model_dump(mode="json"),
            "sender": {"login": "sim-user", "id": 1, "type": "User"},
        }
        # An organization's hook belongs to no repository, so its ping names none.
        if not org_hook:
            payload["repository"] = self.state.repository_view().model_dump(mode="json")
        return self._webhooks.enqueue("ping", payload, action=None, job_id=None)

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float,  # noqa: ASYNC109 - a bounded wait is the point of this API
        *,
        description: str | None = None,
    ) -> None:
        """Wait until ``predicate()`` holds, re-checking it after every state change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            changed = self._changed
            remaining = deadline - loop.time()
            if remaining <= 0:
                what = description or getattr(predicate, "__qualname__", repr(predicate))
                raise TimeoutError(
                    f"simulator condition {what!r} not met within {timeout}s; {self._summary()}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    def stats(self) -> SimStats:
        jobs = Counter(j.status for j in self.state.job_views())
        runners: Counter[str] = Counter()
        for runner in self.state.runner_views():
            runners[runner.status] += 1
            runners["busy" if runner.busy else "idle"] += 1
        return SimStats(
            calls=dict(self.calls),
            status_codes={str(code): n for code, n in self.status_codes.items()},
            jobs=dict(jobs),
            runners=dict(runners),
            deliveries=dict(Counter(d.state for d in self.deliveries())),
        )

    # ----------------------------------------------------------------- internals

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _summary(self) -> str:
        jobs = ", ".join(f"{j.id}:{j.status}/{j.conclusion}@{j.runner_name}" for j in self.jobs())
        runners = ", ".join(
            f"{r.id}:{r.name}:{r.status}{':busy' if r.busy else ''}" for r in self.state.runner_views()
        )
        hooks = ", ".join(f"{d.action or d.event}#{d.job_id}:{d.state}" for d in self.deliveries())
        return f"jobs=[{jobs}] runners=[{runners}] deliveries=[{hooks}]"

    def _on_job_event(self, event: WorkflowJobEvent) -> None:
        payload = event.model_dump(mode="json")
        if event.installation is None:
            # GitHub leaves the key out rather than sending null.
            del payload["installation"]
        self._webhooks.enqueue(
            "workflow_job",
            payload,
            action=event.action,
            job_id=event.workflow_job.id,
        )

    async def _reap_forever(self) -> None:
        interval = min(1.0, max(0.05, self.agent_timeout_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.state.reap()

    def _rate_exhausted(self) -> bool:
        return time.time() < self._rate_exhausted_until

    def _rate_headers(self) -> dict[str, str]:
        now = int(time.time())
        if now >= self._rate_reset:
            self._rate_reset = now + _RATE_WINDOW_S
            self._rate_used = 0
        remaining = 0 if self._rate_exhausted() else max(0, _RATE_LIMIT - self._rate_used)
        return {
            "x-ratelimit-limit": str(_RATE_LIMIT),
            "x-ratelimit-remaining": str(remaining),
            "x-ratelimit-used": str(self._rate_used),
            "x-ratelimit-reset": str(self._rate_reset),
            "x-ratelimit-resource": "core",
            "x-github-request-id": uuid.uuid4().hex[:20].upper(),
            "x-github-api-version-selected": "2022-11-28",
        }

    def _authorized(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() not in ("bearer", "token"):
            return False
        if hmac.compare_digest(value.strip().encode(), self.token.encode()):
            return True
        return self._app_auth is not None and self._app_auth.token_valid(value.strip())

    def _in_scope(self, request: Request) -> bool:
        params = request.path_params
        # GitHub owner and repository names are case-insensitive.
        if "org" in params:
            return str(params["org"]).casefold() == self.owner.casefold()
        if "owner" in params:
            return str(params["owner"]).casefold() == self.owner.casefold() and self.state.has_repository(
                str(params["repo"])
            )
        return True

    def _github_route(
        self,
        method: str,
        template: str,
        handler: Handler,
        kind: CallKind = "read",
        *,
        counted: bool = True,
        app_jwt: bool = False,
    ) -> Route:
        call = f"{method} {template}"

        async def endpoint(request: Request) -> Response:
            response = await self._github_call(request, handler, kind, counted=counted, app_jwt=app_jwt)
            if counted:
                self.calls[call] += 1
                self.calls[f"{call} {response.status_code}"] += 1
                self.status_codes[response.status_code] += 1
            response.headers.update(self._rate_headers())
            return response

        # Starlette needs the ":int" converter to keep "/runners/{id}" off "/runners/remove-token".
        path = template.replace("{runner_id}", "{runner_id:int}").replace("{job_id}", "{job_id:int}")
        path = path.replace("{run_id}", "{run_id:int}").replace("{installation_id}", "{installation_id:int}")
        return Route(path, endpoint, methods=[method])

    async def _github_call(
        self, request: Request, handler: Handler, kind: CallKind, *, counted: bool, app_jwt: bool = False
    ) -> Response:
        if app_jwt:
            # /app endpoints take the App's JWT and nothing else, not even a valid token.
            assert self._app_auth is not None  # such routes exist only with an App
            try:
                self._app_auth.verify_jwt(request.headers.get("authorization", ""))
            except ApiError as exc:
                return _error(exc.status, exc.message, _DOCS_APP_TOKEN)
        elif not self._authorized(request):
            return _error(401, "Bad credentials", _DOCS_AUTH)
        if not self._in_scope(request):
            return _error(404, "Not Found")
        if counted:
            self._rate_used += 1
        if counted and self._rate_exhausted():
            return _error(
                403,
                "API rate limit exceeded for installation. Please wait for the rate limit to reset.",
                "https://docs.github.com/rest/using-the-rest-api/rate-limits-for-the-rest-api",
            )
        # Snapshot: one request sees one fault config even if a test swaps it mid-request.
        faults, rng = self._faults, self._rng
        if counted and rng.random() < faults.rate_limit_rate:
            limited = _error(
                429,
                "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
                _DOCS_SECONDARY,
            )
            limited.headers["retry-after"] = str(faults.retry_after_seconds)
            return limited
        if kind == "register" and rng.random() < faults.registration_502_rate:
            return _error(502, "Server Error")
        if counted and rng.random() < faults.slow_rate:
            await asyncio.sleep(faults.slow_seconds)
        try:
            response = await handler(request)
        except ApiError as exc:
            return _error(exc.status, exc.message)
        if kind != "read" and response.status_code < 300 and rng.random() < faults.lost_response_rate:
            # The work is done and stays done; only the answer is lost.
            return _error(502, "Server Error")
        return response

    # ----------------------------------------------------------------- GitHub REST handlers

    async def _h_token(self, request: Request) -> Response:
        expires = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
        return _json(TokenResponse(token=_registration_token(), expires_at=expires), 201)

    async def _h_installation_token(self, request: Request) -> Response:
        assert self._app_auth is not None  # the route exists only with an App
        token, expires = self._app_auth.issue(int(request.path_params["installation_id"]))
        body = InstallationTokenResponse(
            token=token,
            expires_at=expires.isoformat().replace("+00:00", "Z"),
            # What a runner-managing App holds; the simulator grants every call regardless.
            permissions={
                "actions": "read",
                "administration": "write",
                "metadata": "read",
                "organization_self_hosted_runners": "write",
            },
            repository_selection="selected",
        )
        return _json(body, 201)

    async def _h_jit(self, request: Request) -> Response:
        if self._faults.jit_error_status is not None:
            raise ApiError(self._faults.jit_error_status, "Resource not accessible by integration")
        body = await _parse(request, JitConfigRequest)
        for key in ("name", "runner_group_id", "labels"):
            if getattr(body, key) is None:
                raise ApiError(422, f"Invalid input: object is missing required key: {key}")
        assert body.name is not None and body.labels is not None  # narrowed by the loop above
        if not body.name.strip():
            raise ApiError(422, "Invalid input: name must not be empty")
        if not 1 <= len(body.labels) <= 100:
            raise ApiError(422, "Invalid input: labels must contain between 1 and 100 items")
        if body.runner_group_id not in self._runner_group_ids:
            raise ApiError(404, "Not Found")
        runner, view = self.state.create_jit_runner(body.name, body.labels)
        self._runner_groups[runner.name] = body.runner_group_id
        server_url = self.url if self._server is not None else str(request.base_url).rstrip("/")
        encoded = jitconfig.encode(
            jitconfig.JitConfig(
                agent_id=runner.id,
                agent_name=runner.name,
                server_url=server_url,
                secret=runner.secret,
                work_folder=body.work_folder,
            )
        )
        return _json(JitConfigResponse(runner=view, encoded_jit_config=encoded), 201)

    async def _h_list_runners(self, request: Request) -> Response:
        matching = self.state.runner_views(request.query_params.get("name"))
        page, headers = _paginate(request, matching)
        return _json(RunnerList(total_count=len(matching), runners=page), headers=headers)

    async def _h_get_runner(self, request: Request) -> Response:
        return _json(self.state.runner_view(int(request.path_params["runner_id"])))

    async def _h_delete_runner(self, request: Request) -> Response:
        if self._faults.deregister_error_status is not None:
            raise ApiError(self._faults.deregister_error_status, "Bad credentials")
        self.state.delete_runner(int(request.path_params["runner_id"]))
        return Response(status_code=204)

    async def _h_runner_groups(self, request: Request) -> Response:
        group = RunnerGroupView(
            id=DEFAULT_GROUP_ID,
            name=DEFAULT_GROUP_NAME,
            visibility="all",
            default=True,
            inherited=False,
            allows_public_repositories=False,
            restricted_to_workflows=False,
            selected_workflows=[],
            runners_url=f"{self.state.api_base_url}/orgs/{self.owner}/actions/runner-groups/1/runners",
        )
        return _json(RunnerGroupList(total_count=1, runner_groups=[group]))

    async def _h_get_job(self, request: Request) -> Response:
        return _json(
            self.state.workflow_job(int(request.path_params["job_id"]), repo=str(request.path_params["repo"]))
        )

    def _runs(self, repo: str) -> list[WorkflowRunView]:
        name = self.state.repository(repo).name
        api_repo = f"{self.state.api_base_url}/repos/{self.owner}/{name}"
        by_run: dict[int, list[WorkflowJobView]] = {}
        for job in self.state.workflow_jobs(repo):
            by_run.setdefault(job.run_id, []).append(job)
        runs: list[WorkflowRunView] = []
        for run_id, jobs in by_run.items():
            first = jobs[0]
            statuses = {job.status for job in jobs}
            # A run is queued (or waiting) until one of its jobs starts, and in progress until all are done.
            status: JobStatus
            if statuses == {"completed"}:
                status = "completed"
            elif statuses <= {"waiting"}:
                status = "waiting"
            elif statuses <= {"waiting", "queued"}:
                status = "queued"
            else:
                status = "in_progress"
            conclusions = {job.conclusion for job in jobs}
            conclusion = None
            if status == "completed":
                conclusion = (
                    "success"
                    if conclusions == {"success"}
                    else next(c for c in ("failure", "cancelled", "timed_out", "success") if c in conclusions)
                )
            runs.append(
                WorkflowRunView(
                    id=run_id,
                    name=first.workflow_name,
                    run_attempt=first.run_attempt,
                    status=status,
                    conclusion=conclusion,
                    head_branch=first.head_branch,
                    head_sha=first.head_sha,
                    created_at=first.created_at,
                    updated_at=max((job.completed_at or job.started_at) for job in jobs),
                    url=first.run_url,
                    html_url=f"https://github.com/{self.owner}/{name}/actions/runs/{run_id}",
                    jobs_url=f"{api_repo}/actions/runs/{run_id}/jobs",
                )
            )
        return runs

    async def _h_list_runs(self, request: Request) -> Response:
        wanted = request.query_params.get("status")
        runs = self._runs(str(request.path_params["repo"]))
        runs = [r for r in runs if wanted is None or wanted in (r.status, r.conclusion)]
        page, headers = _paginate(request, runs)
        return _json(WorkflowRunList(total_count=len(runs), workflow_runs=page), headers=headers)

    async def _h_run_jobs(self, request: Request) -> Response:
        run_id = int(request.path_params["run_id"])
        jobs = [j for j in self.state.workflow_jobs(str(request.path_params["repo"])) if j.run_id == run_id]
        if not jobs:
            raise ApiError(404, "Not Found")
        page, headers = _paginate(request, jobs)
        return _json(WorkflowJobList(total_count=len(jobs), jobs=page), headers=headers)

    async def _h_org_repos(self, request: Request) -> Response:
        page, headers = _paginate(request, self.state.repository_views())
        return JSONResponse([repo.model_dump(mode="json") for repo in page], headers=headers)

    async def _h_rate_limit(self, request: Request) -> Response:
        headers = self._rate_headers()
        core = RateResource(
            limit=_RATE_LIMIT,
            remaining=int(headers["x-ratelimit-remaining"]),
            reset=self._rate_reset,
            used=self._rate_used,
            resource="core",
        )
        registration = RateResource(
            limit=10_000,
            remaining=10_000,
            reset=self._rate_reset,
            used=0,
            resource="actions_runner_registration",
        )
        return _json(
            RateLimitResponse(
                resources={"core": core, "actions_runner_registration": registration}, rate=core
            )
        )

    # ----------------------------------------------------------------- /_sim admin handlers

    async def _a_queue_jobs(self, request: Request) -> Response:
        body = await _parse(request, QueueJobsRequest)
        try:
            self.state.repository(body.repo)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        if body.matrix:
            ids = self.queue_run(
                body.labels, body.count, body.duration_s, needs_approval=body.needs_approval, repo=body.repo
            )
        else:
            ids = [
                self.queue_job(
                    body.labels,
                    body.duration_s,
                    name=body.name,
                    needs_approval=body.needs_approval,
                    repo=body.repo,
                )
                for _ in range(body.count)
            ]
        return _json(QueueJobsResponse(job_ids=ids), 201)

    async def _a_approve_job(self, request: Request) -> Response:
        job_id = int(request.path_params["job_id"])
        self.approve_job(job_id)
        return _json(self.job(job_id))

    async def _a_jobs(self, request: Request) -> Response:
        return JSONResponse([j.model_dump(mode="json") for j in self.jobs()])

    async def _a_cancel_job(self, request: Request) -> Response:
        job_id = int(request.path_params["job_id"])
        self.cancel_job(job_id)
        return _json(self.job(job_id))

    async def _a_runners(self, request: Request) -> Response:
        return JSONResponse([r.model_dump(mode="json") for r in self.runners()])

    async def _a_set_faults(self, request: Request) -> Response:
        self.set_faults(await _parse(request, FaultConfig))
        return _json(self._faults)

    async def _a_get_faults(self, request: Request) -> Response:
        return _json(self._faults)

    async def _a_set_webhook(self, request: Request) -> Response:
        # For a standalone simulator whose receiver starts later (the python API uses the attribute).
        self.webhook_url = (await _parse(request, WebhookTarget)).url
        return _json(WebhookTarget(url=self.webhook_url))

    async def _a_deliveries(self, request: Request) -> Response:
        return JSONResponse([d.model_dump(mode="json") for d in self.deliveries()])

    async def _a_redeliver(self, request: Request) -> Response:
        try:
            self.redeliver(str(request.path_params["delivery_id"]))
        except KeyError as exc:
            raise ApiError(404, "Not Found") from exc
        return Response(status_code=202)

    async def _a_ping(self, request: Request) -> Response:
        return JSONResponse({"delivery_id": self.ping()}, status_code=202)

    async def _a_stats(self, request: Request) -> Response:
        return _json(self.stats())

    # ----------------------------------------------------------------- agent protocol handlers

    async def _g_connect(self, request: Request) -> Response:
        body = await _parse(request, AgentConnectRequest)
        try:
            config = jitconfig.decode(body.jitconfig)
        except jitconfig.JitConfigError as exc:
            raise ApiError(401, "Invalid JIT configuration.") from exc
        runner = self.state.agent_connect(config)
        assert runner.session_id is not None  # set by agent_connect
        return _json(
            AgentConnectResponse(
                runner_id=runner.id,
                runner_name=runner.name,
                session_id=runner.session_id,
                poll_wait_s=self._max_poll_wait(),
                heartbeat_interval_s=max(0.05, self.agent_timeout_s / 3),
            )
        )

    def _max_poll_wait(self) -> float:
        # A poll refreshes liveness only when it starts, so it must end well inside the timeout.
        return min(20.0, self.agent_timeout_s / 2)

    async def _g_poll(self, request: Request) -> Response:
        runner_id = int(request.path_params["runner_id"])
        session = request.headers.get(AGENT_SESSION_HEADER, "")
        try:
            wait = float(request.query_params.get("wait", "0"))
        except ValueError as exc:
            raise ApiError(422, "wait must be a number") from exc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(0.0, wait), self._max_poll_wait())
        while True:
            changed = self._changed
            job = self.state.agent_poll(runner_id, session)
            if job is not None:
                return _json(AgentJob(job_id=job.id, duration_s=job.duration_s))
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closing:
                return Response(status_code=204)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def _g_heartbeat(self, request: Request) -> Response:
        session = request.headers.get(AGENT_SESSION_HEADER, "")
        self.state.agent_heartbeat(int(request.path_params["runner_id"]), session)
        return Response(status_code=204)

    async def _g_complete(self, request: Request) -> Response:
        body = await _parse(request, AgentCompleteRequest)
        session = request.headers.get(AGENT_SESSION_HEADER, "")
        self.state.agent_complete(
            int(request.path_params["runner_id"]), session, body.job_id, body.conclusion
        )
        return Response(status_code=204)

    # ----------------------------------------------------------------- app

    def _build_app(self) -> Starlette:
        routes: list[BaseRoute] = []
        for scope in ("/repos/{owner}/{repo}", "/orgs/{org}"):
            base = f"{scope}/actions/runners"
            routes += [
                self._github_route("POST", f"{base}/registration-token", self._h_token, "register"),
                self._github_route("POST", f"{base}/remove-token", self._h_token, "mutate"),
                self._github_route("POST", f"{base}/generate-jitconfig", self._h_jit, "register"),
                self._github_route("GET", base, self._h_list_runners),
                self._github_route("GET", f"{base}/{{runner_id}}", self._h_get_runner),
                self._github_route("DELETE", f"{base}/{{runner_id}}", self._h_delete_runner, "mutate"),
            ]
        if self._app_auth is not None:
            method, template = ACCESS_TOKENS_ROUTE.split(" ")
            routes.append(
                # "mutate": a token can be issued and its answer lost, as with any POST.
                self._github_route(method, template, self._h_installation_token, "mutate", app_jwt=True)
            )
        repo = "/repos/{owner}/{repo}/actions"
        routes += [
            self._github_route("GET", "/orgs/{org}/actions/runner-groups", self._h_runner_groups),
            self._github_route("GET", "/orgs/{org}/repos", self._h_org_repos),
            self._github_route("GET", f"{repo}/jobs/{{job_id}}", self._h_get_job),
            self._github_route("GET", f"{repo}/runs", self._h_list_runs),
            self._github_route("GET", f"{repo}/runs/{{run_id}}/jobs", self._h_run_jobs),
            # GitHub documents that /rate_limit does not count against the limit.
            self._github_route("GET", "/rate_limit", self._h_rate_limit, counted=False),
            Route("/_sim/jobs", self._a_queue_jobs, methods=["POST"]),
            Route("/_sim/jobs", self._a_jobs, methods=["GET"]),
            Route("/_sim/jobs/{job_id:int}/cancel", self._a_cancel_job, methods=["POST"]),
            Route("/_sim/jobs/{job_id:int}/approve", self._a_approve_job, methods=["POST"]),
            Route("/_sim/runners", self._a_runners, methods=["GET"]),
            Route("/_sim/faults", self._a_set_faults, methods=["POST"]),
            Route("/_sim/faults", self._a_get_faults, methods=["GET"]),
            Route("/_sim/webhook", self._a_set_webhook, methods=["POST"]),
            Route("/_sim/deliveries", self._a_deliveries, methods=["GET"]),
            Route("/_sim/deliveries/{delivery_id}/redeliver", self._a_redeliver, methods=["POST"]),
            Route("/_sim/ping", self._a_ping, methods=["POST"]),
            Route("/_sim/stats", self._a_stats, methods=["GET"]),
            Route("/_sim/agent/connect", self._g_connect, methods=["POST"]),
            Route("/_sim/agent/{runner_id:int}/job", self._g_poll, methods=["GET"]),
            Route("/_sim/agent/{runner_id:int}/heartbeat", self._g_heartbeat, methods=["POST"]),
            Route("/_sim/agent/{runner_id:int}/complete", self._g_complete, methods=["POST"]),
        ]

        async def on_api_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, ApiError)
            return _error(exc.status, exc.message)

        async def on_http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            message = "Not Found" if exc.status_code == 404 else str(exc.detail)
            response = _error(exc.status_code, message, "https://docs.github.com/rest")
            if not request.url.path.startswith("/_sim/"):
                response.headers.update(self._rate_headers())
            return response

        return Starlette(
            routes=routes,
            exception_handlers={ApiError: on_api_error, HTTPException: on_http_error},
        )
