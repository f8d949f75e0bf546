"""The webhook starter's front door: signatures, bad input, and Temporal being down."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from mayfly.app.embedded import DEMO_LABELS, EmbeddedStack
from mayfly.app.starter import MAX_JSON_DEPTH, create_starter_app, json_depth_exceeds
from mayfly.config import (
    ConfigError,
    GitHubSettings,
    MayflySettings,
    PoolSettings,
    ScopeSettings,
    TemporalSettings,
)
from mayfly.models import RunnerJobResult, job_workflow_id
from mayfly.signing import signature_matches

# GitHub's documented test vector uses this (short) secret; settings need 32 bytes or more.
GITHUB_EXAMPLE_SECRET = "It's a Secret to Everybody"
SECRET = "a webhook secret of at least 32 bytes"


def settings(task_queue: str, secret: str | None = SECRET) -> MayflySettings:
    return MayflySettings(
        github=GitHubSettings(repository="acme/widgets", token="t", webhook_secret=secret),
        temporal=TemporalSettings(task_queue=task_queue),
        pools=[PoolSettings(name="cpu", labels=["self-hosted", "linux"], max_runners=2)],
    )


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def job_payload(job_id: int, action: str = "queued", labels: list[str] | None = None) -> dict[str, Any]:
    return {
        "action": action,
        "workflow_job": {
            "id": job_id,
            "run_id": 7,
            "run_attempt": 1,
            "name": "build",
            "labels": ["self-hosted"] if labels is None else labels,
            "runner_name": None,
            "conclusion": None,
            "status": action,
        },
        "repository": {"full_name": "acme/widgets"},
    }


def starter_client(client: Client, task_queue: str) -> httpx.AsyncClient:
    async def provider() -> Client:
        return client

    app = create_starter_app(settings(task_queue), provider)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://starter")


async def post(
    http: httpx.AsyncClient, body: bytes, *, event: str = "workflow_job", signature: str | None
) -> httpx.Response:
    headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": "d-1", "Content-Type": "application/json"}
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    return await http.post("/webhook", content=body, headers=headers)


async def workflow_exists(client: Client, job_id: int) -> bool:
    try:
        await client.get_workflow_handle(job_workflow_id(job_id)).describe()
    except RPCError as error:
        assert error.status == RPCStatusCode.NOT_FOUND
        return False
    return True


def test_signature_matches_githubs_test_vector() -> None:
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    secret = GITHUB_EXAMPLE_SECRET.encode()
    assert signature_matches(secret, b"Hello, World!", expected)
    assert not signature_matches(secret, b"Hello, World?", expected)
    assert not signature_matches(secret, b"Hello, World!", expected.replace("sha256=", "sha1="))


@pytest.mark.parametrize(
    ("body", "too_deep"),
    [
        (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, False),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), True),
        (b'{"a": {"b": [1, {"c": []}]}}', False),
        # Brackets inside strings, and escaped quotes that do not end them, are not structure.
        (json.dumps({"name": "[" * 100, "q": '\\"[[[[' * 20}).encode(), False),
        (b'{"s": "\\"' + b"[" * 40 + b'"}', False),
        (b'{"s": "\\\\"' + b", " + b"[" * 40 + b"]" * 40 + b"}", True),
    ],
)
def test_json_depth_is_measured_outside_strings(body: bytes, too_deep: bool) -> None:
    assert json_depth_exceeds(body, MAX_JSON_DEPTH) is too_deep


@pytest.mark.parametrize("signature", [None, "sha256=" + "0" * 64, "sha1=abc", "garbage"])
async def test_bad_signature_is_401_and_starts_nothing(
    client: Client, task_queue: str, signature: str | None
) -> None:
    job_id = 910_000 + (hash(signature) % 1000)
    body = json.dumps(job_payload(job_id)).encode()
    async with starter_client(client, task_queue) as http:
        response = await post(http, body, signature=signature)
    assert response.status_code == 401
    assert not await workflow_exists(client, job_id)


async def test_signed_queued_event_starts_one_workflow_even_when_redelivered(
    client: Client, task_queue: str
) -> None:
    job_id = 920_001
    body = json.dumps(job_payload(job_id)).encode()
    async with starter_client(client, task_queue) as http:
        first = await post(http, body, signature=sign(body))
        again = await post(http, body, signature=sign(body))
    assert (first.status_code, again.status_code) == (200, 200)
    handle = client.get_workflow_handle(job_workflow_id(job_id))
    description = await handle.describe()
    runs = [w async for w in client.list_workflows(f"WorkflowId = '{job_workflow_id(job_id)}'")]
    assert len(runs) == 1
    assert description.task_queue == task_queue
    await handle.terminate("test cleanup: no worker serves this queue")


async def test_bad_input_gets_a_clear_answer(client: Client, task_queue: str) -> None:
    async with starter_client(client, task_queue) as http:
        not_json = b"{nope"
        assert (await post(http, not_json, signature=sign(not_json))).status_code == 400
        missing = json.dumps({"action": "queued", "repository": {"full_name": "a/b"}}).encode()
        response = await post(http, missing, signature=sign(missing))
        assert response.status_code == 400 and response.json()["field"] == "workflow_job"
        ping = b"{}"
        assert (await post(http, ping, event="ping", signature=sign(ping))).status_code == 200
        other = json.dumps({"action": "opened"}).encode()
        assert (await post(http, other, event="issues", signature=sign(other))).status_code == 202
        unmatched = json.dumps(job_payload(930_001, labels=["gpu-a100"])).encode()
        assert (await post(http, unmatched, signature=sign(unmatched))).status_code == 202
        # A job that targets a runner group only names no labels; every pool's labels cover
        # none, so routing it would hand it whichever pool comes first.
        group_only = json.dumps(job_payload(930_002, labels=[])).encode()
        response = await post(http, group_only, signature=sign(group_only))
        assert response.status_code == 202 and "without labels" in response.text
    assert not await workflow_exists(client, 930_001)
    assert not await workflow_exists(client, 930_002)


async def test_temporal_unreachable_is_503(task_queue: str) -> None:
    async def unreachable() -> Client:
        raise RuntimeError("connection refused")

    app = create_starter_app(settings(task_queue), unreachable)
    body = json.dumps(job_payload(940_001)).encode()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://starter") as http:
        assert (await post(http, body, signature=sign(body))).status_code == 503
        assert (await http.get("/readyz")).status_code == 503
        assert (await http.get("/healthz")).status_code == 200


def test_starter_refuses_to_run_without_a_secret(task_queue: str) -> None:
    async def provider() -> Client:
        raise AssertionError("not called")

    with pytest.raises(ConfigError, match="webhook_secret"):
        create_starter_app(settings(task_queue, secret=None), provider)


async def test_oversize_body_is_413(client: Client, task_queue: str) -> None:
    body = b"{" + b" " * 1_000_001 + b"}"
    async with starter_client(client, task_queue) as http:
        response = await post(http, body, signature=sign(body))
    assert response.status_code == 413


async def test_temporal_down_then_back_the_redelivery_starts_the_workflow(
    client: Client, task_queue: str
) -> None:
    temporal_up = False

    async def flaky_provider() -> Client:
        if not temporal_up:
            raise RuntimeError("connection refused")
        return client

    app = create_starter_app(settings(task_queue), flaky_provider)
    job_id = 950_001
    body = json.dumps(job_payload(job_id)).encode()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://starter") as http:
        assert (await post(http, body, signature=sign(body))).status_code == 503
        assert not await workflow_exists(client, job_id)
        temporal_up = True
        # GitHub's redelivery carries the same body (and delivery id).
        assert (await post(http, body, signature=sign(body))).status_code == 200
    assert await workflow_exists(client, job_id)
    await client.get_workflow_handle(job_workflow_id(job_id)).terminate("test cleanup")


async def test_events_out_of_order_start_nothing_twice_and_take_no_slot(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    """`completed` before `queued`, and `in_progress` before `queued`, as GitHub may deliver them."""
    stack = EmbeddedStack(client, state_dir=state_dir, task_queue=task_queue, pool=pool_name)
    await stack.start()
    assert stack.settings is not None and stack.settings.github.webhook_secret is not None
    secret = stack.settings.github.webhook_secret.get_secret_value()
    try:
        async with httpx.AsyncClient() as http:

            async def deliver(job_id: int, action: str, runner: str | None = None) -> int:
                payload = job_payload(job_id, action, labels=list(DEMO_LABELS))
                payload["workflow_job"]["runner_name"] = runner
                body = json.dumps(payload).encode()
                response = await http.post(
                    stack.starter_url,
                    content=body,
                    headers={"X-GitHub-Event": "workflow_job", "X-Hub-Signature-256": sign(body, secret)},
                )
                return response.status_code

            cancelled, taken = 960_001 + random.randrange(10**6), 970_001 + random.randrange(10**6)
            assert await deliver(cancelled, "completed") == 200
            assert await deliver(taken, "in_progress", runner="another-system-runner") == 200
            results = [
                await client.get_workflow_handle(
                    job_workflow_id(job_id), result_type=RunnerJobResult
                ).result()
                for job_id in (cancelled, taken)
            ]
            # The late `queued` events find finished workflows: nothing new starts.
            assert await deliver(cancelled, "queued") == 200
            assert await deliver(taken, "queued") == 200
            runs = [
                len([w async for w in client.list_workflows(f"WorkflowId = '{job_workflow_id(job_id)}'")])
                for job_id in (cancelled, taken)
            ]
        slots = await stack.semaphore_status_or_none()
    finally:
        await stack.stop()
    assert [r.outcome for r in results] == ["cancelled-before-start", "served-elsewhere"]
    assert [r.runners_spawned for r in results] == [0, 0]
    assert runs == [1, 1]
    assert slots is None or slots.granted_total == 0, "no slot was taken for a job that needed no runner"


async def test_a_signed_delivery_from_another_repository_starts_nothing(
    client: Client, task_queue: str
) -> None:
    job_id = 920_101
    payload = job_payload(job_id)
    payload["repository"] = {"full_name": "someone/else"}
    body = json.dumps(payload).encode()
    async with starter_client(client, task_queue) as http:
        response = await post(http, body, signature=sign(body))
        metrics = (await http.get("/metrics")).text
    assert response.status_code == 202 and "not one this deployment serves" in response.text
    assert 'mayfly_webhook_deliveries_total{outcome="ignored_unknown_scope"} 1.0' in metrics
    assert not await workflow_exists(client, job_id)


async def test_deliveries_route_to_their_scope_by_repository_organization_and_installation(
    client: Client, task_queue: str
) -> None:
    scoped = MayflySettings(
        github=GitHubSettings(app_id=5, private_key="unused here", webhook_secret=SECRET),
        scopes=[
            ScopeSettings(name="acme", organization="acme", installation_id=11),
            ScopeSettings(name="globex", organization="globex", installation_id=12),
            # A repository of acme's with its own PAT: more specific than the organization.
            ScopeSettings(name="special", repository="acme/special", token="t"),
        ],
        temporal=TemporalSettings(task_queue=task_queue),
        pools=[PoolSettings(name="cpu", labels=["self-hosted", "linux"], max_runners=2)],
    )

    async def provider() -> Client:
        return client

    app = create_starter_app(scoped, provider)
    deliveries = [
        # job id, repository, installation, the scope that must take it (None: nobody)
        (920_201, "acme/widgets", 11, "acme"),
        (920_202, "ACME/Gadgets", None, "acme"),
        (920_203, "globex/api", 12, "globex"),
        (920_204, "acme/special", None, "special"),
        # Signed, and naming acme, but sent for the App's installation in globex.
        (920_205, "acme/widgets", 12, None),
        (920_206, "initech/app", 13, None),
    ]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://starter") as http:
        for job_id, repository, installation, scope in deliveries:
            payload = job_payload(job_id)
            payload["repository"] = {"full_name": repository}
            if installation is not None:
                payload["installation"] = {"id": installation}
            body = json.dumps(payload).encode()
            response = await post(http, body, signature=sign(body))
            assert response.status_code == (200 if scope else 202), (job_id, response.text)
            started = []
            for candidate in ("acme", "globex", "special"):
                try:
                    await client.get_workflow_handle(job_workflow_id(job_id, candidate)).describe()
                    started.append(candidate)
                except RPCError as error:
                    assert error.status == RPCStatusCode.NOT_FOUND
            assert started == ([scope] if scope else []), job_id
