"""What the reconciler reads from GitHub: every open job, across pages, runs and scopes, however
long the listing takes."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr
from temporalio.testing import ActivityEnvironment

from activities import heartbeat
from activities.sweep import SweepActivities
from mayfly.config import GitHubSettings, MayflySettings, PoolSettings
from mayfly.github import GitHubClient, WorkflowJob
from mayfly.models import DEFAULT_SCOPE
from simulator import GitHubSimulator

LABELS = ["self-hosted", "linux"]


@pytest.mark.parametrize("scope", ["repository", "organization"])
async def test_open_jobs_are_listed_across_pages_runs_and_scopes(scope: str) -> None:
    async with GitHubSimulator(token="t") as sim:
        # A matrix of 130 jobs needs two pages of its run's jobs; one of them is already done,
        # which makes the run in progress while the others are queued. One job waits for
        # approval, and one single-job run is done.
        matrix = sim.queue_run(LABELS, 130, duration_s=60.0)
        waiting = sim.queue_job(LABELS, needs_approval=True)
        done = sim.queue_job(LABELS)
        sim.cancel_job(done)
        sim.cancel_job(matrix[0])
        target = {"repository": "acme/widgets"} if scope == "repository" else {"organization": "acme"}
        github = GitHubClient(GitHubSettings(api_url=sim.url, token=SecretStr("t"), **target))
        try:
            jobs = await github.list_open_jobs()
        finally:
            await github.aclose()
    by_id = {job.id: job for job in jobs}
    assert set(by_id) == set(matrix[1:]) | {waiting}
    assert by_id[waiting].status == "waiting" and by_id[matrix[1]].status == "queued"
    assert {job.repository for job in jobs} == {"acme/widgets"}


async def test_the_reconciler_heartbeats_while_github_lists_thousands_of_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # At 2,000 queued jobs the listing took longer than the sweep's heartbeat timeout: the
    # activity was retried from the start, three times, while the listing itself was fine.
    monkeypatch.setattr(heartbeat, "HEARTBEAT_EVERY_S", 0.01)
    heartbeats: list[object] = []
    heartbeat_seen = asyncio.Event()

    async def listing_that_outlasts_a_heartbeat(
        self: GitHubClient, *, min_age_s: float = 0.0
    ) -> list[WorkflowJob]:
        await heartbeat_seen.wait()
        return []

    def on_heartbeat(*details: object) -> None:
        heartbeats.append(details)
        heartbeat_seen.set()

    monkeypatch.setattr(GitHubClient, "list_open_jobs", listing_that_outlasts_a_heartbeat)
    settings = MayflySettings(
        github=GitHubSettings(repository="acme/widgets", token=SecretStr("t")),
        pools=[PoolSettings(name="gpu", labels=LABELS, max_runners=1)],
    )
    github = GitHubClient(settings.github_scopes[DEFAULT_SCOPE])
    environment = ActivityEnvironment()
    environment.on_heartbeat = on_heartbeat
    try:
        async with asyncio.timeout(10):
            report = await environment.run(
                SweepActivities({DEFAULT_SCOPE: github}, {}, settings).queued_jobs, DEFAULT_SCOPE
            )
    finally:
        await github.aclose()
    assert report.checked == 0
    assert heartbeats and heartbeats[0] == ("listing",)
