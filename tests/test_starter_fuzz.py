"""Fuzzing the starter's front door: whatever arrives, it never answers 5xx (but the Temporal-down 503)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from temporalio.client import Client

from mayfly.starter import create_starter_app
from tests.test_starter import job_payload, sign
from tests.test_starter import settings as starter_settings

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[bytes, dict[str, str], bool]:
    """A body, headers, and whether it is a well-formed job event that would reach Temporal."""
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "valid"]))
    reaches_temporal = False
    if kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    else:
        payload: dict[str, Any] = job_payload(draw(st.integers(1, 10**9)))
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
        headers["X-Hub-Signature-256"] = draw(st.text(max_size=80).filter(str.isascii))
    elif signature == "sha1":
        headers["X-Hub-Signature-256"] = "sha1=" + sign(body)[7:47]
    reaches_temporal = kind == "valid" and event == "workflow_job"
    return body, headers, reaches_temporal


async def _temporal_is_down() -> Client:
    raise RuntimeError("Temporal is down for this fuzz run")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deliveries())
def test_no_input_gets_a_5xx(delivery: tuple[bytes, dict[str, str], bool]) -> None:
    body, headers, reaches_temporal = delivery
    app = create_starter_app(starter_settings("fuzz"), _temporal_is_down)

    async def deliver() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://starter") as http:
            return await http.post("/webhook", content=body, headers=headers)

    # Its own short-lived loop per example: hypothesis drives a synchronous test.
    response = asyncio.run(deliver())
    if reaches_temporal:
        assert response.status_code == 503
    else:
        assert response.status_code in (200, 202, 400, 401, 413, 503)
        assert response.status_code != 503 or headers.get("X-GitHub-Event") == "workflow_job"
