"""Container lifecycle activities, backend-agnostic."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.errors import backend_failure, redacted
from activities.heartbeat import heartbeating
from mayfly.backends import BackendError, ContainerBackend, ContainerRecord, ContainerState
from mayfly.models import ContainerExit, ContainerRef, ContainerSpec
from mayfly.sealing import Sealer, SealingError

T = TypeVar("T")


async def _running(backend: ContainerBackend, name: str, owner_workflow_id: str) -> ContainerRecord | None:
    """The container running under `name` for this owner, if any."""
    try:
        record = await backend.inspect(name)
    except BackendError:
        return None
    if (
        record is None
        or record.state is not ContainerState.RUNNING
        or record.owner_workflow_id != owner_workflow_id
    ):
        return None
    return record


class ContainerActivities:
    """Spawn runs on the shared queue; wait_exit and terminate run where the ref says.

    A host-bound container (a local process) is reachable only from the host that started
    it, so its ref names that host's queue; other containers are watched on the shared watch
    queue. Both are served by workers with slots for thousands of watchers, because a watcher
    holds its slot for the runner's whole life.
    """

    def __init__(
        self,
        backends: Mapping[str, ContainerBackend],
        sealer: Sealer,
        *,
        host_task_queue: str | None = None,
        watch_task_queue: str | None = None,
        poll_interval_s: float = 1.0,
    ) -> None:
        self._backends = backends
        self._sealer = sealer
        self._host_task_queue = host_task_queue
        self._watch_task_queue = watch_task_queue
        self._poll_interval_s = poll_interval_s

    def _backend(self, pool: str) -> ContainerBackend:
        try:
            return self._backends[pool]
        except KeyError:
            raise ApplicationError(
                f"this worker has no backend for pool {pool!r}", type="UnknownPool", non_retryable=True
            ) from None

    @activity.defn(name="containers.spawn")
    async def spawn(self, spec: ContainerSpec) -> ContainerRef:
        backend = self._backend(spec.pool)
        queue = self._host_task_queue if backend.host_bound else self._watch_task_queue
        if backend.host_bound:
            # An earlier attempt may have started the process on another host, and only that host
            # can adopt it: starting a second one here would put two runners under one slot.
            # Each attempt names its host in its heartbeat before it creates anything.
            earlier = activity.info().heartbeat_details
            if earlier and isinstance(earlier[0], str) and earlier[0] != queue:
                activity.logger.warning(
                    "%s: an earlier attempt ran on %s; leaving it there", spec.name, earlier[0]
                )
                return ContainerRef(pool=spec.pool, name=spec.name, backend_id="", task_queue=earlier[0])
            activity.heartbeat(queue)
        try:
            jit_config = self._sealer.open(spec.jit_config, context=spec.runner_name)
        except SealingError as error:
            raise ApplicationError(str(error), type="SealingError", non_retryable=True) from None
        try:
            record = await heartbeating(
                backend.spawn(
                    name=spec.name,
                    owner_workflow_id=spec.owner_workflow_id,
                    job_id=spec.job_id,
                    jit_config=jit_config,
                    max_lifetime_s=spec.max_lifetime_s,
                ),
                *([queue] if backend.host_bound else []),
            )
        except Exception as error:
            # The provider may have created the container before failing (a lost response): look
            # before reporting a failure, and adopt what is running under our name.
            adopted = await _running(backend, spec.name, spec.owner_workflow_id)
            if adopted is not None:
                activity.logger.info(
                    "%s: spawn failed (%s) but the container runs; adopted", spec.name, error
                )
                return ContainerRef(
                    pool=spec.pool, name=adopted.name, backend_id=adopted.backend_id, task_queue=queue
                )
            if isinstance(error, BackendError):
                # A provider may echo the environment it was given; the failure lands in history.
                raise backend_failure(error, redact=[jit_config]) from None
            raise ApplicationError(
                redacted(f"{type(error).__name__}: {error}", [jit_config]), type="SpawnFailed"
            ) from None
        return ContainerRef(pool=spec.pool, name=record.name, backend_id=record.backend_id, task_queue=queue)

    @activity.defn(name="containers.wait_exit")
    async def wait_exit(self, ref: ContainerRef) -> ContainerExit:
        backend = self._backend(ref.pool)
        while True:
            try:
                record = await backend.inspect(ref.name)
            except BackendError as error:
                raise backend_failure(error) from None
            if record is None:
                return ContainerExit(exit_code=None)
            if record.state is not ContainerState.RUNNING:
                # Confirmed gone here, in the same activity: a separate terminate after every
                # exit cost each job a workflow task and an activity round trip of slot time.
                try:
                    await backend.terminate(ref.name)
                except BackendError as error:
                    raise backend_failure(error) from None
                return ContainerExit(exit_code=record.exit_code, gone=True)
            if record.expires_at is not None and time.time() >= record.expires_at:
                # Enforced here too, so a runner outlives its max lifetime by one poll at most,
                # whatever its workflow is doing.
                activity.logger.warning("terminating %s: it reached its max lifetime", ref.name)
                try:
                    record = await backend.terminate(ref.name)
                except BackendError as error:
                    raise backend_failure(error) from None
                return ContainerExit(exit_code=record.exit_code if record else None, gone=True)
            activity.heartbeat()
            await backend.wait(ref.name, self._poll_interval_s)

    @activity.defn(name="containers.terminate")
    async def terminate(self, ref: ContainerRef) -> ContainerExit:
        try:
            record = await self._backend(ref.pool).terminate(ref.name)
        except BackendError as error:
            raise backend_failure(error) from None
        return ContainerExit(exit_code=record.exit_code if record else None)
