"""Build the backend each pool asks for."""

from __future__ import annotations

from mayfly.backends.base import ContainerBackend
from mayfly.backends.local import LocalProcessBackend
from mayfly.backends.modal import ModalBackend
from mayfly.config import LocalBackendSettings, MayflySettings


def build_backends(settings: MayflySettings) -> dict[str, ContainerBackend]:
    backends: dict[str, ContainerBackend] = {}
    for pool in settings.pools:
        if isinstance(pool.backend, LocalBackendSettings):
            backends[pool.name] = LocalProcessBackend(pool.backend)
        else:
            backends[pool.name] = ModalBackend(pool.backend, pool.name)
    return backends
