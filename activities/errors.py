"""Turn library errors into Temporal ApplicationErrors that carry the retry decision."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity
from temporalio.exceptions import ApplicationError

from mayfly.backends import BackendError
from mayfly.github import GitHubError
from mayfly.retry import Backoff, retry_delay

GITHUB_BACKOFF = Backoff(base_s=1.0, cap_s=30.0)
# A wait GitHub asks for beyond this is not spent inside the activity's retries, whose
# schedule-to-close is sized for 502 bursts: the activity fails with THROTTLED and the workflow
# waits on a durable timer instead, where the wait shows in the UI.
MAX_WAIT_IN_ACTIVITY_S = 30.0
THROTTLED = "GitHubThrottled"


def github_failure(error: GitHubError) -> ApplicationError:
    """The error Temporal records, with the jittered (or GitHub-requested) delay before the next try."""
    if error.retryable and error.retry_after_s is not None and error.retry_after_s > MAX_WAIT_IN_ACTIVITY_S:
        return ApplicationError(
            f"{error} (GitHub asks to wait {error.retry_after_s:.0f}s)",
            error.retry_after_s,
            type=THROTTLED,
            non_retryable=True,
        )
    delay = None
    if error.retryable:
        attempt = activity.info().attempt if activity.in_activity() else 1
        delay = timedelta(seconds=retry_delay(attempt, error.retry_after_s, GITHUB_BACKOFF))
    return ApplicationError(
        str(error),
        type=f"GitHubHTTP{error.status}" if error.status else "GitHubUnreachable",
        non_retryable=not error.retryable,
        next_retry_delay=delay,
    )


def redacted(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def backend_failure(error: BackendError, *, redact: list[str] | None = None) -> ApplicationError:
    return ApplicationError(
        redacted(str(error), redact or []), type=type(error).__name__, non_retryable=not error.retryable
    )
