"""Turn library errors into Temporal ApplicationErrors that carry the retry decision."""

from __future__ import annotations

from datetime import timedelta

from temporalio.exceptions import ApplicationError

from mayfly.backends import BackendError
from mayfly.github import GitHubError


def github_failure(error: GitHubError) -> ApplicationError:
    delay = timedelta(seconds=error.retry_after_s) if error.retry_after_s is not None else None
    return ApplicationError(
        str(error),
        type=f"GitHubHTTP{error.status}" if error.status else "GitHubUnreachable",
        non_retryable=not error.retryable,
        next_retry_delay=delay,
    )


def backend_failure(error: BackendError) -> ApplicationError:
    return ApplicationError(str(error), type=type(error).__name__, non_retryable=not error.retryable)
