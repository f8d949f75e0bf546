"""The webhook-to-workflow starter: the HTTP endpoint GitHub calls.

It verifies the signature over the raw body before parsing anything, then turns each
`workflow_job` event into a signal-with-start of that job's workflow. It never calls GitHub
or a container provider, so it answers well within GitHub's 10 s delivery timeout.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Annotated

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from pydantic import BaseModel, Field, StringConstraints, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.client import Client

from mayfly.config import ConfigError, MayflySettings
from mayfly.dispatch import DispatchRejected, DispatchUnavailable, JobDispatcher
from mayfly.models import JobEvent, JobInfo, job_workflow_id
from mayfly.signing import signature_matches

log = logging.getLogger("mayfly.app.starter")

_JOB_ACTIONS = ("queued", "waiting", "in_progress", "completed")
# GitHub's payloads nest about six deep. The bound is checked before parsing, so a hostile
# body cannot make a parser recurse 100,000 levels deep.
MAX_JSON_DEPTH = 32
# GitHub ids are int64; a larger one cannot go into a search attribute or a workflow id we trust.
INT64_MAX = 2**63 - 1
# Escapes, quotes and brackets: all fixed-length alternatives, so one linear pass, no backtracking.
_JSON_STRUCTURE = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)
_DELIVERY_ID = re.compile(r"^[0-9A-Fa-f-]{1,64}$")

# Bounds on what reaches workflow history: GitHub's own limits where it has them (an owner is at
# most 39 characters, a repository name 100), generous ones elsewhere.
GitHubId = Annotated[int, Field(strict=True, ge=1, le=INT64_MAX)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"\S")]
ShortText = Annotated[str, StringConstraints(max_length=256)]


class WebhookRepository(BaseModel):
    full_name: str = Field(max_length=140, pattern=r"^[\w.-]{1,39}/[\w.-]{1,100}$")


class WebhookJob(BaseModel):
    id: GitHubId
    run_id: GitHubId
    run_attempt: GitHubId = 1
    name: str = Field(default="", max_length=1024)
    # Empty for a job that targets a runner group only (`runs-on: {group: ...}`).
    labels: list[Label] = Field(max_length=64)
    runner_name: ShortText | None = None
    conclusion: ShortText | None = None


class WebhookInstallation(BaseModel):
    id: GitHubId


class WorkflowJobWebhook(BaseModel):
    action: str = Field(max_length=64)
    workflow_job: WebhookJob
    repository: WebhookRepository
    # Present when a GitHub App sends the delivery.
    installation: WebhookInstallation | None = None


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether arrays and objects nest deeper than `limit`, found without parsing: brackets
    count outside strings only, and an escaped quote does not end a string."""
    depth = 0
    in_string = False
    for token in _JSON_STRUCTURE.findall(body):
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:
            continue
        elif token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


ClientProvider = Callable[[], Awaitable[Client]]


def _log_context(payload: WorkflowJobWebhook, prefix: str = "mayfly") -> dict[str, str]:
    """The job's workflow id (its scope's prefix, once known) and its runner (once GitHub named
    one), as on the worker's lines."""
    job = payload.workflow_job
    return {"job": job_workflow_id(job.id, prefix), "runner": job.runner_name or "-"}


def _answer(status: int, message: str, **extra: object) -> JSONResponse:
    return JSONResponse({"message": message, **extra}, status_code=status)


class WebhookStarter:
    def __init__(self, settings: MayflySettings, client_provider: ClientProvider) -> None:
        if settings.github.webhook_secret is None:
            raise ConfigError(
                "github.webhook_secret: required; the starter will not accept unsigned webhooks"
            )
        self._settings = settings
        self._secret = settings.github.webhook_secret.get_secret_value().encode()
        self._client_provider = client_provider
        self._dispatcher = JobDispatcher(settings)
        # Its own registry: several starters may share a process (the tests, the dev stack).
        self.registry = CollectorRegistry()
        self._deliveries = PromCounter(
            "mayfly_webhook_deliveries", "Webhook deliveries by outcome", ["outcome"], registry=self.registry
        )

    def _count(self, outcome: str) -> None:
        self._deliveries.labels(outcome).inc()

    async def _client(self) -> Client:
        try:
            return await self._client_provider()
        except Exception as error:
            raise DispatchUnavailable(str(error)) from error

    async def _read_body(self, request: Request) -> bytes | None:
        limit = self._settings.starter.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle(self, request: Request) -> JSONResponse:
        try:
            async with asyncio.timeout(self._settings.starter.read_timeout_s):
                body = await self._read_body(request)
        except TimeoutError:
            self._count("rejected_slow_body")
            return _answer(408, "request body not received in time")
        except ClientDisconnect:
            self._count("rejected_disconnected")
            return _answer(400, "client went away before the body was complete")
        if body is None:
            self._count("rejected_too_large")
            return _answer(413, f"body exceeds {self._settings.starter.max_body_bytes} bytes")
        if not signature_matches(self._secret, body, request.headers.get("x-hub-signature-256")):
            self._count("rejected_signature")
            return _answer(401, "missing or invalid X-Hub-Signature-256")
        # From here on the sender holds the secret; still, nothing it sends is echoed back or
        # becomes a metrics label (the counters' keys are a fixed set).
        event = request.headers.get("x-github-event", "")
        if event == "ping":
            return _answer(200, "pong")
        if event != "workflow_job":
            self._count("ignored_event")
            return _answer(202, "only workflow_job events are handled; event ignored")
        if json_depth_exceeds(body, MAX_JSON_DEPTH):
            self._count("rejected_malformed")
            return _answer(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            payload = WorkflowJobWebhook.model_validate_json(body)
        except ValidationError as error:
            self._count("rejected_malformed")
            first = error.errors(include_url=False, include_input=False, include_context=False)[0]
            if first["type"] == "json_invalid":
                return _answer(400, "body is not valid UTF-8 JSON")
            # The location is built from this model's field names and list indexes only.
            field = ".".join(str(part) for part in first["loc"])
            return _answer(400, f"field {field}: {first['msg'][:200]}", field=field)
        if payload.action not in _JOB_ACTIONS:
            self._count("ignored_action")
            return _answer(202, "action ignored")
        delivery = request.headers.get("x-github-delivery", "")
        try:
            return await self._dispatch(payload, delivery if _DELIVERY_ID.match(delivery) else "?")
        except DispatchRejected as error:
            self._count("rejected_by_temporal")
            log.warning(
                "Temporal rejected job %s as invalid: %s",
                payload.workflow_job.id,
                error,
                extra=_log_context(payload),
            )
            return _answer(400, "Temporal rejected this event as invalid")
        except DispatchUnavailable as error:
            self._count("temporal_unavailable")
            log.warning(
                "Temporal unavailable, asking GitHub to redeliver: %s", error, extra=_log_context(payload)
            )
            return _answer(503, "Temporal is unavailable; redeliver this event later")
        except Exception:
            # Whatever else went wrong, it is on this side: GitHub may redeliver, and a 500
            # would say nothing more.
            self._count("temporal_unavailable")
            log.exception("dispatch of job %s failed", payload.workflow_job.id, extra=_log_context(payload))
            return _answer(503, "the event could not be handed to Temporal; redeliver it later")

    def _scope_of(self, payload: WorkflowJobWebhook) -> str | None:
        """The configured scope the delivery comes from, by its repository, organization and App
        installation; None when it is none of them: anyone who can sign can also name another
        repository. A repository scope is more specific than its organization's, so it wins."""
        repository = payload.repository.full_name.casefold()
        owner = repository.split("/")[0]
        installation = payload.installation.id if payload.installation else None
        scopes = self._settings.github_scopes
        matches = [name for name, gh in scopes.items() if (gh.repository or "").casefold() == repository]
        matches += [name for name, gh in scopes.items() if (gh.organization or "").casefold() == owner]
        for name in matches:
            expected = scopes[name].installation_id
            # An App's delivery names its installation: one for another installation of the same
            # App is not this scope's. A repository webhook (a PAT scope) names none.
            if expected is None or installation is None or installation == expected:
                return name
        return None

    async def _dispatch(self, payload: WorkflowJobWebhook, delivery: str) -> JSONResponse:
        job = payload.workflow_job
        if not job.labels:
            # Every pool's labels cover an empty set: routing it would hand it an arbitrary pool.
            self._count("ignored_no_pool")
            log.info(
                "delivery %s: job %s names no labels (a runner group only); ignored",
                delivery,
                job.id,
                extra=_log_context(payload),
            )
            return _answer(202, "no pool serves a job without labels")
        scope = self._scope_of(payload)
        if scope is None:
            self._count("ignored_unknown_scope")
            log.info(
                "delivery %s: job %s of %s is outside the configured scope; ignored",
                delivery,
                job.id,
                payload.repository.full_name,
                extra=_log_context(payload),
            )
            return _answer(202, "this repository is not one this deployment serves")
        info = JobInfo.unrouted(job, payload.repository.full_name, scope)
        event = JobEvent(
            action=payload.action,
            job_id=job.id,
            runner_name=job.runner_name,
        )
        client = await self._client()
        pool = await self._dispatcher.dispatch(client, info, event)
        if pool is None:
            self._count("ignored_no_pool")
            log.info(
                "job %s labels %s match no pool; ignored",
                job.id,
                job.labels,
                extra=_log_context(payload, self._settings.runner_prefix(scope)),
            )
            return _answer(202, "no pool serves these labels")
        self._count(f"accepted:{payload.action}")  # one of _JOB_ACTIONS
        log.info(
            "delivery %s: job %s %s -> pool %s",
            delivery,
            job.id,
            payload.action,
            pool,
            extra=_log_context(payload, self._settings.runner_prefix(scope)),
        )
        return _answer(200, "accepted")

    async def metrics(self, request: Request) -> Response:
        """The starter's counters in Prometheus text format."""
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> JSONResponse:
        return _answer(200, "ok")

    async def readyz(self, request: Request) -> JSONResponse:
        try:
            client = await self._client()
            await client.service_client.check_health(timeout=timedelta(seconds=2))
        except Exception as error:
            return _answer(503, f"Temporal unavailable: {type(error).__name__}")
        return _answer(200, "ready")


def create_starter_app(settings: MayflySettings, client_provider: ClientProvider) -> Starlette:
    starter = WebhookStarter(settings, client_provider)
    app = Starlette(
        routes=[
            Route("/webhook", starter.handle, methods=["POST"]),
            Route("/healthz", starter.healthz, methods=["GET"]),
            Route("/readyz", starter.readyz, methods=["GET"]),
            Route("/metrics", starter.metrics, methods=["GET"]),
        ]
    )
    app.state.starter = starter
    return app
