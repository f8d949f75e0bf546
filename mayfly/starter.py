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
from starlette.responses import JSONResponse
from starlette.routing import Route
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from mayfly.config import ConfigError, MayflySettings
from mayfly.models import (
    JobEvent,
    JobInfo,
    RunnerJobInput,
    job_workflow_id,
    owner_job_of,
)
from workflows.runner_job import RunnerJobWorkflow

log = logging.getLogger("mayfly.starter")

RPC_TIMEOUT = timedelta(seconds=5)
_JOB_ACTIONS = ("queued", "waiting", "in_progress", "completed")
_UNAVAILABLE = (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED)


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


class TemporalUnavailable(Exception):
    pass


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
        self.counters: Counter[str] = Counter()

    async def _client(self) -> Client:
        try:
            return await self._client_provider()
        except Exception as error:
            raise TemporalUnavailable(str(error)) from error

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
        except TemporalUnavailable as error:
            self.counters["temporal_unavailable"] += 1
            log.warning("Temporal unavailable, asking GitHub to redeliver: %s", error)
            return _answer(503, "Temporal is unavailable; redeliver this event later")

    async def _dispatch(self, payload: WorkflowJobWebhook, delivery: str) -> JSONResponse:
        job = payload.workflow_job
        pool = self._settings.pool_for(job.labels)
        if pool is None:
            self.counters["ignored_no_pool"] += 1
            log.info("job %s labels %s match no pool; ignored", job.id, job.labels)
            return _answer(202, "no pool serves these labels")
        event = JobEvent(
            action=payload.action,
            job_id=job.id,
            runner_name=job.runner_name,
            conclusion=job.conclusion,
        )
        client = await self._client()
        await self._signal_with_start(client, payload, pool.name, event)
        owner = owner_job_of(job.runner_name or "", self._settings.github.runner_name_prefix)
        if owner is not None and owner != job.id:
            # The runner that took this job was started by another job's workflow; tell it too.
            await self._signal_existing(client.get_workflow_handle(job_workflow_id(owner)), event)
        self.counters[f"accepted:{payload.action}"] += 1
        log.info("delivery %s: job %s %s -> pool %s", delivery, job.id, payload.action, pool.name)
        return _answer(200, "accepted")

    async def _signal_with_start(
        self, client: Client, payload: WorkflowJobWebhook, pool_name: str, event: JobEvent
    ) -> None:
        """Start the job's workflow with this event, or signal it if it is already running."""
        job = payload.workflow_job
        pool = self._settings.pool(pool_name)
        params = RunnerJobInput(
            job=JobInfo(
                job_id=job.id,
                run_id=job.run_id,
                run_attempt=job.run_attempt,
                repository=payload.repository.full_name,
                name=job.name,
                labels=job.labels,
                pool=pool.name,
            ),
            pool_labels=pool.labels,
            capacity=pool.max_runners,
            semaphore_reap_interval_s=self._settings.semaphore_reap_interval_s,
            registration_timeout_s=pool.registration_timeout_s,
            max_registration_attempts=pool.max_registration_attempts,
            idle_ttl_s=pool.idle_ttl_s,
            max_lifetime_s=pool.max_lifetime_s,
            runner_name_prefix=self._settings.github.runner_name_prefix,
            github_task_queue=self._settings.temporal.github_task_queue,
        )
        try:
            await client.start_workflow(
                RunnerJobWorkflow.run,
                params,
                id=job_workflow_id(job.id),
                task_queue=self._settings.temporal.task_queue,
                start_signal="job_event",
                start_signal_args=[event],
                # A job's workflow runs once: a redelivered event for a finished job starts nothing.
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                static_summary=f"{payload.repository.full_name} job {job.id} ({pool.name})",
                static_details=(
                    f"**Repository:** {payload.repository.full_name}  \n**Job:** {job.name} (id {job.id}, "
                    f"run {job.run_id} attempt {job.run_attempt})  \n**Labels:** {', '.join(job.labels)}  \n"
                    f"**Pool:** {pool.name}"
                ),
                rpc_timeout=RPC_TIMEOUT,
            )
        except WorkflowAlreadyStartedError:
            pass  # the job's workflow has already finished: this is a late or duplicate event
        except RPCError as error:
            if error.status in _UNAVAILABLE:
                raise TemporalUnavailable(str(error)) from error
            raise

    async def _signal_existing(self, handle: WorkflowHandle[object, object], event: JobEvent) -> None:
        try:
            await handle.signal("job_event", event, rpc_timeout=RPC_TIMEOUT)
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return
            if error.status in _UNAVAILABLE:
                raise TemporalUnavailable(str(error)) from error
            raise

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
        ]
    )
    app.state.starter = starter
    return app
