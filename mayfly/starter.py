"""The webhook-to-workflow starter: the HTTP endpoint GitHub calls.

It verifies the signature over the raw body before parsing anything, then turns each
`workflow_job` event into a signal-with-start of that job's workflow. It never calls GitHub
or a container provider, so it answers well within GitHub's 10 s delivery timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from temporalio.client import Client

from mayfly.config import ConfigError, MayflySettings
from mayfly.dispatch import DispatchUnavailable, JobDispatcher
from mayfly.models import JobEvent, JobInfo

log = logging.getLogger("mayfly.starter")

_JOB_ACTIONS = ("queued", "waiting", "in_progress", "completed")


class WebhookRepository(BaseModel):
    full_name: str


class WebhookJob(BaseModel):
    id: int
    run_id: int
    run_attempt: int = 1
    name: str = ""
    labels: list[str]
    runner_name: str | None = None
    conclusion: str | None = None


class WorkflowJobWebhook(BaseModel):
    action: str
    workflow_job: WebhookJob
    repository: WebhookRepository


ClientProvider = Callable[[], Awaitable[Client]]


def signature_matches(secret: bytes, body: bytes, header: str | None) -> bool:
    if not header or not header.startswith("sha256="):
        return False
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), header.encode())


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
        self.counters: Counter[str] = Counter()

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
        body = await self._read_body(request)
        if body is None:
            self.counters["rejected_too_large"] += 1
            return _answer(413, f"body exceeds {self._settings.starter.max_body_bytes} bytes")
        if not signature_matches(self._secret, body, request.headers.get("x-hub-signature-256")):
            self.counters["rejected_signature"] += 1
            return _answer(401, "missing or invalid X-Hub-Signature-256")
        event = request.headers.get("x-github-event", "")
        if event == "ping":
            return _answer(200, "pong")
        if event != "workflow_job":
            self.counters[f"ignored_event:{event or 'none'}"] += 1
            return _answer(202, f"event {event!r} ignored")
        try:
            payload = WorkflowJobWebhook.model_validate(json.loads(body))
        except json.JSONDecodeError as error:
            self.counters["rejected_malformed"] += 1
            return _answer(400, f"body is not JSON: {error.msg}")
        except UnicodeDecodeError:
            self.counters["rejected_malformed"] += 1
            return _answer(400, "body is not UTF-8 JSON")
        except ValidationError as error:
            self.counters["rejected_malformed"] += 1
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            return _answer(400, f"field {field}: {first['msg']}", field=field)
        if payload.action not in _JOB_ACTIONS:
            self.counters[f"ignored_action:{payload.action}"] += 1
            return _answer(202, f"action {payload.action!r} ignored")
        try:
            return await self._dispatch(payload, request.headers.get("x-github-delivery", ""))
        except DispatchUnavailable as error:
            self.counters["temporal_unavailable"] += 1
            log.warning("Temporal unavailable, asking GitHub to redeliver: %s", error)
            return _answer(503, "Temporal is unavailable; redeliver this event later")

    async def _dispatch(self, payload: WorkflowJobWebhook, delivery: str) -> JSONResponse:
        job = payload.workflow_job
        info = JobInfo(
            job_id=job.id,
            run_id=job.run_id,
            run_attempt=job.run_attempt,
            repository=payload.repository.full_name,
            name=job.name,
            labels=job.labels,
            pool="",
        )
        event = JobEvent(
            action=payload.action,
            job_id=job.id,
            runner_name=job.runner_name,
            conclusion=job.conclusion,
        )
        client = await self._client()
        pool = await self._dispatcher.dispatch(client, info, event)
        if pool is None:
            self.counters["ignored_no_pool"] += 1
            log.info("job %s labels %s match no pool; ignored", job.id, job.labels)
            return _answer(202, "no pool serves these labels")
        self.counters[f"accepted:{payload.action}"] += 1
        log.info("delivery %s: job %s %s -> pool %s", delivery, job.id, payload.action, pool)
        return _answer(200, "accepted")

    async def metrics(self, request: Request) -> PlainTextResponse:
        """The starter's counters in Prometheus text format."""
        lines = [
            "# HELP mayfly_webhook_deliveries_total Webhook deliveries by outcome",
            "# TYPE mayfly_webhook_deliveries_total counter",
        ]
        for outcome, count in sorted(self.counters.items()):
            label = outcome.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'mayfly_webhook_deliveries_total{{outcome="{label}"}} {count}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

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
