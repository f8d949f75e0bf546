"""Build the backend each pool asks for."""

from __future__ import annotations

from mayfly.backends.base import ContainerBackend
from mayfly.backends.local import LocalProcessBackend
from mayfly.config import ConfigError, LocalBackendSettings, MayflySettings


def build_backends(settings: MayflySettings) -> dict[str, ContainerBackend]:
    backends: dict[str, ContainerBackend] = {}
    for pool in settings.pools:
        if isinstance(pool.backend, LocalBackendSettings):
            backends[pool.name] = LocalProcessBackend(pool.backend)
        else:
            raise ConfigError(f"pools.{pool.name}.backend: kind {pool.backend.kind!r} is not available yet")
    return backends
