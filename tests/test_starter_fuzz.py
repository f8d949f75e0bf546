"""Fuzzing the starter's front door against a live Temporal: whatever arrives, it never answers
500, nothing it was sent comes back in an answer or a metrics label, and only well-formed,
bounded job events reach Temporal."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from mayfly.app.starter import create_starter_app
from mayfly.config import MayflySettings, StarterSettings
from mayfly.devserver import local_environment
from mayfly.models import job_workflow_id
from mayfly.serving import RunningServer, ServerLimits, serve
from tests.test_starter import job_payload, sign
from tests.test_starter import settings as starter_settings

# Far above the ids other tests and the embedded stacks use, so fuzzed starts collide with none.
FUZZ_JOB_IDS = st.integers(10**15, 2 * 10**15)
ANSWERS = {200, 202, 400, 401, 408, 413, 503}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[bytes, dict[str, str], bool]:
    """A body, headers, and whether it is a well-formed job event that would reach Temporal."""
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "valid"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    else:
        payload: dict[str, Any] = job_payload(draw(FUZZ_JOB_IDS))
        if kind == "mutated":
            section = draw(st.sampled_from(["workflow_job", "repository", None]))
            target = payload if section is None else payload[section]
            key = draw(st.sampled_from(sorted(target)))
            target[key] = draw(json_values)
        body = json.dumps(payload).encode()
    event = draw(st.sampled_from(["workflow_job", "ping", "push", "", "workflow_run"]))
    signature = draw(
        st.sampled_from(["valid", "missing", "garbage", "sha1"]) if kind != "valid" else st.just("valid")
    )
    headers = {"X-GitHub-Event": event, "Content-Type": "application/json"}
    if signature == "valid":
        headers["X-Hub-Signature-256"] = sign(body)
    elif signature == "garbage":
        # Printable ASCII without surrounding blanks: an HTTP client refuses to send control
        # characters in a header, and a server strips the blanks before the starter sees them.
        headers["X-Hub-Signature-256"] = draw(
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80).map(str.strip)
        )
    elif signature == "sha1":
        headers["X-Hub-Signature-256"] = "sha1=" + sign(body)[7:47]
    reaches_temporal = kind == "valid" and event == "workflow_job"
    return body, headers, reaches_temporal


@dataclass
class LiveStarter:
    server: RunningServer
    http: httpx.AsyncClient
    settings: MayflySettings

    async def deliver(
        self, body: bytes, *, event: str = "workflow_job", signed: bool = True
    ) -> httpx.Response:
        headers = {"X-GitHub-Event": event, "Content-Type": "application/json"}
        if signed:
            headers["X-Hub-Signature-256"] = sign(body)
        return await self.http.post("/webhook", content=body, headers=headers)


@pytest.fixture
async def live_starter(client: Client, task_queue: str) -> AsyncIterator[LiveStarter]:
    """The starter on a real socket, with the limits `mayfly starter` applies, on the live dev server."""

    async def provider() -> Client:
        return client

    settings = starter_settings(task_queue)
    limits = settings.starter
    server = await serve(
        create_starter_app(settings, provider),
        limits=ServerLimits(
            max_concurrency=limits.max_concurrency,
            head_timeout_s=limits.read_timeout_s,
            keep_alive_s=limits.keep_alive_s,
            max_header_bytes=limits.max_header_bytes,
        ),
    )
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            yield LiveStarter(server, http, settings)
    finally:
        await server.stop()
        # No worker serves the test's queue: end whatever the valid deliveries started.
        async for execution in client.list_workflows(
            f"TaskQueue = '{task_queue}' AND ExecutionStatus = 'Running'"
        ):
            await client.get_workflow_handle(execution.id).terminate("fuzz cleanup")


async def workflow_exists(client: Client, job_id: int) -> bool:
    try:
        await client.get_workflow_handle(job_workflow_id(job_id)).describe()
    except RPCError as error:
        assert error.status == RPCStatusCode.NOT_FOUND
        return False
    return True


def adversarial_cases(job_id: int) -> dict[str, tuple[bytes, str]]:
    """Signed deliveries from the issue and their kin: each body, and a marker that must not come back."""

    def job(**changes: Any) -> bytes:
        payload = job_payload(job_id)
        for key, value in changes.items():
            if key == "full_name":
                payload["repository"]["full_name"] = value
            elif key == "action":
                payload["action"] = value
            else:
                payload["workflow_job"][key] = value
        return json.dumps(payload).encode()

    deep = b'{"action": "queued", "sender": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return {
        "id above int64": (job(id=2**63), str(2**63)),
        "id far above int64": (job(id=10**40), str(10**40)),
        "id with 5000 digits": (job(id=int("9" * 4000)), "9" * 100),
        "negative id": (job(id=-job_id), str(-job_id)),
        "zero id": (job(id=0), '"id": 0'),
        "float id": (job(id=1.5), "1.5"),
        "string id": (job(id=str(job_id)), f'"{job_id}"'),
        "boolean id": (job(id=True), "true"),
        "run id above int64": (job(run_id=2**64), str(2**64)),
        "100 KB repository name": (job(full_name="acme/" + "r" * 100_000), "r" * 200),
        "repository without owner": (job(full_name="widgets"), "widgets"),
        "JSON nested 100,000 deep": (deep, "[[[["),
        "JSON nested 100,000 deep in a string-heavy body": (
            b'{"a": "[[[[", "b": ' + b"{" * 50_000 + b"}" * 50_000 + b"}",
            "[[[[",
        ),
        # 800 KB: a backtracking string matcher would take hours over it.
        "unterminated string of escaped quotes": (
            b'{"action": "queued", "x": "' + b'\\"' * 400_000,
            '\\"\\"',
        ),
        "blank label": (job(labels=["self-hosted", " "]), '" "'),
        "5000 labels": (job(labels=[f"label-{i}" for i in range(5000)]), "label-4999"),
        "100 KB label": (job(labels=["x" * 100_000]), "x" * 200),
        "100 KB job name": (job(name="n" * 100_000), "n" * 200),
        "100 KB runner name": (job(runner_name="q" * 100_000), "q" * 200),
        "50 KB unknown action": (job(action="z" * 50_000), "z" * 200),
        "lone surrogate in name": (job(name="\ud800"), "ud800"),
        "not UTF-8": (b'{"action": "\xff\xfe"}', "\\xff"),
        "not JSON": (b"{nope", "nope"),
        "top-level array": (b"[" + job() + b"]", "[{"),
    }


async def test_adversarial_deliveries_get_4xx_echo_nothing_and_start_nothing(
    client: Client, live_starter: LiveStarter
) -> None:
    job_id = random.randrange(3 * 10**15, 4 * 10**15)
    statuses: dict[str, int] = {}
    for case, (body, marker) in adversarial_cases(job_id).items():
        response = await live_starter.deliver(body)
        statuses[case] = response.status_code
        assert marker not in response.text, f"{case}: the answer echoes the input"
    print("\n" + "\n".join(f"  {status}  {case}" for case, status in statuses.items()))
    assert set(statuses.values()) == {400}, statuses
    assert not await workflow_exists(client, job_id)

    # A job with no labels targets a runner group only: valid, but no pool may take it.
    unlabelled = job_payload(job_id)
    unlabelled["workflow_job"]["labels"] = []
    response = await live_starter.deliver(json.dumps(unlabelled).encode())
    assert response.status_code == 202 and not await workflow_exists(client, job_id)

    # An unknown but small action is ignored, named nowhere: neither in the answer nor in a label.
    odd = job_payload(job_id)
    odd["action"] = "rerequested-by-a-fuzzer"
    response = await live_starter.deliver(json.dumps(odd).encode())
    assert response.status_code == 202 and "fuzzer" not in response.text
    other_event = await live_starter.deliver(b"{}", event="x" * 5000)
    assert other_event.status_code == 202 and "xxxx" not in other_event.text
    metrics = (await live_starter.http.get("/metrics")).text
    assert "fuzzer" not in metrics and "xxxx" not in metrics
    assert 'outcome="ignored_action"' in metrics and 'outcome="rejected_malformed"' in metrics

    # The same event, well formed, is accepted and starts the job's workflow.
    accepted = await live_starter.deliver(json.dumps(job_payload(job_id)).encode())
    assert accepted.status_code == 200
    assert await workflow_exists(client, job_id)


async def test_temporal_refusing_the_request_as_invalid_is_400_not_500(
    client: Client, task_queue: str
) -> None:
    """A task queue name over Temporal's length limit makes the server answer INVALID_ARGUMENT."""

    async def provider() -> Client:
        return client

    settings = starter_settings("q" * 2000)
    app = create_starter_app(settings, provider)
    job_id = random.randrange(4 * 10**15, 5 * 10**15)
    body = json.dumps(job_payload(job_id)).encode()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://starter") as http:
        response = await http.post(
            "/webhook",
            content=body,
            headers={"X-GitHub-Event": "workflow_job", "X-Hub-Signature-256": sign(body)},
        )
    assert response.status_code == 400, response.text
    assert "qqqq" not in response.text


async def test_slow_body_gets_408_and_slow_head_is_dropped(client: Client, task_queue: str) -> None:
    async def provider() -> Client:
        return client

    settings = starter_settings(task_queue)
    settings.starter = StarterSettings(read_timeout_s=0.5)
    server = await serve(
        create_starter_app(settings, provider), limits=ServerLimits(max_concurrency=5, head_timeout_s=0.5)
    )
    try:
        # A head that never ends: the server closes the connection once the deadline passes.
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"POST /webhook HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            assert await reader.read() == b"", "the server closed the connection without an answer"
        writer.close()

        # A complete head, then a body that trickles: 408 before the signature is even looked at.
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(
            b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"X-GitHub-Event: workflow_job\r\n\r\n{"
        )
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        writer.close()
    finally:
        await server.stop()


async def test_connections_past_the_concurrency_limit_get_503(client: Client, task_queue: str) -> None:
    async def provider() -> Client:
        return client

    server = await serve(
        create_starter_app(starter_settings(task_queue), provider),
        limits=ServerLimits(max_concurrency=3, head_timeout_s=30),
    )
    idle: list[asyncio.StreamWriter] = []
    try:
        for _ in range(3):
            _, writer = await asyncio.open_connection(server.host, server.port)
            idle.append(writer)
        async with httpx.AsyncClient(base_url=server.url) as http:
            # The three idle connections fill the limit (uvicorn counts them once accepted).
            statuses = []
            for _ in range(200):
                statuses.append((await http.get("/healthz")).status_code)
                if statuses[-1] == 503:
                    break
                await asyncio.sleep(0.05)
        assert statuses[-1] == 503, statuses
    finally:
        for writer in idle:
            writer.close()
        await server.stop()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(delivery=deliveries())
async def test_no_input_gets_a_500_from_a_live_starter(
    live_starter: LiveStarter, delivery: tuple[bytes, dict[str, str], bool]
) -> None:
    body, headers, reaches_temporal = delivery
    response = await live_starter.http.post("/webhook", content=body, headers=headers)
    assert response.status_code in ANSWERS, (response.status_code, response.text)
    if reaches_temporal:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code != 503


async def _temporal_is_down() -> Client:
    raise RuntimeError("Temporal is down for this fuzz run")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(delivery=deliveries())
async def test_no_input_gets_a_500_while_temporal_is_down(
    delivery: tuple[bytes, dict[str, str], bool],
) -> None:
    body, headers, reaches_temporal = delivery
    app = create_starter_app(starter_settings("fuzz"), _temporal_is_down)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://starter") as http:
        response = await http.post("/webhook", content=body, headers=headers)
    assert response.status_code in ANSWERS
    if reaches_temporal:
        assert response.status_code == 503
    elif response.status_code == 503:
        # A mutation that left the event valid: it reached for Temporal, which is down.
        assert headers["X-GitHub-Event"] == "workflow_job"


async def test_a_throttled_temporal_is_503_never_500() -> None:
    """A dev server limited to 1 request/s per namespace answers a burst with RESOURCE_EXHAUSTED."""
    throttled = await local_environment(
        [
            "--dynamic-config-value",
            "frontend.namespaceRPS=1",
            "--dynamic-config-value",
            "frontend.namespaceBurstRatio=1",
        ]
    )
    try:
        temporal = throttled.client

        async def provider() -> Client:
            return temporal

        app = create_starter_app(starter_settings(f"throttled-{random.randrange(10**6)}"), provider)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
        first = random.randrange(5 * 10**15, 6 * 10**15)
        bodies = [json.dumps(job_payload(first + i)).encode() for i in range(12)]
        async with httpx.AsyncClient(transport=transport, base_url="http://starter", timeout=60) as http:
            responses = await asyncio.gather(
                *(
                    http.post(
                        "/webhook",
                        content=body,
                        headers={"X-GitHub-Event": "workflow_job", "X-Hub-Signature-256": sign(body)},
                    )
                    for body in bodies
                )
            )
            metrics = (await http.get("/metrics")).text
    finally:
        await throttled.shutdown()
    statuses = sorted(response.status_code for response in responses)
    print(f"\nburst of {len(bodies)} against 1 request/s: {statuses}")
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses, statuses
    assert 'outcome="temporal_unavailable"' in metrics
