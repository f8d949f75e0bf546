"""How GitHub's REST API fails, shared by the runner client and the App token exchange."""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Any

import httpx

API_VERSION = "2022-11-28"


class GitHubError(Exception):
    """A failed GitHub call. `retryable` tells whether trying again can help."""

    def __init__(self, status: int | None, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        if self.status is None:  # transport errors and timeouts
            return True
        if self.status in (408, 429) or self.status >= 500:
            return True
        # 403 is retryable only when GitHub says it is a rate limit.
        return self.status == 403 and self.retry_after_s is not None


class AlreadyExists(GitHubError):
    pass


class RunnerBusy(GitHubError):
    pass


def retry_after_of(response: httpx.Response, now: float) -> float | None:
    header = response.headers.get("retry-after")
    if header:
        try:
            return max(0.0, float(header))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(header).timestamp() - now)
            except (TypeError, ValueError):
                return None
    if response.headers.get("x-ratelimit-remaining") == "0":
        reset = response.headers.get("x-ratelimit-reset")
        if reset and reset.isdigit():
            return max(0.0, int(reset) - now)
    return None


def response_message(response: httpx.Response) -> str:
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return response.text[:200]
