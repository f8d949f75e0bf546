"""Per-host container sweeps, and what slot reclaim learns from them.

Local runner processes are visible only on the host that started them, so each worker host
sweeps its own records, on its own host queue: it stops containers whose workflow has closed
(orphans) or that outlived their max lifetime, and forgets records whose exit is confirmed.
Its `HostSweeper` workflow keeps the last report. A slot whose holder closed may be reclaimed
only once every host has swept since the holder closed and none still holds a container of it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime

from pydantic import BaseModel
from temporalio import activity
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from activities.owners import owner_running
from mayfly.backends import BackendError, ContainerBackend, ContainerState
from mayfly.models import HostSweepReport

HOST_SWEEPER_WORKFLOW = "HostSweeper"
REPORT_QUERY = "report"


class HostSweepRequest(BaseModel):
    host_id: str
    pools: list[str]
    scheduled_at: datetime


class HostSweepStatus(BaseModel):
    host_id: str
    last: HostSweepReport | None = None


def host_sweeper_workflow_id(task_queue: str, host_id: str) -> str:
    return f"{task_queue}-host-{host_id}-sweeper"


class HostSweepActivities:
    def __init__(self, backends: Mapping[str, ContainerBackend]) -> None:
        self._backends = backends

    @activity.defn(name="sweep.host_containers")
    async def host_containers(self, request: HostSweepRequest) -> HostSweepReport:
        report = HostSweepReport(host_id=request.host_id, scheduled_at=request.scheduled_at)
        unremoved: set[str] = set()
        now = time.time()
        for pool in request.pools:
            backend = self._backends.get(pool)
            if backend is None or not backend.host_bound:
                continue
            for record in await backend.list():
                report.checked += 1
                activity.heartbeat(record.name)
                running = record.state is ContainerState.RUNNING
                expired = running and record.expires_at is not None and now >= record.expires_at
                owner_alive = await owner_running(record.owner_workflow_id)
                if owner_alive and not expired:
                    continue  # its workflow tears it down (an exited one included)
                try:
                    # Also forgets the record once the exit is confirmed.
                    await backend.terminate(record.name)
                except BackendError as error:
                    activity.logger.warning("cannot yet remove %s: %s", record.name, error)
                    if not owner_alive:
                        unremoved.add(record.owner_workflow_id)
                    continue
                if running:
                    why = "outlived its max lifetime" if expired else "its workflow has closed"
                    activity.logger.warning("terminated container %s: %s", record.name, why)
                    report.removed.append(record.name)
        report.unremoved_owners = sorted(unremoved)
        return report


async def _closed_at(client: Client, workflow_id: str, run_id: str) -> datetime | None:
    try:
        description = await client.get_workflow_handle(workflow_id, run_id=run_id).describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    return description.close_time


async def host_reports(client: Client, task_queue: str) -> list[HostSweepStatus]:
    """The last sweep of every live host: one `HostSweeper` per host, found by visibility."""
    statuses = []
    query = (
        f"WorkflowType = '{HOST_SWEEPER_WORKFLOW}' AND ExecutionStatus = 'Running' "
        f"AND TaskQueue = '{task_queue}'"
    )
    async for execution in client.list_workflows(query):
        handle = client.get_workflow_handle(execution.id)
        status: HostSweepStatus = await handle.query(REPORT_QUERY, result_type=HostSweepStatus)
        statuses.append(status)
    return statuses


async def gone_from_every_host(
    client: Client, statuses: list[HostSweepStatus], workflow_id: str, run_id: str
) -> bool:
    """Whether every host has swept since this run closed, and none kept a container of it.

    A host that has stopped sweeping holds reclaim up: its processes may still run, and a slot
    is only free once its container is confirmed gone. Decommission a host by terminating its
    `HostSweeper` workflow.
    """
    if not statuses:
        return False
    closed_at = await _closed_at(client, workflow_id, run_id)
    if closed_at is None:
        # Unknown (or not closed): only a sweep scheduled from now on can vouch for it.
        closed_at = activity.info().started_time if activity.in_activity() else None
        if closed_at is None:
            return False
    for status in statuses:
        last = status.last
        if last is None or last.scheduled_at <= closed_at or workflow_id in last.unremoved_owners:
            return False
    return True
