"""Build the GitHub client the settings ask for: PAT or GitHub App installation tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from mayfly.config import ConfigError, GitHubSettings, MayflySettings
from mayfly.github import GitHubClient
from mayfly.github_app import InstallationTokenProvider


@asynccontextmanager
async def github_client(settings: GitHubSettings) -> AsyncIterator[GitHubClient]:
    if not settings.uses_app:
        if settings.token is None:
            raise ConfigError("github: set github.token (a PAT) or the github.app_* fields")
        client = GitHubClient(settings)
        try:
            yield client
        finally:
            await client.aclose()
        return
    assert settings.app_id is not None and settings.installation_id is not None
    try:
        provider = InstallationTokenProvider(
            settings.api_url,
            settings.app_id,
            settings.installation_id,
            settings.private_key_pem(),
            request_timeout_s=settings.request_timeout_s,
        )
    except ValueError as error:
        raise ConfigError(f"github.private_key: {error}") from None
    client = GitHubClient(settings, token_source=provider)
    try:
        yield client
    finally:
        await client.aclose()
        await provider.aclose()


@asynccontextmanager
async def scope_clients(settings: MayflySettings) -> AsyncIterator[dict[str, GitHubClient]]:
    """One client per scope, each with the scope's own credential and API URL."""
    async with AsyncExitStack() as stack:
        yield {
            scope: await stack.enter_async_context(github_client(github))
            for scope, github in settings.github_scopes.items()
        }
