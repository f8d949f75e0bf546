"""One deployment, several scopes: one GitHub App installed in two organizations (one of them
with two repositories), plus one repository with a PAT, and three pools with overlapping labels.

Each GitHub entity is its own simulator (its own API URL, as a GitHub Enterprise Server scope
would have), all sending signed deliveries to one starter."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from mayfly import search_attributes
from mayfly.app.embedded import SIMULATED_RUNNER
from mayfly.app.explain import explain, list_jobs
from mayfly.app.starter import create_starter_app
from mayfly.app.usage import usage
from mayfly.app.wiring import build_workers, start_sweeper
from mayfly.backends.local import LocalProcessBackend
from mayfly.config import LocalBackendSettings, MayflySettings
from mayfly.github_factory import scope_clients
from mayfly.models import RunnerJobResult, job_workflow_id, owner_job_of
from mayfly.sealing import Sealer
from mayfly.serving import serve
from simulator import GitHubSimulator
from simulator.app_keys import generate_app_key

APP_ID = 5150
LINUX = ["self-hosted", "linux"]
GPU = [*LINUX, "gpu"]
ARM = [*LINUX, "arm64"]
ARM_GROUP = 9


@dataclass
class Deployment:
    client: Client
    settings: MayflySettings
    sims: dict[str, GitHubSimulator]
    pools: dict[str, str]  # short name -> pool name (unique per test run)

    def workflow_id(self, scope: str, job_id: int) -> str:
        return job_workflow_id(job_id, self.settings.runner_prefix(scope))

    async def served(self, scope: str, job_id: int, within_s: float = 90) -> tuple[RunnerJobResult, str]:
        """The job's result and the pool its workflow ran in."""
        sim = self.sims[scope]
        await sim.wait_for(
            lambda: any(d.job_id == job_id and d.status_code == 200 for d in sim.deliveries()),
            30,
            description=f"job {job_id} accepted",
        )
        handle = self.client.get_workflow_handle(self.workflow_id(scope, job_id))
        async with asyncio.timeout(within_s):
            result = RunnerJobResult.model_validate(await handle.result())
        attributes = (await handle.describe()).search_attributes
        assert attributes[search_attributes.SCOPE.name] == [scope]
        return result, str(attributes[search_attributes.POOL.name][0])


@pytest.fixture
async def deployment(client: Client, task_queue: str, tmp_path: Path) -> AsyncIterator[Deployment]:
    keys = generate_app_key()
    private_pem, public_pem = keys.private_pem, keys.public_pem
    webhook_secret = secrets.token_hex(32)
    pat = secrets.token_urlsafe(16)
    # Two scopes get the same job ids: their workflows must still not meet.
    first_job_id = int(time.time() * 1000) % 10**12 * 10

    def sim(owner: str, repos: list[str], **options: Any) -> GitHubSimulator:
        return GitHubSimulator(
            owner=owner,
            repo=repos[0],
            repos=repos,
            # Nobody is given this token: App scopes must use installation tokens.
            token=options.pop("token", secrets.token_urlsafe(16)),
            webhook_secret=webhook_secret,
            first_job_id=options.pop("first_job_id", first_job_id),
            **options,
        )

    app = {"app_id": APP_ID, "app_public_key_pem": public_pem}
    sims = {
        "acme": sim("acme", ["widgets"], installation_id=11, **app),
        "globex": sim(
            "globex",
            ["api", "web"],
            installation_id=12,
            first_job_id=first_job_id + 5000,
            extra_runner_group_ids=[ARM_GROUP],
            **app,
        ),
        "solo": sim("solo", ["tool"], token=pat, extra_runner_group_ids=[ARM_GROUP]),
        # The same App installed somewhere this deployment does not serve.
        "initech": sim("initech", ["app"], installation_id=13, first_job_id=first_job_id + 9000, **app),
    }
    for simulator in sims.values():
        await simulator.start(port=0)
    suffix = uuid.uuid4().hex[:6]
    pools = {name: f"{name}{suffix}" for name in ("gpu", "arm", "cpu")}

    def pool(name: str, labels: list[str], **options: Any) -> dict[str, Any]:
        return {
            "name": pools[name],
            "labels": labels,
            "max_runners": 2,
            "registration_poll_s": 1.0,
            "backend": LocalBackendSettings(
                command=SIMULATED_RUNNER, state_dir=tmp_path / f"backend-{name}"
            ).model_dump(),
            **options,
        }

    settings = MayflySettings(
        github={"app_id": APP_ID, "private_key": private_pem, "webhook_secret": webhook_secret},
        scopes=[
            {"name": "acme", "organization": "acme", "installation_id": 11, "api_url": sims["acme"].url},
            {
                "name": "globex",
                "organization": "globex",
                "installation_id": 12,
                "api_url": sims["globex"].url,
            },
            {"name": "solo", "repository": "solo/tool", "token": pat, "api_url": sims["solo"].url},
        ],
        temporal={"task_queue": task_queue},
        starter={"port": 0},
        # Listed first and covering every job's labels, but it serves acme only.
        pools=[
            pool("gpu", GPU, scopes=["acme"]),
            pool("arm", ARM, scopes=["globex", "solo"], runner_group_id=ARM_GROUP),
            pool("cpu", LINUX),
        ],
        semaphore_reap_interval_s=2.0,
        sweep_interval_s=1.0,
        reconcile_min_age_s=2.0,
    )

    async def client_provider() -> Client:
        return client

    starter = await serve(create_starter_app(settings, client_provider), port=0)
    for simulator in sims.values():
        simulator.webhook_url = f"{starter.url}/webhook"
    backends = {p.name: LocalProcessBackend(p.backend) for p in settings.pools}  # type: ignore[arg-type]
    async with scope_clients(settings) as github:
        workers = build_workers(
            client,
            settings,
            github=github,
            backends=backends,
            sealer=Sealer.ephemeral(),
            registration_poll_interval_s=1.0,
            graceful_shutdown_s=5.0,
        )
        tasks = [asyncio.create_task(worker.run()) for worker in workers]
        await start_sweeper(client, settings)
        try:
            yield Deployment(client, settings, sims, pools)
        finally:
            await starter.stop()
            await asyncio.gather(*(worker.shutdown() for worker in workers))
            await asyncio.gather(*tasks)
            for backend in backends.values():
                for record in await backend.list():
                    await backend.terminate(record.name)
            for simulator in sims.values():
                await simulator.stop()


async def test_each_scope_is_served_by_its_pools_with_its_credential_and_swept(
    deployment: Deployment,
) -> None:
    sims, pools = deployment.sims, deployment.pools
    jobs = [
        # scope, repository, labels, the pool that must serve it
        ("acme", "widgets", GPU, "gpu"),
        ("acme", "widgets", LINUX, "cpu"),
        ("globex", "api", ARM, "arm"),
        ("globex", "web", LINUX, "cpu"),
        ("solo", "tool", LINUX, "cpu"),
        ("solo", "tool", ARM, "arm"),
    ]
    queued = [
        (scope, sims[scope].queue_job(labels, 0.5, repo=repo), pool) for scope, repo, labels, pool in jobs
    ]
    # acme and solo number their jobs alike: the same id in two scopes is two workflows.
    assert queued[0][1] == queued[4][1]
    # The same App's installation in an organization nobody configured.
    foreign = sims["initech"].queue_job(LINUX, 0.5)
    # The arm pool covers these labels, but it does not serve acme; nothing else covers them.
    unserved = sims["acme"].queue_job(ARM, 0.5)

    pool_of_job = {(scope, job_id): pool for scope, job_id, pool in queued}
    for scope, job_id, expected_pool in queued:
        result, pool = await deployment.served(scope, job_id)
        assert pool == pools[expected_pool], (scope, job_id)
        # Runners are not bound to jobs: an acme GPU runner may take an acme Linux job, whose
        # own workflow then reports it served elsewhere. Either way by a runner of this scope.
        assert result.outcome in ("served", "served-elsewhere"), (scope, job_id, result)
        runner = sims[scope].job(job_id).runner_name
        prefix = deployment.settings.runner_prefix(scope)
        assert runner is not None, (scope, job_id)
        owner = owner_job_of(runner, prefix)
        assert owner is not None, (scope, job_id, runner)
        assert result.served_by in (runner, None)
        # It registered where its scope lives, in the group of the pool that started it.
        owner_pool = pool_of_job[scope, owner]
        assert sims[scope].runner_group_of(runner) == (ARM_GROUP if owner_pool == "arm" else 1)
        assert sims[scope].job(job_id).status == "completed"
    # The CLI's views tell the scopes apart, even for one job id in two of them.
    client, settings = deployment.client, deployment.settings
    shared_id = queued[0][1]
    acme_view = await explain(client, settings, shared_id, None)
    solo_view = await explain(client, settings, shared_id, None, "solo")
    assert f"workflow acme-job-{shared_id} (scope acme)" in acme_view[0]
    assert f"workflow solo-job-{shared_id} (scope solo)" in solo_view[0]
    listed = "\n".join(await list_jobs(client, pool=None, state=None, limit=50, scope="solo"))
    assert sorted(line.split()[0] for line in listed.splitlines()) == sorted(
        deployment.workflow_id("solo", job_id) for scope, job_id, _ in queued if scope == "solo"
    )
    # Usage is told apart by scope.
    totals = await usage(deployment.client, timedelta(hours=1), "scope")
    assert {scope: totals[scope].jobs for scope in ("acme", "globex", "solo")} == {
        "acme": 2,
        "globex": 2,
        "solo": 2,
    }
    assert all(totals[scope].runner_s > 0 for scope in ("acme", "globex", "solo"))
    # Each App scope exchanged its own installation's tokens; the PAT scope needs none.
    assert sims["acme"].token_exchanges > 0 and sims["globex"].token_exchanges > 0
    assert sims["solo"].token_exchanges == 0
    # Nothing was asked of the scope nobody configured, and its delivery started no workflow.
    initech = sims["initech"]
    await initech.wait_for(
        lambda: any(d.job_id == foreign and d.status_code == 202 for d in initech.deliveries()), 30
    )
    assert initech.token_exchanges == 0
    acme = sims["acme"]
    await acme.wait_for(
        lambda: any(d.job_id == unserved and d.status_code == 202 for d in acme.deliveries()), 30
    )
    task_queue = deployment.settings.temporal.task_queue
    for job_id in (foreign, unserved):
        query = f"{search_attributes.JOB_ID.name} = {job_id} AND TaskQueue = '{task_queue}'"
        runs = [run async for run in deployment.client.list_workflows(query)]
        assert runs == [], job_id

    # The sweeper passes over each scope: a registration named like one of that scope's runners,
    # whose workflow never existed, is removed; one that is not ours is left alone.
    strays = {}
    for scope in ("acme", "globex", "solo"):
        sim = sims[scope]
        stray = f"{deployment.settings.runner_prefix(scope)}-{queued[0][1] + 777}-a1"
        sim.state.create_jit_runner(stray, LINUX)
        sim.state.create_jit_runner(f"other-{scope}", LINUX)
        strays[scope] = stray
    for scope, stray in strays.items():
        sim = sims[scope]
        await sim.wait_for(lambda sim=sim, stray=stray: not sim.state.runner_views(stray), 30)  # type: ignore[misc]
        assert [r.name for r in sim.runners()] == [f"other-{scope}"]
