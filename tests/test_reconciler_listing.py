"""What the reconciler reads from GitHub: every open job, across pages, runs and scopes."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from mayfly.config import GitHubSettings
from mayfly.github import GitHubClient
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
