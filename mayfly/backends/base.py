"""The small interface every container backend implements.

Names are deterministic and unique per runner attempt; a backend must make `spawn` safe to
call twice with the same name (adopt, do not duplicate) and `terminate` safe to call on a
container that is already gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class ContainerState(StrEnum):
    RUNNING = "running"
    EXITED = "exited"


@dataclass(frozen=True)
class ContainerRecord:
    name: str
    backend_id: str
    owner_workflow_id: str
    job_id: int
    state: ContainerState
    exit_code: int | None = None
    # Wall-clock (epoch seconds) after which the container has outlived its max lifetime;
    # None where the provider enforces the lifetime itself (a Modal sandbox timeout).
    expires_at: float | None = None


class BackendError(Exception):
    """A backend failure. `retryable` says whether trying again may help."""

    retryable: bool = True


class NameTakenByAnother(BackendError):
    """The deterministic name is held by a container that belongs to another owner."""

    retryable = False


class ContainerBackend(Protocol):
    # True when only the worker host that spawned a container can see or stop it (local
    # processes): its wait_exit and terminate must then run on that host's task queue.
    @property
    def host_bound(self) -> bool: ...

    async def spawn(
        self, *, name: str, owner_workflow_id: str, job_id: int, jit_config: str, max_lifetime_s: float
    ) -> ContainerRecord:
        """Start the runner, or adopt the container this owner already started under `name`."""
        ...

    async def inspect(self, name: str) -> ContainerRecord | None: ...

    async def wait(self, name: str, timeout_s: float) -> None:
        """Return once the container may have exited, or after `timeout_s`; callers inspect
        afterwards. Lets an exit be seen when it happens rather than at the next poll."""
        ...

    async def terminate(self, name: str) -> ContainerRecord | None:
        """Stop the container and return only once it is confirmed gone (None if this backend has no
        record of it: never spawned, or already confirmed gone and forgotten)."""
        ...

    async def list(self) -> list[ContainerRecord]:
        """Every container this backend knows about, running or recently exited."""
        ...
