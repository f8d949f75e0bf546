"""Tests for the GitHub simulator: REST shapes, faults, scheduler, webhooks, runner program.

Everything runs over real loopback HTTP. Synchronisation is always an awaited condition with
a bounded timeout (``sim.wait_for``, ``Receiver.wait_for``, ``proc.wait``), never a sleep.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mayfly.signing import signature_256
from simulator import ApiError, BackgroundServer, FaultConfig, GitHubSimulator
from simulator import runner as runner_program
from simulator.app_keys import generate_app_key
from simulator.jitconfig import decode as decode_jit
from simulator.jitconfig import encode as encode_jit

ROOT = Path(__file__).resolve().parents[1]
SECRET = "test-hook-secret"
TOKEN = "test-token"
REPO_RUNNERS = "/repos/acme/widgets/actions/runners"
ORG_RUNNERS = "/orgs/acme/actions/runners"
LABELS = ["self-hosted", "linux", "x64"]
PROCESS_TIMEOUT = 10.0


# ---------------------------------------------------------------------------------------------
# Webhook receiver
# ---------------------------------------------------------------------------------------------


@dataclass
class Received:
    event: str
    delivery_id: str
    signature_ok: bool
    headers: dict[str, str]
    payload: dict[str, Any]

    @property
    def action(self) -> str | None:
        value = self.payload.get("action")
        return value if isinstance(value, str) else None

    @property
    def job(self) -> dict[str, Any]:
        job: dict[str, Any] = self.payload["workflow_job"]
        return job


class Receiver:
    """Records deliveries and checks each signature independently of the simulator's code."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.items: list[Received] = []
        self.answer_status = 200
        self._changed = asyncio.Event()
        self.app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])
        self.server = BackgroundServer(self.app)

    @property
    def url(self) -> str:
        return f"{self.server.url}/hook"

    async def _hook(self, request: Request) -> Response:
        raw = await request.body()
        expected = "sha256=" + hmac.new(self.secret.encode(), raw, hashlib.sha256).hexdigest()
        signature = request.headers.get("x-hub-signature-256", "")
        self.items.append(
            Received(
                event=request.headers.get("x-github-event", ""),
                delivery_id=request.headers.get("x-github-delivery", ""),
                signature_ok=hmac.compare_digest(expected, signature),
                headers=dict(request.headers),
                payload=json.loads(raw),
            )
        )
        self._changed.set()
        self._changed = asyncio.Event()
        return Response(status_code=self.answer_status)

    def for_job(self, job_id: int) -> list[Received]:
        return [r for r in self.items if r.event == "workflow_job" and r.job["id"] == job_id]

    async def wait_for(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                await self._changed.wait()


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def shared_receiver() -> AsyncIterator[Receiver]:
    # One receiver for the whole module: each server stop costs uvicorn ~0.2 s.
    rec = Receiver(SECRET)
    await rec.server.start()
    yield rec
    await rec.server.stop()


@pytest.fixture
def receiver(shared_receiver: Receiver) -> Receiver:
    shared_receiver.items.clear()
    shared_receiver.answer_status = 200
    return shared_receiver


@pytest.fixture
async def sim(receiver: Receiver) -> AsyncIterator[GitHubSimulator]:
    async with GitHubSimulator(token=TOKEN, webhook_url=receiver.url, webhook_secret=SECRET) as simulator:
        yield simulator


@pytest.fixture
async def api(sim: GitHubSimulator) -> AsyncIterator[httpx.AsyncClient]:
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": "2022-11-28",
    }
    async with httpx.AsyncClient(base_url=sim.url, headers=headers, timeout=10.0) as client:
        yield client


@pytest.fixture
async def procs() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    spawned: list[asyncio.subprocess.Process] = []
    yield spawned
    for proc in spawned:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def create_jit(
    api: httpx.AsyncClient, name: str, labels: list[str] = LABELS, *, scope: str = REPO_RUNNERS
) -> tuple[dict[str, Any], str]:
    response = await api.post(
        f"{scope}/generate-jitconfig", json={"name": name, "runner_group_id": 1, "labels": labels}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return body["runner"], body["encoded_jit_config"]


@dataclass
class Agent:
    """Speaks the agent protocol directly, for deterministic scheduler tests."""

    client: httpx.AsyncClient
    runner_id: int
    session: str

    async def poll(self, wait: float = 0.0) -> httpx.Response:
        return await self.client.get(
            f"/_sim/agent/{self.runner_id}/job",
            params={"wait": wait},
            headers={"X-Sim-Runner-Session": self.session},
        )

    async def complete(self, job_id: int, conclusion: str = "success") -> httpx.Response:
        return await self.client.post(
            f"/_sim/agent/{self.runner_id}/complete",
            json={"job_id": job_id, "conclusion": conclusion},
            headers={"X-Sim-Runner-Session": self.session},
        )


async def connect(api: httpx.AsyncClient, jit: str) -> Agent:
    response = await api.post("/_sim/agent/connect", json={"jitconfig": jit})
    assert response.status_code == 200, response.text
    body = response.json()
    return Agent(api, body["runner_id"], body["session_id"])


async def spawn_runner(
    procs: list[asyncio.subprocess.Process], jit: str, **extra_env: str
) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if k != runner_program.JIT_ENV}
    env.update(extra_env)
    env[runner_program.JIT_ENV] = jit
    env["PYTHONPATH"] = str(ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulator.runner",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    procs.append(proc)
    return proc


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    stdout, _ = await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode()


def runner_named(sim: GitHubSimulator, name: str) -> Callable[[], bool]:
    return lambda: any(r.name == name and r.status == "online" for r in sim.runners())


def deliveries_settled(sim: GitHubSimulator) -> Callable[[], bool]:
    return lambda: all(d.state != "pending" for d in sim.deliveries())


# ---------------------------------------------------------------------------------------------
# REST surface
# ---------------------------------------------------------------------------------------------


async def test_jit_create_list_get_delete(sim: GitHubSimulator, api: httpx.AsyncClient) -> None:
    runner, jit = await create_jit(api, "mayfly-1")
    assert runner["status"] == "offline" and runner["busy"] is False and runner["ephemeral"] is True
    assert runner["runner_group_id"] == 1 and runner["os"] == "linux"
    assert [label["name"] for label in runner["labels"]] == LABELS
    assert {label["type"] for label in runner["labels"]} == {"read-only"}

    # The config is base64(JSON{file: base64(content)}) like the real one, naming the sim and runner.
    files = json.loads(base64.b64decode(jit))
    runner_file = json.loads(base64.b64decode(files[".runner"]))
    assert runner_file["agentId"] == runner["id"] and runner_file["agentName"] == "mayfly-1"
    assert runner_file["serverUrl"] == sim.url
    assert ".credentials" in files

    duplicate = await api.post(
        f"{REPO_RUNNERS}/generate-jitconfig",
        json={"name": "mayfly-1", "runner_group_id": 1, "labels": LABELS},
    )
    assert duplicate.status_code == 409
    assert duplicate.json() == {
        "message": "Already exists - A runner with the name mayfly-1 already exists.",
        "documentation_url": duplicate.json()["documentation_url"],
        "status": "409",
    }

    await create_jit(api, "mayfly-2")
    listed = await api.get(REPO_RUNNERS, params={"name": "mayfly-1"})
    assert listed.status_code == 200
    assert listed.json()["total_count"] == 1 and listed.json()["runners"][0]["id"] == runner["id"]
    assert (await api.get(REPO_RUNNERS, params={"name": "mayfly"})).json()["total_count"] == 0
    # Org scope sees the same pool (org = owner).
    assert (await api.get(ORG_RUNNERS)).json()["total_count"] == 2

    got = await api.get(f"{REPO_RUNNERS}/{runner['id']}")
    assert got.status_code == 200 and got.json()["name"] == "mayfly-1"

    deleted = await api.delete(f"{REPO_RUNNERS}/{runner['id']}")
    assert deleted.status_code == 204 and deleted.content == b""
    assert (await api.get(f"{REPO_RUNNERS}/{runner['id']}")).status_code == 404
    assert (await api.delete(f"{REPO_RUNNERS}/{runner['id']}")).status_code == 404
    # The name is free again once the runner is gone.
    await create_jit(api, "mayfly-1", scope=ORG_RUNNERS)

    for response in (listed, got, deleted):
        for header in ("limit", "remaining", "used", "reset", "resource"):
            assert f"x-ratelimit-{header}" in response.headers
        assert response.headers["x-github-request-id"]
    assert sim.calls["POST /repos/{owner}/{repo}/actions/runners/generate-jitconfig 409"] == 1
    assert sim.calls["DELETE /repos/{owner}/{repo}/actions/runners/{runner_id}"] == 2
    assert sim.status_codes[204] == 1


async def test_jit_validation(api: httpx.AsyncClient) -> None:
    async def jit(body: dict[str, Any]) -> httpx.Response:
        return await api.post(f"{REPO_RUNNERS}/generate-jitconfig", json=body)

    missing_group = await jit({"name": "a", "labels": LABELS})
    assert missing_group.status_code == 422
    assert missing_group.json()["message"] == "Invalid input: object is missing required key: runner_group_id"
    assert (await jit({"name": "a", "runner_group_id": 1, "labels": []})).status_code == 422
    too_many = [f"l{i}" for i in range(101)]
    assert (await jit({"name": "a", "runner_group_id": 1, "labels": too_many})).status_code == 422
    assert (await jit({"name": "a", "runner_group_id": 2, "labels": LABELS})).status_code == 404
    bad_json = await api.post(f"{REPO_RUNNERS}/generate-jitconfig", content=b"{nope")
    assert bad_json.status_code == 400
    assert (await api.get(REPO_RUNNERS)).json()["total_count"] == 0


async def test_pagination_link_header(api: httpx.AsyncClient) -> None:
    for i in range(3):
        await create_jit(api, f"page-{i}")
    first = await api.get(REPO_RUNNERS, params={"per_page": 2})
    assert first.json()["total_count"] == 3 and len(first.json()["runners"]) == 2
    assert 'rel="next"' in first.headers["link"] and 'rel="last"' in first.headers["link"]
    second = await api.get(REPO_RUNNERS, params={"per_page": 2, "page": 2})
    assert [r["name"] for r in second.json()["runners"]] == ["page-2"]
    assert 'rel="prev"' in second.headers["link"] and 'rel="next"' not in second.headers["link"]


async def test_auth_and_scope(sim: GitHubSimulator, api: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as anonymous:
        no_header = await anonymous.get(REPO_RUNNERS)
        wrong = await anonymous.get(REPO_RUNNERS, headers={"Authorization": "Bearer nope"})
        classic = await anonymous.get(REPO_RUNNERS, headers={"Authorization": f"token {TOKEN}"})
    for response in (no_header, wrong):
        assert response.status_code == 401
        assert response.json()["message"] == "Bad credentials" and response.json()["status"] == "401"
        assert "x-ratelimit-limit" in response.headers
    assert classic.status_code == 200
    assert (await api.get("/repos/acme/other/actions/runners")).status_code == 404
    assert (await api.get("/orgs/someone-else/actions/runners")).status_code == 404

    groups = (await api.get("/orgs/acme/actions/runner-groups")).json()
    assert groups["total_count"] == 1
    assert groups["runner_groups"][0]["id"] == 1 and groups["runner_groups"][0]["default"] is True

    token = await api.post(f"{REPO_RUNNERS}/registration-token")
    assert token.status_code == 201 and token.json()["token"] and token.json()["expires_at"].endswith("Z")
    removal = await api.post(f"{ORG_RUNNERS}/remove-token")
    assert removal.status_code == 201

    used = int(removal.headers["x-ratelimit-used"])
    assert used > int(classic.headers["x-ratelimit-used"])
    for _ in range(2):
        rate = (await api.get("/rate_limit")).json()
        # /rate_limit itself does not count against the limit.
        assert rate["resources"]["core"]["used"] == used
    assert "actions_runner_registration" in rate["resources"]


async def test_delete_busy_runner_is_refused(
    sim: GitHubSimulator, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    runner, jit = await create_jit(api, "busy-1")
    agent = await connect(api, jit)
    assert sim.runners()[0].status == "online"
    job_id = sim.queue_job(["self-hosted", "linux"], 0.0)
    assert sim.job(job_id).runner_name == "busy-1"

    refused = await api.delete(f"{REPO_RUNNERS}/{runner['id']}")
    assert refused.status_code == 422
    assert refused.json()["message"] == 'Bad request - Runner "busy-1" is still running a job"'
    polled = await agent.poll()
    assert polled.status_code == 200 and polled.json()["job_id"] == job_id

    assert (await agent.complete(job_id)).status_code == 204
    assert sim.job(job_id).conclusion == "success"
    # Ephemeral: GitHub removed the record itself after the job.
    assert (await api.delete(f"{REPO_RUNNERS}/{runner['id']}")).status_code == 404
    assert (await agent.poll()).status_code == 410


async def test_agent_connect_errors(sim: GitHubSimulator, api: httpx.AsyncClient) -> None:
    _, jit = await create_jit(api, "agent-1")
    real = decode_jit(jit)
    forged = encode_jit(
        type(real)(
            agent_id=real.agent_id, agent_name=real.agent_name, server_url=real.server_url, secret="guess"
        )
    )
    assert (await api.post("/_sim/agent/connect", json={"jitconfig": forged})).status_code == 401
    assert (await api.post("/_sim/agent/connect", json={"jitconfig": "garbage"})).status_code == 401
    await connect(api, jit)
    # Single use.
    assert (await api.post("/_sim/agent/connect", json={"jitconfig": jit})).status_code == 409

    other, other_jit = await create_jit(api, "agent-2")
    assert (await api.delete(f"{REPO_RUNNERS}/{other['id']}")).status_code == 204
    assert (await api.post("/_sim/agent/connect", json={"jitconfig": other_jit})).status_code == 404


# ---------------------------------------------------------------------------------------------
# API faults
# ---------------------------------------------------------------------------------------------


async def test_lost_response_acts_then_502(sim: GitHubSimulator, api: httpx.AsyncClient) -> None:
    sim.set_faults(FaultConfig(lost_response_rate=1.0))
    body = {"name": "lost-1", "runner_group_id": 1, "labels": LABELS}
    first = await api.post(f"{REPO_RUNNERS}/generate-jitconfig", json=body)
    assert first.status_code == 502
    assert [r.name for r in sim.runners()] == ["lost-1"]  # the work was done anyway
    retry = await api.post(f"{REPO_RUNNERS}/generate-jitconfig", json=body)
    assert retry.status_code == 409  # errors are not "lost": nothing was done

    sim.set_faults(FaultConfig())
    listed = (await api.get(REPO_RUNNERS, params={"name": "lost-1"})).json()
    assert listed["total_count"] == 1

    sim.set_faults(FaultConfig(lost_response_rate=1.0))
    runner_id = listed["runners"][0]["id"]
    assert (await api.delete(f"{REPO_RUNNERS}/{runner_id}")).status_code == 502
    assert sim.runners() == []
    assert (await api.delete(f"{REPO_RUNNERS}/{runner_id}")).status_code == 404


async def test_registration_502_does_not_act(sim: GitHubSimulator, api: httpx.AsyncClient) -> None:
    sim.set_faults(FaultConfig(registration_502_rate=1.0))
    jit = await api.post(
        f"{REPO_RUNNERS}/generate-jitconfig", json={"name": "r", "runner_group_id": 1, "labels": LABELS}
    )
    assert jit.status_code == 502 and jit.json()["status"] == "502"
    assert (await api.post(f"{REPO_RUNNERS}/registration-token")).status_code == 502
    assert sim.runners() == []
    assert (await api.get(REPO_RUNNERS)).status_code == 200  # reads are unaffected

    # A partial rate with a seed is reproducible.
    outcomes: list[list[int]] = []
    for _ in range(2):
        sim.set_faults(FaultConfig(registration_502_rate=0.5, seed=7))
        codes = [(await api.post(f"{REPO_RUNNERS}/registration-token")).status_code for _ in range(8)]
        outcomes.append(codes)
    assert outcomes[0] == outcomes[1] and {201, 502} == set(outcomes[0])


async def test_rate_limit_and_slow(sim: GitHubSimulator, api: httpx.AsyncClient) -> None:
    sim.set_faults(FaultConfig(rate_limit_rate=1.0, retry_after_seconds=7))
    limited = await api.get(REPO_RUNNERS)
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "7"
    assert limited.json()["message"].startswith("You have exceeded a secondary rate limit")
    assert "x-ratelimit-remaining" in limited.headers
    assert (await api.get("/rate_limit")).status_code == 200  # not subject to limiting

    sim.set_faults(FaultConfig(slow_rate=1.0, slow_seconds=0.3))
    started = time.monotonic()
    assert (await api.get(REPO_RUNNERS)).status_code == 200
    assert time.monotonic() - started >= 0.3


# ---------------------------------------------------------------------------------------------
# Runner program, scheduler and webhooks
# ---------------------------------------------------------------------------------------------


async def test_job_runs_on_runner_program_with_signed_ordered_webhooks(
    sim: GitHubSimulator,
    api: httpx.AsyncClient,
    receiver: Receiver,
    procs: list[asyncio.subprocess.Process],
) -> None:
    job_id = sim.queue_job(["self-hosted", "linux"], duration_s=0.2)
    runner, jit = await create_jit(api, "prog-1")
    proc = await spawn_runner(procs, jit)

    code, output = await finish(proc)
    assert code == 0, output
    assert "Listening for Jobs" in output and f"Running job: {job_id}" in output

    job = sim.job(job_id)
    assert (job.status, job.conclusion, job.runner_name) == ("completed", "success", "prog-1")
    assert sim.runners() == []  # ephemeral runner removed after its job

    await receiver.wait_for(lambda: len(receiver.for_job(job_id)) == 3)
    hooks = receiver.for_job(job_id)
    assert [h.action for h in hooks] == ["queued", "in_progress", "completed"]
    assert [h.job["status"] for h in hooks] == ["queued", "in_progress", "completed"]
    assert all(h.signature_ok for h in hooks)
    assert len({h.delivery_id for h in hooks}) == 3

    queued, in_progress, completed = (h.job for h in hooks)
    assert queued["runner_id"] is None and queued["runner_name"] is None
    assert queued["runner_group_id"] is None and queued["conclusion"] is None
    assert in_progress["runner_id"] == runner["id"] and in_progress["runner_name"] == "prog-1"
    assert in_progress["runner_group_name"] == "Default"
    assert completed["conclusion"] == "success" and completed["completed_at"]
    assert queued["labels"] == ["self-hosted", "linux"]

    first = hooks[0]
    assert first.headers["user-agent"].startswith("GitHub-Hookshot/")
    assert first.headers["content-type"] == "application/json"
    assert first.headers["x-github-hook-installation-target-type"] == "repository"
    assert first.headers["x-github-hook-installation-target-id"] == str(first.payload["repository"]["id"])
    assert first.headers["x-github-hook-id"]
    assert first.payload["repository"]["full_name"] == "acme/widgets"
    assert first.payload["sender"]["login"]

    records = [d for d in sim.deliveries() if d.job_id == job_id]
    assert [(d.action, d.state, d.status_code, d.attempts) for d in records] == [
        ("queued", "delivered", 200, 1),
        ("in_progress", "delivered", 200, 1),
        ("completed", "delivered", 200, 1),
    ]

    # The REST view of the job matches the last webhook.
    rest_job = (await api.get(f"/repos/acme/widgets/actions/jobs/{job_id}")).json()
    assert rest_job["status"] == "completed" and rest_job["runner_name"] == "prog-1"
    runs = (await api.get("/repos/acme/widgets/actions/runs", params={"status": "completed"})).json()
    assert runs["total_count"] == 1
    run_jobs = (await api.get(f"/repos/acme/widgets/actions/runs/{rest_job['run_id']}/jobs")).json()
    assert run_jobs["jobs"][0]["id"] == job_id


async def test_runners_are_not_bound_to_jobs(sim: GitHubSimulator, api: httpx.AsyncClient) -> None:
    # Two jobs queued; the runner "meant" for the second connects first and gets the first.
    job_a = sim.queue_job(["self-hosted", "linux"], 0.0)
    job_b = sim.queue_job(["self-hosted", "linux"], 0.0)
    _, jit_for_a = await create_jit(api, "for-a")
    _, jit_for_b = await create_jit(api, "for-b")
    agent_b = await connect(api, jit_for_b)
    assert sim.job(job_a).runner_name == "for-b"
    agent_a = await connect(api, jit_for_a)
    assert sim.job(job_b).runner_name == "for-a"
    assert (await agent_b.poll()).json()["job_id"] == job_a
    assert (await agent_a.poll()).json()["job_id"] == job_b

    # Idle runners: a new job goes to the oldest-connected runner whose labels are a superset.
    _, jit_c = await create_jit(api, "idle-c", ["self-hosted", "linux", "x64"])
    _, jit_d = await create_jit(api, "idle-d", ["self-hosted", "linux", "gpu"])
    await connect(api, jit_c)
    await connect(api, jit_d)
    gpu_job = sim.queue_job(["self-hosted", "GPU"], 0.0)  # label matching ignores case
    assert sim.job(gpu_job).runner_name == "idle-d"
    plain_job = sim.queue_job(["linux"], 0.0)
    assert sim.job(plain_job).runner_name == "idle-c"
    arm_job = sim.queue_job(["self-hosted", "arm64"], 0.0)
    assert sim.job(arm_job).status == "queued"


async def test_two_runner_programs_take_whichever_job(
    sim: GitHubSimulator, api: httpx.AsyncClient, procs: list[asyncio.subprocess.Process]
) -> None:
    started = []
    for name in ("pool-1", "pool-2"):
        _, jit = await create_jit(api, name)
        started.append(await spawn_runner(procs, jit))
    await sim.wait_for(
        lambda: sum(r.status == "online" for r in sim.runners()) == 2, PROCESS_TIMEOUT, description="2 online"
    )
    jobs = [sim.queue_job(["self-hosted"], 0.1) for _ in range(2)]
    results = await asyncio.gather(*(finish(p) for p in started))
    assert [code for code, _ in results] == [0, 0], results
    assert {sim.job(j).runner_name for j in jobs} == {"pool-1", "pool-2"}
    assert {sim.job(j).conclusion for j in jobs} == {"success"}
    assert sim.runners() == []


async def test_deleting_idle_runner_stops_its_program(
    sim: GitHubSimulator, api: httpx.AsyncClient, procs: list[asyncio.subprocess.Process]
) -> None:
    runner, jit = await create_jit(api, "doomed")
    proc = await spawn_runner(procs, jit)
    await sim.wait_for(runner_named(sim, "doomed"), PROCESS_TIMEOUT)

    assert (await api.delete(f"{REPO_RUNNERS}/{runner['id']}")).status_code == 204
    code, output = await finish(proc)
    assert code == 0 and "deleted" in output, output

    # Nothing can be assigned to the deleted runner afterwards.
    job_id = sim.queue_job(["self-hosted"], 0.0)
    assert sim.job(job_id).status == "queued"
    # A config whose registration is gone makes the program exit 0 straight away, as run.sh does.
    code, output = await finish(await spawn_runner(procs, jit))
    assert code == 0 and "not usable (404)" in output, output


async def test_runner_program_connect_fail_knob(
    sim: GitHubSimulator, api: httpx.AsyncClient, procs: list[asyncio.subprocess.Process]
) -> None:
    _, jit = await create_jit(api, "never")
    code, _ = await finish(await spawn_runner(procs, jit, MAYFLY_SIM_RUNNER_CONNECT_FAIL="1"))
    assert code == 1
    assert [r.status for r in sim.runners()] == ["offline"]


def test_runner_program_removes_jit_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runner_program.JIT_ENV, "secret-config")
    monkeypatch.setenv(runner_program.CONNECT_FAIL_ENV, "1")
    assert runner_program.main() == 1
    assert runner_program.JIT_ENV not in os.environ


async def test_cancel_jobs(sim: GitHubSimulator, api: httpx.AsyncClient, receiver: Receiver) -> None:
    queued_job = sim.queue_job(["self-hosted"], 0.0)
    sim.cancel_job(queued_job)
    assert (sim.job(queued_job).status, sim.job(queued_job).conclusion) == ("completed", "cancelled")
    with pytest.raises(ApiError) as refused:
        sim.cancel_job(queued_job)
    assert refused.value.status == 409

    runner, jit = await create_jit(api, "cancel-me")
    agent = await connect(api, jit)
    running_job = sim.queue_job(["self-hosted"], 10.0)
    assert sim.job(running_job).status == "in_progress"
    cancelled = await api.post(f"/_sim/jobs/{running_job}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["conclusion"] == "cancelled"
    assert sim.runners() == []
    assert (await agent.poll()).status_code == 410

    await receiver.wait_for(lambda: len(receiver.for_job(running_job)) == 3)
    no_runner = receiver.for_job(queued_job)[-1].job
    assert (no_runner["conclusion"], no_runner["runner_id"], no_runner["steps"]) == ("cancelled", None, [])
    with_runner = receiver.for_job(running_job)[-1].job
    assert (with_runner["conclusion"], with_runner["runner_id"]) == ("cancelled", runner["id"])


async def test_silent_agent_is_reaped(receiver: Receiver) -> None:
    async with (
        GitHubSimulator(
            token=TOKEN, webhook_url=receiver.url, webhook_secret=SECRET, agent_timeout_s=0.4
        ) as sim,
        httpx.AsyncClient(base_url=sim.url, headers={"Authorization": f"Bearer {TOKEN}"}) as api,
    ):
        _, jit_busy = await create_jit(api, "vanishes-busy")
        await connect(api, jit_busy)
        job_id = sim.queue_job(["self-hosted"], 5.0)
        _, jit_idle = await create_jit(api, "vanishes-idle")
        idle = await connect(api, jit_idle)
        # Neither agent polls any more, as if both processes were killed.
        await sim.wait_for(lambda: sim.job(job_id).status == "completed", 5.0)
        assert sim.job(job_id).conclusion == "failure"
        await sim.wait_for(lambda: [r.status for r in sim.runners()] == ["offline"], 5.0)
        assert sim.runners()[0].name == "vanishes-idle"
        # A late poll brings the idle one back online.
        assert (await idle.poll()).status_code == 204
        assert sim.runners()[0].status == "online"


# ---------------------------------------------------------------------------------------------
# An organization with several repositories
# ---------------------------------------------------------------------------------------------


@asynccontextmanager
async def org_sim(
    receiver: Receiver, **kwargs: Any
) -> AsyncIterator[tuple[GitHubSimulator, httpx.AsyncClient]]:
    repos = ["widgets", "gadgets"]
    async with (
        GitHubSimulator(
            token=TOKEN, webhook_url=receiver.url, webhook_secret=SECRET, repos=repos, **kwargs
        ) as sim,
        httpx.AsyncClient(base_url=sim.url, headers={"Authorization": f"Bearer {TOKEN}"}) as api,
    ):
        yield sim, api


def test_default_repository_must_be_among_repos() -> None:
    with pytest.raises(ValueError, match="'widgets' is not among"):
        GitHubSimulator(repos=["gadgets"])
    with pytest.raises(ValueError, match="distinct"):
        GitHubSimulator(repos=["widgets", "Widgets"])
    assert GitHubSimulator(repo="gadgets", repos=["widgets", "gadgets"]).repo == "gadgets"


async def test_jobs_of_each_repository_name_their_repository(receiver: Receiver) -> None:
    async with org_sim(receiver) as (sim, api):
        assert sim.repo == "widgets" and sim.repos == ["widgets", "gadgets"]
        widget_job = sim.queue_job(["self-hosted"], 0.0)
        gadget_job = sim.queue_job(["self-hosted"], 0.0, repo="gadgets")
        await receiver.wait_for(lambda: bool(receiver.for_job(widget_job) and receiver.for_job(gadget_job)))
        widget_hook, gadget_hook = receiver.for_job(widget_job)[0], receiver.for_job(gadget_job)[0]
        widgets, gadgets = widget_hook.payload["repository"], gadget_hook.payload["repository"]
        assert (widgets["full_name"], widgets["name"]) == ("acme/widgets", "widgets")
        assert (gadgets["full_name"], gadgets["name"]) == ("acme/gadgets", "gadgets")
        assert gadgets["html_url"] == "https://github.com/acme/gadgets"
        assert widgets["id"] != gadgets["id"] and widgets["node_id"] != gadgets["node_id"]
        assert widgets["owner"] == gadgets["owner"] and gadgets["owner"]["login"] == "acme"
        organization = gadget_hook.payload["organization"]
        assert organization["login"] == "acme" and organization["id"] == gadgets["owner"]["id"]
        # No App configured: GitHub's delivery has no installation key at all.
        assert "installation" not in gadget_hook.payload
        job = gadget_hook.job
        for key in ("url", "run_url", "check_run_url"):
            assert job[key].startswith(f"{sim.url}/repos/acme/gadgets/"), (key, job[key])
        assert job["html_url"].startswith("https://github.com/acme/gadgets/actions/runs/")
        assert widget_hook.job["url"] == f"{sim.url}/repos/acme/widgets/actions/jobs/{widget_job}"
        # One hook serves every repository, so it is the organization's.
        assert gadget_hook.headers["x-github-hook-installation-target-type"] == "organization"
        assert gadget_hook.headers["x-github-hook-installation-target-id"] == str(organization["id"])

        found = await api.get(f"/repos/acme/gadgets/actions/jobs/{gadget_job}")
        assert found.status_code == 200 and found.json()["id"] == gadget_job
        assert (await api.get(f"/repos/acme/Gadgets/actions/jobs/{gadget_job}")).status_code == 200
        assert (await api.get(f"/repos/acme/widgets/actions/jobs/{gadget_job}")).status_code == 404
        assert (await api.get(f"/repos/acme/gadgets/actions/jobs/{widget_job}")).status_code == 404
        assert (await api.get(f"/repos/acme/other/actions/jobs/{gadget_job}")).status_code == 404
        assert (await api.get("/repos/acme/other/actions/runners")).status_code == 404

        gadget_runs = (await api.get("/repos/acme/gadgets/actions/runs")).json()["workflow_runs"]
        assert [r["id"] for r in gadget_runs] == [sim.job(gadget_job).run_id]
        assert gadget_runs[0]["html_url"].startswith("https://github.com/acme/gadgets/")
        assert gadget_runs[0]["jobs_url"].startswith(f"{sim.url}/repos/acme/gadgets/")
        widget_runs = (await api.get("/repos/acme/widgets/actions/runs")).json()["workflow_runs"]
        assert [r["id"] for r in widget_runs] == [sim.job(widget_job).run_id]
        gadget_run = sim.job(gadget_job).run_id
        run_jobs = (await api.get(f"/repos/acme/gadgets/actions/runs/{gadget_run}/jobs")).json()
        assert [j["id"] for j in run_jobs["jobs"]] == [gadget_job]
        assert (await api.get(f"/repos/acme/widgets/actions/runs/{gadget_run}/jobs")).status_code == 404

        repos = (await api.get("/orgs/acme/repos")).json()
        assert [r["full_name"] for r in repos] == ["acme/widgets", "acme/gadgets"]
        assert {r["id"] for r in repos} == {widgets["id"], gadgets["id"]}

        sim.ping()
        await receiver.wait_for(lambda: any(r.event == "ping" for r in receiver.items))
        ping = next(r for r in receiver.items if r.event == "ping")
        assert ping.payload["hook"]["type"] == "Organization" and "repository" not in ping.payload


async def test_queueing_in_an_unknown_repository_is_refused(receiver: Receiver) -> None:
    async with org_sim(receiver) as (sim, api):
        with pytest.raises(ValueError, match="no repository 'other'"):
            sim.queue_job(["self-hosted"], 0.0, repo="other")
        with pytest.raises(ValueError, match="no repository 'other'"):
            sim.queue_run(["self-hosted"], 2, repo="other")
        refused = await api.post("/_sim/jobs", json={"labels": ["self-hosted"], "repo": "other"})
        assert refused.status_code == 400 and "other" in refused.json()["message"]
        assert sim.jobs() == []

        queued = await api.post("/_sim/jobs", json={"labels": ["self-hosted"], "repo": "gadgets", "count": 2})
        assert queued.status_code == 201
        matrix = await api.post(
            "/_sim/jobs", json={"labels": ["self-hosted"], "repo": "gadgets", "count": 2, "matrix": True}
        )
        ids = queued.json()["job_ids"] + matrix.json()["job_ids"]
        for job_id in ids:
            assert (await api.get(f"/repos/acme/gadgets/actions/jobs/{job_id}")).status_code == 200
        run_id = sim.job(matrix.json()["job_ids"][0]).run_id
        run_jobs = (await api.get(f"/repos/acme/gadgets/actions/runs/{run_id}/jobs")).json()
        assert run_jobs["total_count"] == 2
        # A run belongs to one repository.
        with pytest.raises(ValueError, match="another repository"):
            sim.queue_job(["self-hosted"], 0.0, run_id=run_id, repo="widgets")


async def test_org_runners_serve_every_repository(receiver: Receiver) -> None:
    async with org_sim(receiver) as (sim, api):
        gadget_job = sim.queue_job(["self-hosted", "linux"], 0.0, repo="gadgets")
        widget_job = sim.queue_job(["self-hosted", "linux"], 0.0, repo="widgets")
        taken: dict[int, str] = {}
        for name in ("org-1", "org-2"):
            _, jit = await create_jit(api, name, scope=ORG_RUNNERS)
            agent = await connect(api, jit)
            job_id = (await agent.poll()).json()["job_id"]
            taken[job_id] = name
            assert (await agent.complete(job_id)).status_code == 204
        # The oldest queued job goes first, whatever its repository.
        assert taken == {gadget_job: "org-1", widget_job: "org-2"}
        for job_id in (gadget_job, widget_job):
            assert (sim.job(job_id).status, sim.job(job_id).conclusion) == ("completed", "success")

        await receiver.wait_for(lambda: len(receiver.for_job(gadget_job)) == 3)
        in_progress = receiver.for_job(gadget_job)[1]
        assert in_progress.action == "in_progress" and in_progress.job["runner_name"] == "org-1"
        assert in_progress.payload["repository"]["full_name"] == "acme/gadgets"
        rest = (await api.get(f"/repos/acme/gadgets/actions/jobs/{gadget_job}")).json()
        assert (rest["status"], rest["runner_name"]) == ("completed", "org-1")


async def test_app_deliveries_name_the_installation(receiver: Receiver) -> None:
    async with org_sim(
        receiver, app_id=77, app_public_key_pem=generate_app_key().public_pem, installation_id=4242
    ) as (sim, _):
        job_id = sim.queue_job(["self-hosted"], 0.0, repo="gadgets")
        await receiver.wait_for(lambda: bool(receiver.for_job(job_id)))
        payload = receiver.for_job(job_id)[0].payload
        assert payload["installation"]["id"] == 4242
        assert payload["organization"]["login"] == "acme"
        assert payload["repository"]["full_name"] == "acme/gadgets"


# ---------------------------------------------------------------------------------------------
# Webhook faults and delivery bookkeeping
# ---------------------------------------------------------------------------------------------


async def test_webhook_duplicate_keeps_delivery_id(sim: GitHubSimulator, receiver: Receiver) -> None:
    sim.set_faults(FaultConfig(webhook_duplicate_rate=1.0))
    job_id = sim.queue_job(["self-hosted"], 0.0)
    await sim.wait_for(deliveries_settled(sim), 5.0)
    hooks = receiver.for_job(job_id)
    assert len(hooks) == 2 and hooks[0].delivery_id == hooks[1].delivery_id
    assert hooks[0].payload == hooks[1].payload and all(h.signature_ok for h in hooks)
    assert sim.deliveries()[0].attempts == 2


async def test_webhook_drop_then_redeliver(sim: GitHubSimulator, receiver: Receiver) -> None:
    sim.set_faults(FaultConfig(webhook_drop_rate=1.0))
    job_id = sim.queue_job(["self-hosted"], 0.0)
    await sim.wait_for(deliveries_settled(sim), 5.0)
    (record,) = sim.deliveries()
    assert record.dropped and record.state == "dropped" and record.status_code is None
    assert receiver.for_job(job_id) == []

    sim.redeliver(record.delivery_id)  # manual redelivery is not subject to faults
    await receiver.wait_for(lambda: len(receiver.for_job(job_id)) == 1)
    assert receiver.items[0].delivery_id == record.delivery_id


async def test_webhook_reorder(sim: GitHubSimulator, receiver: Receiver) -> None:
    sim.set_faults(FaultConfig(webhook_reorder_rate=1.0))
    job_id = sim.queue_job(["self-hosted"], 0.0)
    sim.cancel_job(job_id)
    await receiver.wait_for(lambda: len(receiver.for_job(job_id)) == 2)
    assert [h.action for h in receiver.for_job(job_id)] == ["completed", "queued"]


async def test_failed_and_undelivered_webhooks(
    sim: GitHubSimulator, api: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.answer_status = 500
    sim.queue_job(["self-hosted"], 0.0)
    await sim.wait_for(deliveries_settled(sim), 5.0)
    assert [(d.state, d.status_code) for d in sim.deliveries()] == [("failed", 500)]

    unset = await api.post("/_sim/webhook", json={"url": None})
    assert unset.status_code == 200 and sim.webhook_url is None
    sim.queue_job(["self-hosted"], 0.0)
    await sim.wait_for(deliveries_settled(sim), 5.0)
    assert sim.deliveries()[-1].state == "undelivered"

    receiver.answer_status = 200
    sim.webhook_url = receiver.url
    sim.ping()
    await receiver.wait_for(lambda: any(r.event == "ping" for r in receiver.items))
    ping = next(r for r in receiver.items if r.event == "ping")
    assert ping.signature_ok and ping.payload["hook"]["events"] == ["workflow_job"]


def test_signature_matches_github_test_vector() -> None:
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert signature_256(b"It's a Secret to Everybody", b"Hello, World!") == expected


# ---------------------------------------------------------------------------------------------
# Admin API and waiting
# ---------------------------------------------------------------------------------------------


async def test_admin_http_api(sim: GitHubSimulator, api: httpx.AsyncClient) -> None:
    queued = await api.post("/_sim/jobs", json={"labels": ["self-hosted"], "duration_s": 0.5, "count": 2})
    assert queued.status_code == 201
    job_ids = queued.json()["job_ids"]
    assert len(job_ids) == 2 and job_ids[1] == job_ids[0] + 1

    jobs = (await api.get("/_sim/jobs")).json()
    assert [(j["id"], j["status"]) for j in jobs] == [(job_ids[0], "queued"), (job_ids[1], "queued")]
    assert (await api.post(f"/_sim/jobs/{job_ids[0]}/cancel")).json()["status"] == "completed"
    assert (await api.post("/_sim/jobs/99999/cancel")).status_code == 404

    faults = await api.post("/_sim/faults", json={"slow_rate": 0.5, "slow_seconds": 0.01, "seed": 3})
    assert faults.status_code == 200 and sim.faults.slow_rate == 0.5
    assert (await api.post("/_sim/faults", json={"slow_rate": 2})).status_code == 422
    assert (await api.post("/_sim/faults", json={"no_such_fault": 1})).status_code == 422
    sim.set_faults(FaultConfig())

    await create_jit(api, "admin-1")
    names = [r["name"] for r in (await api.get("/_sim/runners")).json()]
    assert names == ["admin-1"]

    await sim.wait_for(deliveries_settled(sim), 5.0)
    deliveries = (await api.get("/_sim/deliveries")).json()
    assert [d["action"] for d in deliveries] == ["queued", "queued", "completed"]

    stats = (await api.get("/_sim/stats")).json()
    assert stats["calls"]["POST /repos/{owner}/{repo}/actions/runners/generate-jitconfig"] == 1
    assert stats["jobs"] == {"completed": 1, "queued": 1}
    assert stats["runners"] == {"offline": 1, "idle": 1}
    assert stats["deliveries"] == {"delivered": 3}


async def test_wait_for_times_out_with_context(sim: GitHubSimulator) -> None:
    sim.queue_job(["self-hosted"], 0.0)
    with pytest.raises(TimeoutError, match=r"'never' not met within 0.05s; jobs=\[1000:queued"):
        await sim.wait_for(lambda: False, 0.05, description="never")
