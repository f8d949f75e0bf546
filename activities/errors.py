"""Turn library errors into Temporal ApplicationErrors that carry the retry decision."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from mayfly.backends import BackendError
from mayfly.github_errors import GitHubError
from mayfly.retry import Backoff, retry_delay

GITHUB_BACKOFF = Backoff(base_s=1.0, cap_s=30.0)
# A wait GitHub asks for beyond this is not spent inside the activity's retries, whose
# schedule-to-close is sized for 502 bursts: the activity fails with THROTTLED and the workflow
# waits on a durable timer instead, where the wait shows in the UI.
MAX_WAIT_IN_ACTIVITY_S = 30.0
THROTTLED = "GitHubThrottled"


def github_failure(error: GitHubError) -> ApplicationError:
    """The error Temporal records, with the jittered (or GitHub-requested) delay before the next try.

    A retryable failure (a 502 burst, a throttle) is expected: it is logged as one INFO line and
    marked benign, so the worker does not log it again as a warning with a traceback. Only a
    failure that retrying cannot fix is left for the worker to report as a warning."""
    if not error.retryable:
        return ApplicationError(
            str(error),
            type=f"GitHubHTTP{error.status}" if error.status else "GitHubUnreachable",
            non_retryable=True,
        )
    if error.retry_after_s is not None and error.retry_after_s > MAX_WAIT_IN_ACTIVITY_S:
        _log_expected(
            "%s; GitHub asks to wait %.0fs, the workflow waits on a timer", error, error.retry_after_s
        )
        return ApplicationError(
            f"{error} (GitHub asks to wait {error.retry_after_s:.0f}s)",
            error.retry_after_s,
            type=THROTTLED,
            non_retryable=True,
            category=ApplicationErrorCategory.BENIGN,
        )
    attempt = activity.info().attempt if activity.in_activity() else 1
    delay = retry_delay(attempt, error.retry_after_s, GITHUB_BACKOFF)
    _log_expected("%s; retrying in %.1fs (attempt %d)", error, delay, attempt)
    return ApplicationError(
        str(error),
        type=_error_type(error),
        next_retry_delay=timedelta(seconds=delay),
        category=ApplicationErrorCategory.BENIGN,
    )


def _error_type(error: GitHubError) -> str:
    return f"GitHubHTTP{error.status}" if error.status else "GitHubUnreachable"


def _log_expected(message: str, *args: object) -> None:
    if activity.in_activity():
        activity.logger.info(message, *args)


def redacted(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def backend_failure(error: BackendError, *, redact: list[str] | None = None) -> ApplicationError:
    return ApplicationError(
        redacted(str(error), redact or []), type=type(error).__name__, non_retryable=not error.retryable
    )
