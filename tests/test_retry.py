"""The retry policy for GitHub calls: what is retried, and how long to wait."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from mayfly.config import GitHubSettings
from mayfly.github import GitHubClient
from mayfly.github_errors import AlreadyExists, GitHubError, RunnerBusy
from mayfly.retry import MAX_SERVER_REQUESTED_WAIT_S, Backoff, retry_delay


def test_full_jitter_stays_within_the_exponential_ceiling() -> None:
    backoff = Backoff(base_s=1.0, cap_s=30.0)
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (40, 30.0)]:
        assert backoff.ceiling(attempt) == ceiling
        delays = [backoff.delay(attempt, rng) for _ in range(500)]
        assert all(0 <= d <= ceiling for d in delays)
        # Full jitter spreads retries over the whole range instead of bunching at the ceiling.
        assert min(delays) < ceiling * 0.1 and max(delays) > ceiling * 0.9


def test_retry_after_wins_over_backoff_with_a_little_jitter_and_a_cap() -> None:
    rng = random.Random(3)
    backoff = Backoff(base_s=1.0, cap_s=30.0)
    delays = [retry_delay(1, 42.0, backoff, rng) for _ in range(200)]
    assert all(42.0 <= d <= 43.0 for d in delays)
    assert retry_delay(1, 10 * 3600.0, backoff, rng) <= MAX_SERVER_REQUESTED_WAIT_S + 1.0


def client_answering(
    status: int, headers: dict[str, str] | None = None, message: str = "nope"
) -> GitHubClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"message": message}, headers=headers or {})

    settings = GitHubSettings(repository="acme/widgets", token="t")
    return GitHubClient(settings, transport=httpx.MockTransport(handler))


async def failure_of(client: GitHubClient) -> GitHubError:
    with pytest.raises(GitHubError) as raised:
        await client.generate_jit_config("r", ["self-hosted"])
    await client.aclose()
    return raised.value


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408])
async def test_server_errors_and_throttling_are_retryable(status: int) -> None:
    assert (await failure_of(client_answering(status))).retryable


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_client_errors_fail_fast_with_a_hint(status: int) -> None:
    error = await failure_of(client_answering(status))
    assert not error.retryable
    if status in (401, 404):
        assert "github." in str(error) or "token" in str(error)


async def test_retry_after_header_is_read() -> None:
    error = await failure_of(client_answering(429, {"retry-after": "17"}))
    assert error.retryable and error.retry_after_s == 17.0


async def test_rate_limit_reset_is_read_for_a_primary_limit() -> None:
    reset = int(time.time()) + 120
    headers = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)}
    error = await failure_of(client_answering(403, headers, "API rate limit exceeded for installation ID 1."))
    assert error.retryable
    assert error.retry_after_s is not None and 110 <= error.retry_after_s <= 121


async def test_secondary_rate_limit_403_without_header_waits_a_minute() -> None:
    error = await failure_of(client_answering(403, message="You have exceeded a secondary rate limit."))
    assert error.retryable and error.retry_after_s == 60.0


async def test_plain_403_is_a_permission_problem() -> None:
    error = await failure_of(client_answering(403, message="Resource not accessible by integration"))
    assert not error.retryable and "administration:write" in str(error)


async def test_409_and_busy_422_have_their_own_types() -> None:
    assert isinstance(await failure_of(client_answering(409, message="Already exists")), AlreadyExists)
    busy = client_answering(422, message='Bad request - Runner "r" is still running a job"')
    with pytest.raises(RunnerBusy):
        await busy.delete_runner(5)
    await busy.aclose()


async def test_timeouts_and_refused_connections_are_retryable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    settings = GitHubSettings(repository="acme/widgets", token="t")
    error = await failure_of(GitHubClient(settings, transport=httpx.MockTransport(handler)))
    assert error.retryable and error.status is None
