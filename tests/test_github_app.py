"""GitHub App authentication: the App JWT, the installation-token cache and GitHubClient's
401 refresh, mostly end to end against the simulator over loopback HTTP.

Expiry is driven by a clock the test controls or by a zero token lifetime, never by sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from mayfly.config import GitHubSettings
from mayfly.github import GitHubClient
from mayfly.github_app import (
    InstallationTokenProvider,
    StaticToken,
    TokenSource,
    app_jwt,
    load_private_key,
)
from mayfly.github_errors import GitHubError
from simulator import GitHubSimulator
from simulator.app_keys import AppKeyPair, generate_app_key

APP_ID = 424242
INSTALLATION = 7
PAT = "sim-static-pat-0123456789"
RUNNERS = "/repos/acme/widgets/actions/runners"
ACCESS_TOKENS = f"/app/installations/{INSTALLATION}/access_tokens"
RUNNERS_401 = "GET /repos/{owner}/{repo}/actions/runners 401"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def secret_fragments(keys: AppKeyPair) -> list[str]:
    """Pieces of the private key that must never show up anywhere."""
    body = [line for line in keys.private_pem.splitlines() if line and not line.startswith("-----")]
    return [keys.private_pem, *body]


@pytest.fixture(scope="module")
def keys() -> AppKeyPair:
    return generate_app_key()


@pytest.fixture(scope="module")
def other_keys() -> AppKeyPair:
    return generate_app_key()


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(claims: dict[str, Any], key: rsa.RSAPrivateKey, header: dict[str, Any] | None = None) -> str:
    """An independent JWT signer, so the simulator's checks are not tested with the code under test."""
    head = b64url(json.dumps(header or {"alg": "RS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    signature = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{b64url(signature)}"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder(httpx.AsyncBaseTransport):
    """A real loopback transport that remembers every credential sent and every body received,
    so tests can check that none of them leaks into errors or reprs."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.authorizations: list[str] = []
        self.bodies: list[bytes] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.authorizations.append(request.headers.get("authorization", ""))
        response = await self._inner.handle_async_request(request)
        self.bodies.append(await response.aread())
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()

    def secrets(self) -> list[str]:
        found = [value.partition(" ")[2] for value in self.authorizations if value]
        for body in self.bodies:
            try:
                parsed = json.loads(body)
            except ValueError:
                continue
            if isinstance(parsed, dict) and isinstance(parsed.get("token"), str):
                found.append(parsed["token"])
        return found


def assert_no_secrets(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret and secret not in text


@asynccontextmanager
async def app_simulator(keys: AppKeyPair, **kwargs: Any) -> AsyncIterator[GitHubSimulator]:
    sim = GitHubSimulator(
        token=PAT,
        app_id=APP_ID,
        app_public_key_pem=keys.public_pem,
        installation_id=INSTALLATION,
        **kwargs,
    )
    await sim.start()  # 127.0.0.1, port chosen by the kernel
    try:
        yield sim
    finally:
        await sim.stop()


@asynccontextmanager
async def provider_for(
    sim: GitHubSimulator, keys: AppKeyPair, **kwargs: Any
) -> AsyncIterator[InstallationTokenProvider]:
    kwargs.setdefault("installation_id", INSTALLATION)
    provider = InstallationTokenProvider(sim.url, APP_ID, private_key_pem=keys.private_pem, **kwargs)
    try:
        yield provider
    finally:
        await provider.aclose()


@asynccontextmanager
async def client_for(
    sim: GitHubSimulator, source: TokenSource, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[GitHubClient]:
    # No github.token: with a token source the client must not need one.
    settings = GitHubSettings(api_url=sim.url, repository="acme/widgets")
    client = GitHubClient(settings, token_source=source, transport=transport)
    try:
        yield client
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------------------------
# The JWT
# ---------------------------------------------------------------------------------------------


def test_app_jwt_is_rs256_signed_with_bounded_claims(keys: AppKeyPair) -> None:
    now = 1_750_000_000.7
    token = app_jwt(APP_ID, keys.private_pem, now=now)
    parts = token.split(".")
    assert len(parts) == 3 and all(parts) and "=" not in token
    header = json.loads(b64url_decode(parts[0]))
    claims = json.loads(b64url_decode(parts[1]))
    assert header == {"alg": "RS256", "typ": "JWT"}
    keys.key.public_key().verify(
        b64url_decode(parts[2]), f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    assert claims["iss"] == str(APP_ID)
    assert claims["iat"] == int(now) - 60  # backdated for clock drift
    assert int(now) < claims["exp"] <= int(now) + 600
    assert claims["exp"] - claims["iat"] <= 600
    assert all(isinstance(claims[name], int) for name in ("iat", "exp"))


def test_app_jwt_signature_fails_against_another_key(keys: AppKeyPair, other_keys: AppKeyPair) -> None:
    head, body, signature = app_jwt("Iv1.client", keys.private_pem).split(".")
    with pytest.raises(InvalidSignature):
        other_keys.key.public_key().verify(
            b64url_decode(signature), f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )


def test_unusable_private_keys_fail_clearly_without_quoting_the_key(keys: AppKeyPair) -> None:
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    with pytest.raises(ValueError, match="must be RSA") as not_rsa:
        app_jwt(APP_ID, ec_pem)
    assert_no_secrets(str(not_rsa.value), *ec_pem.splitlines()[1:-1])

    mangled = keys.private_pem[: len(keys.private_pem) // 2] + "\n-----END PRIVATE KEY-----\n"
    with pytest.raises(ValueError, match="not an unencrypted PEM private key") as garbage:
        load_private_key(mangled)
    assert_no_secrets(str(garbage.value), *secret_fragments(keys)[1:])
    assert garbage.value.__cause__ is None and garbage.value.__suppress_context__


# ---------------------------------------------------------------------------------------------
# The simulator's App endpoint
# ---------------------------------------------------------------------------------------------


async def test_simulator_issues_installation_tokens_for_a_valid_jwt(keys: AppKeyPair) -> None:
    async with app_simulator(keys) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        jwt = app_jwt(APP_ID, keys.private_pem)
        answer = await http.post(ACCESS_TOKENS, headers={"Authorization": f"Bearer {jwt}"})
        assert answer.status_code == 201
        body = answer.json()
        assert body["token"].startswith("ghs_")
        assert body["expires_at"].endswith("Z")
        expires = time.mktime(time.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        assert 3500 < expires - time.time() <= 3600
        assert body["permissions"]["administration"] == "write"
        assert body["repository_selection"] in ("all", "selected")
        assert sim.token_exchanges == 1

        # The installation token, and still the static token, work on the REST API...
        for credential in (body["token"], PAT):
            listed = await http.get(RUNNERS, headers={"Authorization": f"Bearer {credential}"})
            assert listed.status_code == 200
        # ...but the JWT does not, and only the JWT works on the /app endpoint.
        listed = await http.get(RUNNERS, headers={"Authorization": f"Bearer {jwt}"})
        assert listed.status_code == 401 and listed.json()["message"] == "Bad credentials"
        for credential in (body["token"], PAT):
            refused = await http.post(ACCESS_TOKENS, headers={"Authorization": f"Bearer {credential}"})
            assert refused.status_code == 401

        unknown = await http.post(
            "/app/installations/99/access_tokens", headers={"Authorization": f"Bearer {jwt}"}
        )
        assert unknown.status_code == 404
        assert sim.token_exchanges == 1


def bad_jwts(keys: AppKeyPair, other_keys: AppKeyPair) -> dict[str, str]:
    now = int(time.time())
    good = {"iat": now - 60, "exp": now + 540, "iss": str(APP_ID)}
    unsigned = b64url(json.dumps({"alg": "none"}).encode()) + "." + b64url(json.dumps(good).encode()) + "."
    return {
        "expired": sign({**good, "iat": now - 700, "exp": now - 100}, keys.key),
        "lifetime over ten minutes": sign({**good, "exp": now + 660}, keys.key),
        "issued in the future": sign({**good, "iat": now + 300, "exp": now + 600}, keys.key),
        "another app": sign({**good, "iss": "1"}, keys.key),
        "no issuer": sign({"iat": good["iat"], "exp": good["exp"]}, keys.key),
        "another key": sign(good, other_keys.key),
        "alg none": unsigned,
        "HS256 header": sign(good, keys.key, header={"alg": "HS256", "typ": "JWT"}),
        "tampered claims": ".".join(
            [
                sign(good, keys.key).split(".")[0],
                b64url(json.dumps({**good, "iss": "1"}).encode()),
                sign(good, keys.key).split(".")[2],
            ]
        ),
        "not a jwt": "definitely-not-a-jwt",
    }


async def test_simulator_rejects_bad_jwts_with_401(keys: AppKeyPair, other_keys: AppKeyPair) -> None:
    async with app_simulator(keys) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        good = sign({"iat": int(time.time()) - 60, "exp": int(time.time()) + 540, "iss": APP_ID}, keys.key)
        accepted = await http.post(ACCESS_TOKENS, headers={"Authorization": f"Bearer {good}"})
        assert accepted.status_code == 201, "an integer iss is as good as a string one"
        for case, jwt in bad_jwts(keys, other_keys).items():
            answer = await http.post(ACCESS_TOKENS, headers={"Authorization": f"Bearer {jwt}"})
            assert answer.status_code == 401, case
        assert sim.token_exchanges == 1


async def test_simulator_expires_and_revokes_installation_tokens(keys: AppKeyPair) -> None:
    jwt_header = {"Authorization": f"Bearer {app_jwt(APP_ID, keys.private_pem)}"}
    # A zero lifetime makes every token expired the moment it is issued: no waiting needed.
    async with (
        app_simulator(keys, installation_token_ttl_s=0) as sim,
        httpx.AsyncClient(base_url=sim.url) as http,
    ):
        token = (await http.post(ACCESS_TOKENS, headers=jwt_header)).json()["token"]
        answer = await http.get(RUNNERS, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 401 and answer.json()["message"] == "Bad credentials"

    async with app_simulator(keys) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        token = (await http.post(ACCESS_TOKENS, headers=jwt_header)).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        assert (await http.get(RUNNERS, headers=auth)).status_code == 200
        sim.revoke_installation_tokens()
        assert (await http.get(RUNNERS, headers=auth)).status_code == 401
        assert (await http.get(RUNNERS, headers={"Authorization": f"Bearer {PAT}"})).status_code == 200


async def test_simulator_without_an_app_has_no_app_endpoint() -> None:
    async with GitHubSimulator(token=PAT) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        answer = await http.post(ACCESS_TOKENS, headers={"Authorization": f"Bearer {PAT}"})
        assert answer.status_code == 404
        with pytest.raises(RuntimeError):
            sim.revoke_installation_tokens()
    with pytest.raises(ValueError):
        GitHubSimulator(app_id=APP_ID)


# ---------------------------------------------------------------------------------------------
# InstallationTokenProvider + GitHubClient, end to end
# ---------------------------------------------------------------------------------------------


async def test_installation_token_is_cached_across_api_calls(keys: AppKeyPair) -> None:
    async with (
        app_simulator(keys) as sim,
        provider_for(sim, keys) as provider,
        client_for(sim, provider) as client,
    ):
        assert await client.list_runners() == []
        assert await client.find_runner("nope") is None
        assert sim.token_exchanges == 1
        assert sim.calls["GET /repos/{owner}/{repo}/actions/runners 200"] == 2


async def test_token_is_refreshed_within_the_margin_before_expiry(keys: AppKeyPair) -> None:
    # The simulator keeps real time, so the token lives just past the 300 s margin and the
    # controlled clock only needs to move about 30 s: the JWTs it signs stay acceptable.
    clock = Clock(time.time())
    async with (
        app_simulator(keys, installation_token_ttl_s=330) as sim,
        provider_for(sim, keys, clock=clock, refresh_margin_s=300) as provider,
    ):
        first = await provider.token()
        assert provider.expires_at is not None
        refresh_at = provider.expires_at - 300

        clock.now = refresh_at - 1
        assert await provider.token() == first
        assert sim.token_exchanges == 1

        clock.now = refresh_at
        second = await provider.token()
        assert second != first
        assert sim.token_exchanges == 2
        assert provider.expires_at is not None
        clock.now = provider.expires_at - 301
        assert await provider.token() == second
        assert sim.token_exchanges == 2


async def test_a_revoked_token_is_refreshed_once_and_the_call_succeeds(keys: AppKeyPair) -> None:
    async with (
        app_simulator(keys) as sim,
        provider_for(sim, keys) as provider,
        client_for(sim, provider) as client,
    ):
        await client.list_runners()
        assert sim.token_exchanges == 1
        sim.revoke_installation_tokens()

        # Two requests fail with the same revoked token at once; one exchange serves both.
        runners, found = await asyncio.gather(client.list_runners(), client.find_runner("x"))
        assert runners == [] and found is None
        assert sim.token_exchanges == 2
        assert sim.calls[RUNNERS_401] == 2
        await client.list_runners()
        assert sim.token_exchanges == 2 and sim.calls[RUNNERS_401] == 2


async def test_a_token_rejected_twice_raises_after_exactly_one_retry(keys: AppKeyPair) -> None:
    recorder = Recorder()
    async with (
        app_simulator(keys, installation_token_ttl_s=0) as sim,
        provider_for(sim, keys, transport=recorder) as provider,
        client_for(sim, provider) as client,
    ):
        with pytest.raises(GitHubError) as raised:
            await client.list_runners()
        assert raised.value.status == 401 and not raised.value.retryable
        assert "installation token" in str(raised.value)
        assert sim.token_exchanges == 2 and sim.calls[RUNNERS_401] == 2
        assert_no_secrets(str(raised.value) + repr(raised.value), *recorder.secrets())


async def test_concurrent_callers_share_one_exchange(keys: AppKeyPair) -> None:
    async with app_simulator(keys) as sim, provider_for(sim, keys) as provider:
        tokens = await asyncio.gather(*(provider.token() for _ in range(20)))
        assert len(set(tokens)) == 1
        assert sim.token_exchanges == 1 and provider.exchanges == 1


async def test_invalidating_a_superseded_token_keeps_the_current_one(keys: AppKeyPair) -> None:
    async with app_simulator(keys) as sim, provider_for(sim, keys) as provider:
        old = await provider.token()
        provider.invalidate(old)
        new = await provider.token()
        assert new != old
        provider.invalidate(old)  # a late 401 for the old token
        assert await provider.token() == new
        assert sim.token_exchanges == 2


async def test_a_wrong_private_key_gives_a_clear_secret_free_error(
    keys: AppKeyPair, other_keys: AppKeyPair
) -> None:
    recorder = Recorder()
    async with (
        app_simulator(keys) as sim,
        provider_for(sim, other_keys, transport=recorder) as provider,
        client_for(sim, provider) as client,
    ):
        with pytest.raises(GitHubError) as raised:
            await client.list_runners()
        error = raised.value
        assert error.status == 401 and not error.retryable
        assert "the App JWT was rejected: check github.app_id and the private key" in str(error)
        assert sim.token_exchanges == 0
        assert sim.calls["GET /repos/{owner}/{repo}/actions/runners"] == 0
        jwts = recorder.secrets()
        assert len(jwts) == 1 and jwts[0].count(".") == 2
        for text in (str(error), repr(error), repr(provider)):
            assert_no_secrets(text, *jwts, *secret_fragments(other_keys))


async def test_an_unknown_installation_names_the_installation(keys: AppKeyPair) -> None:
    async with app_simulator(keys) as sim, provider_for(sim, keys, installation_id=99) as provider:
        with pytest.raises(GitHubError) as raised:
            await provider.token()
        assert raised.value.status == 404 and not raised.value.retryable
        assert "installation 99 not found for this App" in str(raised.value)


async def test_no_secret_reaches_a_repr_or_an_error(keys: AppKeyPair) -> None:
    recorder = Recorder()
    async with (
        app_simulator(keys) as sim,
        provider_for(sim, keys, transport=recorder) as provider,
        client_for(sim, provider, transport=recorder) as client,
    ):
        await client.list_runners()
        with pytest.raises(GitHubError) as raised:
            await client.generate_jit_config("", ["self-hosted"])  # 422: empty name
        secrets = recorder.secrets()
        assert len(secrets) >= 3  # the JWT, the token as received, the token as sent
        for text in (repr(provider), str(provider), repr(raised.value), str(raised.value)):
            assert_no_secrets(text, *secrets, *secret_fragments(keys))
        assert "installation_id=7" in repr(provider)


# ---------------------------------------------------------------------------------------------
# Exchange failures that the simulator does not produce
# ---------------------------------------------------------------------------------------------


def mock_provider(
    keys: AppKeyPair, handler: Callable[[httpx.Request], httpx.Response]
) -> InstallationTokenProvider:
    return InstallationTokenProvider(
        "https://api.example.test",
        APP_ID,
        INSTALLATION,
        keys.private_pem,
        transport=httpx.MockTransport(handler),
    )


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_exchange_server_errors_are_retryable(keys: AppKeyPair, status: int) -> None:
    provider = mock_provider(keys, lambda request: httpx.Response(status, json={"message": "boom"}))
    with pytest.raises(GitHubError) as raised:
        await provider.token()
    await provider.aclose()
    assert raised.value.status == status and raised.value.retryable


async def test_exchange_transport_errors_are_retryable(keys: AppKeyPair) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    provider = mock_provider(keys, refuse)
    with pytest.raises(GitHubError) as raised:
        await provider.token()
    await provider.aclose()
    assert raised.value.status is None and raised.value.retryable


async def test_a_malformed_token_response_does_not_echo_the_token(keys: AppKeyPair) -> None:
    leaked = "ghs_this-must-not-appear-anywhere"
    provider = mock_provider(
        keys, lambda request: httpx.Response(201, json={"token": leaked, "expires_at": "soon"})
    )
    with pytest.raises(GitHubError) as raised:
        await provider.token()
    await provider.aclose()
    assert "expires_at" in str(raised.value)
    assert_no_secrets(str(raised.value) + repr(raised.value), leaked)


async def test_an_error_body_echoing_the_jwt_is_redacted(keys: AppKeyPair) -> None:
    seen: list[str] = []

    def echo(request: httpx.Request) -> httpx.Response:
        jwt = request.headers["authorization"].partition(" ")[2]
        seen.append(jwt)
        return httpx.Response(401, json={"message": f"could not decode {jwt}"})

    provider = mock_provider(keys, echo)
    with pytest.raises(GitHubError) as raised:
        await provider.token()
    await provider.aclose()
    assert seen and "<redacted>" in str(raised.value)
    assert_no_secrets(str(raised.value), *seen)


# ---------------------------------------------------------------------------------------------
# Static tokens (PATs) keep their old behaviour
# ---------------------------------------------------------------------------------------------


async def test_a_static_token_is_sent_as_before_and_a_401_is_not_retried() -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["authorization"])
        return httpx.Response(401, json={"message": "Bad credentials"})

    settings = GitHubSettings(repository="acme/widgets", token=PAT)
    client = GitHubClient(settings, transport=httpx.MockTransport(handler))
    with pytest.raises(GitHubError) as raised:
        await client.list_runners()
    await client.aclose()
    assert sent == [f"Bearer {PAT}"]  # the same token would fail again: no second request
    assert raised.value.status == 401 and "github.token" in str(raised.value)
    assert_no_secrets(str(raised.value), PAT)


async def test_static_token_source_is_opaque() -> None:
    source = StaticToken(PAT)
    assert await source.token() == PAT
    source.invalidate(PAT)
    assert await source.token() == PAT
    assert PAT not in repr(source) and PAT not in str(source)
    with pytest.raises(ValueError):
        StaticToken("")


def test_a_client_needs_some_credential() -> None:
    with pytest.raises(ValueError, match=r"github\.token"):
        GitHubClient(GitHubSettings(repository="acme/widgets"))
