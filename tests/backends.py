"""Fault-injecting wrappers around a real container backend, for chaos and secrets tests."""

from __future__ import annotations

from mayfly.backends import ContainerBackend, ContainerRecord


class DelegatingBackend:
    """Passes everything to the real backend; subclasses change `spawn`, or only add a step
    before it (`before_spawn`)."""

    def __init__(self, inner: ContainerBackend) -> None:
        self._inner = inner

    @property
    def host_bound(self) -> bool:
        return self._inner.host_bound

    async def spawn(
        self, *, name: str, owner_workflow_id: str, job_id: int, jit_config: str, max_lifetime_s: float
    ) -> ContainerRecord:
        await self.before_spawn(name, jit_config)
        return await self._inner.spawn(
            name=name,
            owner_workflow_id=owner_workflow_id,
            job_id=job_id,
            jit_config=jit_config,
            max_lifetime_s=max_lifetime_s,
        )

    async def before_spawn(self, name: str, jit_config: str) -> None:
        """Runs before each spawn reaches the real backend; raise to fail the spawn."""

    async def inspect(self, name: str) -> ContainerRecord | None:
        return await self._inner.inspect(name)

    async def wait(self, name: str, timeout_s: float) -> None:
        await self._inner.wait(name, timeout_s)

    async def terminate(self, name: str) -> ContainerRecord | None:
        return await self._inner.terminate(name)

    async def list(self) -> list[ContainerRecord]:
        return await self._inner.list()
