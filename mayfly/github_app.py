"""GitHub App authentication: an RS256 App JWT, exchanged for short-lived installation tokens.

``GitHubClient`` asks a ``TokenSource`` for a token before every request, so a personal access
token (``StaticToken``) and an App installation (``InstallationTokenProvider``) look the same to
it. None of the secrets (private key, JWT, installation token) ever reach a log line, an
exception message or a ``repr``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import BaseModel, SecretStr, ValidationError

from mayfly.github_errors import API_VERSION, GitHubError, response_message, retry_after_of

log = logging.getLogger("mayfly.github_app")

# GitHub refuses an App JWT whose exp is more than 10 minutes ahead of *its* clock. Backdating
# iat absorbs a server clock that is behind ours; keeping exp a minute short of the limit
# absorbs one that is ahead, while exp - iat stays exactly at the 10-minute maximum.
JWT_BACKDATE_S = 60
JWT_LIFETIME_S = 540
DEFAULT_REFRESH_MARGIN_S = 300.0

_JWT_HEADER = {"alg": "RS256", "typ": "JWT"}

_EXCHANGE_HINTS = {
    401: "the App JWT was rejected: check github.app_id and the private key",
    403: "GitHub refused to issue a token for installation {installation}: the installation may be "
    "suspended, or the App lacks the permissions it asks for",
    404: "installation {installation} not found for this App: check github.installation_id "
    "and that the App is installed on the repository or organization",
    422: "GitHub rejected the token request for installation {installation}: the requested "
    "permissions or repositories are not available to it",
}


class TokenSource(Protocol):
    """Where ``GitHubClient`` gets the credential for its next request."""

    async def token(self) -> str:
        """A token to send now; may contact GitHub to obtain one."""
        ...

    def invalidate(self, token: str) -> None:
        """GitHub answered 401 to ``token``: stop handing it out, if it is still the current one."""
        ...


class StaticToken:
    """A token that never changes, such as a personal access token."""

    def __init__(self, token: str | SecretStr) -> None:
        self._token = token.get_secret_value() if isinstance(token, SecretStr) else token
        if not self._token:
            raise ValueError("the GitHub token is empty")

    async def token(self) -> str:
        return self._token

    def invalidate(self, token: str) -> None:
        # Nothing to refresh: the same token would be rejected again.
        return None

    def __repr__(self) -> str:
        return "StaticToken(<redacted>)"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def load_private_key(private_key_pem: str) -> rsa.RSAPrivateKey:
    """Parse an App's private key. Errors name the problem but never quote the key."""
    try:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The parser's own message can echo bits of its input; say only what went wrong.
        raise ValueError(
            "the GitHub App private key is not an unencrypted PEM private key "
            "(use the .pem file GitHub generated for the App)"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"the GitHub App private key must be RSA, not {type(key).__name__}")
    return key


def _sign_jwt(app_id: int | str, key: rsa.RSAPrivateKey, now: float) -> str:
    issued = int(now) - JWT_BACKDATE_S
    claims = {"iat": issued, "exp": int(now) + JWT_LIFETIME_S, "iss": str(app_id)}
    segments = [_b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (_JWT_HEADER, claims)]
    signing_input = ".".join(segments).encode("ascii")
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode('ascii')}.{_b64url(signature)}"


def app_jwt(app_id: int | str, private_key_pem: str, now: float | None = None) -> str:
    """A GitHub App JWT (RS256), valid for about ten minutes from ``now`` (default: the time)."""
    if not str(app_id).strip():
        raise ValueError("the GitHub App ID is empty")
    return _sign_jwt(app_id, load_private_key(private_key_pem), time.time() if now is None else now)


class _AccessTokenResponse(BaseModel):
    token: str
    expires_at: datetime


@dataclass(frozen=True)
class _Cached:
    token: str
    expires_at: float  # epoch seconds, as GitHub stated it

    def __repr__(self) -> str:
        return f"_Cached(token=<redacted>, expires_at={self.expires_at})"


class InstallationTokenProvider:
    """Installation tokens for one GitHub App installation, cached until shortly before expiry.

    Tokens live an hour; one is reused until ``refresh_margin_s`` before it expires, so a request
    never sets out with a token about to lapse. Concurrent callers share a single exchange.
    Call ``aclose()`` when done: the provider owns an HTTP connection pool.
    """

    def __init__(
        self,
        api_url: str,
        app_id: int | str,
        installation_id: int,
        private_key_pem: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        refresh_margin_s: float = DEFAULT_REFRESH_MARGIN_S,
        clock: Callable[[], float] = time.time,
        request_timeout_s: float = 10.0,
    ) -> None:
        if not str(app_id).strip():
            raise ValueError("the GitHub App ID is empty")
        if installation_id <= 0:
            raise ValueError("the GitHub App installation ID must be a positive integer")
        if refresh_margin_s < 0:
            raise ValueError("refresh_margin_s must not be negative")
        self.app_id = app_id
        self.installation_id = installation_id
        self.refresh_margin_s = refresh_margin_s
        self._key = load_private_key(private_key_pem)
        self._clock = clock
        self._path = f"/app/installations/{installation_id}/access_tokens"
        self._cached: _Cached | None = None
        self._lock = asyncio.Lock()
        self.exchanges = 0
        self._http = httpx.AsyncClient(
            base_url=api_url.rstrip("/"),
            timeout=httpx.Timeout(request_timeout_s, connect=5.0),
            headers={
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": "mayfly",
            },
            transport=transport,
        )

    def __repr__(self) -> str:
        expiry = "none" if self._cached is None else f"expires_at={self._cached.expires_at:.0f}"
        return (
            f"InstallationTokenProvider(app_id={self.app_id!r}, "
            f"installation_id={self.installation_id}, token=<{expiry}>)"
        )

    @property
    def expires_at(self) -> float | None:
        """When the cached token expires (epoch seconds), or None when nothing is cached."""
        return None if self._cached is None else self._cached.expires_at

    async def aclose(self) -> None:
        await self._http.aclose()

    async def token(self) -> str:
        cached = self._usable()
        if cached is not None:
            return cached
        async with self._lock:
            # Whoever held the lock before us may already have fetched a fresh token.
            cached = self._usable()
            if cached is not None:
                return cached
            fresh = await self._exchange()
            self._cached = fresh
            return fresh.token

    def invalidate(self, token: str) -> None:
        # Only the token that was rejected: if another request already replaced it, the new one
        # is good and dropping it would cost a second, needless exchange.
        if self._cached is not None and self._cached.token == token:
            self._cached = None

    def _usable(self) -> str | None:
        cached = self._cached
        if cached is None or self._clock() >= cached.expires_at - self.refresh_margin_s:
            return None
        return cached.token

    async def _exchange(self) -> _Cached:
        jwt = _sign_jwt(self.app_id, self._key, self._clock())
        what = f"POST {self._path}"
        self.exchanges += 1
        try:
            response = await self._http.post(self._path, headers={"Authorization": f"Bearer {jwt}"})
        except httpx.TimeoutException as error:
            raise GitHubError(None, f"{what}: timed out ({type(error).__name__})") from None
        except httpx.TransportError as error:
            raise GitHubError(None, f"{what}: {type(error).__name__}: {error}") from None
        if response.status_code != 201:
            raise self._failure(what, response, jwt)
        try:
            body = _AccessTokenResponse.model_validate_json(response.content)
        except ValidationError as error:
            # Name the fields only: the input values may include the token itself.
            fields = sorted({".".join(str(p) for p in e["loc"]) or "<body>" for e in error.errors()})
            raise GitHubError(
                response.status_code,
                f"{what}: unexpected response (bad or missing: {', '.join(fields)})",
            ) from None
        if not body.token:
            raise GitHubError(response.status_code, f"{what}: the response holds an empty token")
        expires_at = body.expires_at.timestamp()
        log.info(
            "obtained an installation token for GitHub App installation %s, expiring at %s",
            self.installation_id,
            body.expires_at.isoformat(),
        )
        return _Cached(token=body.token, expires_at=expires_at)

    def _failure(self, what: str, response: httpx.Response, jwt: str) -> GitHubError:
        status = response.status_code
        # GitHub's message is worth keeping (e.g. "'exp' is too far in the future"); a server
        # echoing the credential back is not something to pass on.
        detail = response_message(response).replace(jwt, "<redacted>")
        message = f"{what}: HTTP {status}: {detail}"
        hint = _EXCHANGE_HINTS.get(status)
        retry_after = retry_after_of(response, time.time())
        if status == 403 and retry_after is None and "rate limit" in detail.lower():
            retry_after = 60.0  # as GitHubClient: GitHub's advice when a limit gives no Retry-After
        if hint and not (status == 403 and retry_after is not None):
            message = f"{message} ({hint.format(installation=self.installation_id)})"
        return GitHubError(status, message, retry_after_s=retry_after)
