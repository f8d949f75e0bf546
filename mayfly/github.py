"""A small typed client for GitHub's self-hosted runner endpoints.

It makes one HTTP call per method and classifies failures; retrying is left to Temporal's
activity retry policy, which is durable and visible in the UI.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from pydantic import BaseModel, Field

from mayfly.config import GitHubSettings
from mayfly.github_app import StaticToken, TokenSource
from mayfly.github_errors import (
    API_VERSION,
    AlreadyExists,
    GitHubError,
    RunnerBusy,
    response_message,
    retry_after_of,
)


class Runner(BaseModel):
    id: int
    name: str
    status: str
    busy: bool

    @property
    def online(self) -> bool:
        return self.status == "online"


class JitConfig(BaseModel):
    runner: Runner
    # Left out of repr (and so of any log line or traceback that prints the model).
    encoded_jit_config: str = Field(repr=False)


class WorkflowJob(BaseModel):
    id: int
    run_id: int
    run_attempt: int = 1
    name: str = ""
    status: str
    conclusion: str | None = None
    labels: list[str] = Field(default_factory=list)
    runner_name: str | None = None
    created_at: datetime | None = None
    # Not in GitHub's job object; filled in by the listing that found the job.
    repository: str = ""


# Bounds every listing, so one sweep of a huge organization cannot run away.
MAX_PAGES = 20
PER_PAGE = 100
# Jobs in these states still need a runner (or will, once approved).
OPEN_JOB_STATUSES = ("queued", "waiting")


_HINTS = {
    401: "the GitHub token is invalid or expired (github.token)",
    403: "the token lacks permission: repo runners need administration:write, org runners "
    "organization_self_hosted_runners:write",
    404: "the repository/organization or runner group was not found, or the token cannot see it",
}
# A 401 that survives a token refresh means the installation itself cannot use the API.
_APP_401_HINT = "GitHub rejected a freshly issued installation token: check that the App is still installed"


class GitHubClient:
    def __init__(
        self,
        settings: GitHubSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        token_source: TokenSource | None = None,
    ) -> None:
        if token_source is None:
            if settings.token is None:
                raise ValueError("github.token is required")
            token_source = StaticToken(settings.token)
        self._tokens = token_source
        self._static = isinstance(token_source, StaticToken)
        self._settings = settings
        # The caller owns token_source (it may be shared); aclose() leaves it open.
        self._http = httpx.AsyncClient(
            base_url=settings.api_url,
            timeout=httpx.Timeout(settings.request_timeout_s, connect=5.0),
            headers={
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": "mayfly",
            },
            transport=transport,
        )
        self.calls = 0
        # The last x-ratelimit-remaining GitHub reported, exported as a gauge by the activities.
        self.rate_limit_remaining: int | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, token: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(
                method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs
            )
        except httpx.TimeoutException as error:
            raise GitHubError(None, f"{method} {path}: timed out ({type(error).__name__})") from None
        except httpx.TransportError as error:
            raise GitHubError(None, f"{method} {path}: {type(error).__name__}: {error}") from None

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self.calls += 1
        token = await self._tokens.token()
        response = await self._send(method, path, token, **kwargs)
        if response.status_code == 401:
            # An installation token can be revoked or expire early; one retry with a fresh token
            # tells that apart from a credential that is wrong for good. A static token comes
            # back unchanged, so it is not sent a second time.
            self._tokens.invalidate(token)
            fresh = await self._tokens.token()
            if fresh != token:
                response = await self._send(method, path, fresh, **kwargs)
        remaining = response.headers.get("x-ratelimit-remaining")
        if remaining is not None and remaining.isdigit():
            self.rate_limit_remaining = int(remaining)
        if response.is_success:
            return response
        message = f"{method} {path}: HTTP {response.status_code}: {response_message(response)}"
        hint = _HINTS.get(response.status_code)
        if response.status_code == 401 and not self._static:
            hint = _APP_401_HINT
        retry_after = retry_after_of(response, time.time())
        if hint and not (response.status_code == 403 and retry_after is not None):
            message = f"{message} ({hint})"
        if response.status_code == 409:
            raise AlreadyExists(409, message)
        if response.status_code == 422 and "still running a job" in message:
            raise RunnerBusy(422, message)
        if response.status_code == 403 and "rate limit" in message.lower() and retry_after is None:
            retry_after = 60.0  # GitHub's advice when a secondary limit gives no Retry-After
        raise GitHubError(response.status_code, message, retry_after_s=retry_after)

    async def generate_jit_config(
        self, name: str, labels: list[str], runner_group_id: int | None = None
    ) -> JitConfig:
        response = await self._request(
            "POST",
            f"{self._settings.runners_path}/generate-jitconfig",
            json={
                "name": name,
                "runner_group_id": runner_group_id or self._settings.runner_group_id,
                "labels": labels,
            },
        )
        return JitConfig.model_validate(response.json())

    async def find_runner(self, name: str) -> Runner | None:
        response = await self._request("GET", self._settings.runners_path, params={"name": name})
        runners = [Runner.model_validate(item) for item in response.json().get("runners", [])]
        return next((runner for runner in runners if runner.name == name), None)

    async def list_runners(self) -> list[Runner]:
        runners: list[Runner] = []
        page = 1
        while True:
            response = await self._request(
                "GET", self._settings.runners_path, params={"per_page": 100, "page": page}
            )
            batch = [Runner.model_validate(item) for item in response.json().get("runners", [])]
            runners.extend(batch)
            if len(batch) < 100:
                return runners
            page += 1

    async def delete_runner(self, runner_id: int) -> bool:
        """True if deleted, False if it was already gone. Raises RunnerBusy while it runs a job."""
        try:
            await self._request("DELETE", f"{self._settings.runners_path}/{runner_id}")
        except GitHubError as error:
            if error.status == 404:
                return False
            raise
        return True

    async def get_job(self, repository: str, job_id: int) -> WorkflowJob | None:
        """GitHub's current view of one job, or None if it no longer exists."""
        try:
            response = await self._request("GET", f"/repos/{repository}/actions/jobs/{job_id}")
        except GitHubError as error:
            if error.status == 404:
                return None
            raise
        job = WorkflowJob.model_validate(response.json())
        job.repository = repository
        return job

    async def _pages(self, path: str, key: str | None, params: dict[str, Any] | None = None) -> list[Any]:
        """Every item of a paginated listing, up to MAX_PAGES pages."""
        items: list[Any] = []
        for page in range(1, MAX_PAGES + 1):
            response = await self._request(
                "GET", path, params={**(params or {}), "per_page": PER_PAGE, "page": page}
            )
            body = response.json()
            batch = body if key is None else body.get(key, [])
            items.extend(batch)
            if len(batch) < PER_PAGE:
                break
        return items

    async def _repositories(self) -> list[str]:
        if self._settings.repository is not None:
            return [self._settings.repository]
        repos = await self._pages(f"/orgs/{self._settings.organization}/repos", None)
        return [str(repo["full_name"]) for repo in repos if not repo.get("archived", False)]

    async def list_open_jobs(self, *, min_age_s: float = 0.0) -> list[WorkflowJob]:
        """Jobs GitHub still has queued or waiting, in every repository in scope, for recovering
        missed webhooks. A matrix or `needs:` run is in progress while some of its jobs are
        still queued, so in-progress runs are listed too.

        Runs younger than `min_age_s` are skipped: their webhooks are most likely still on the
        way, and listing their jobs would cost one call per run during every burst.
        """
        newest = datetime.now(UTC) - timedelta(seconds=min_age_s)
        jobs: list[WorkflowJob] = []
        for repository in await self._repositories():
            base = f"/repos/{repository}/actions"
            runs: dict[int, Any] = {}
            for status in ("queued", "waiting", "in_progress"):
                for run in await self._pages(f"{base}/runs", "workflow_runs", {"status": status}):
                    runs.setdefault(int(run["id"]), run)
            for run_id, run in runs.items():
                created_at = run.get("created_at")
                if created_at and datetime.fromisoformat(str(created_at).replace("Z", "+00:00")) > newest:
                    continue
                for item in await self._pages(f"{base}/runs/{run_id}/jobs", "jobs"):
                    job = WorkflowJob.model_validate(item)
                    if job.status in OPEN_JOB_STATUSES:
                        job.repository = repository
                        jobs.append(job)
        return jobs
