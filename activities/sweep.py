"""Sweeps: find containers and runner registrations whose owning workflow has closed, and remove them.

A workflow that was terminated, timed out or lost its worker at the wrong moment never ran
its teardown. Anything named after it that outlives it is an orphan.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.errors import backend_failure, github_failure
from mayfly.backends import BackendError, ContainerBackend, ContainerState
from mayfly.github import GitHubClient, GitHubError, RunnerBusy
from mayfly.models import job_workflow_id, owner_job_of


class SweepReport(BaseModel):
    checked: int = 0
    removed: list[str] = []
    busy: list[str] = []


async def owner_running(workflow_id: str) -> bool:
    try:
        description = await activity.client().get_workflow_handle(workflow_id).describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return description.status == WorkflowExecutionStatus.RUNNING


class SweepActivities:
    def __init__(
        self, github: GitHubClient, backends: Mapping[str, ContainerBackend], runner_name_prefix: str
    ) -> None:
        self._github = github
        self._backends = backends
        self._prefix = runner_name_prefix

    @activity.defn(name="sweep.containers")
    async def containers(self, pool: str) -> SweepReport:
        backend = self._backends.get(pool)
        report = SweepReport()
        if backend is None:
            return report
        try:
            for record in await backend.list():
                if record.state is not ContainerState.RUNNING:
                    continue
                report.checked += 1
                activity.heartbeat(record.name)
                if await owner_running(record.owner_workflow_id):
                    continue
                activity.logger.warning(
                    "terminating orphan container %s of %s", record.name, record.owner_workflow_id
                )
                await backend.terminate(record.name)
                report.removed.append(record.name)
        except BackendError as error:
            raise backend_failure(error) from None
        return report

    @activity.defn(name="sweep.registrations")
    async def registrations(self) -> SweepReport:
        report = SweepReport()
        try:
            runners = await self._github.list_runners()
            for runner in runners:
                job_id = owner_job_of(runner.name, self._prefix)
                if job_id is None:
                    continue  # not ours: never touch another system's runners
                report.checked += 1
                activity.heartbeat(runner.name)
                if await owner_running(job_workflow_id(job_id)):
                    continue
                try:
                    await self._github.delete_runner(runner.id)
                except RunnerBusy:
                    # Still running a job; GitHub frees it when that ends. Try again next sweep.
                    report.busy.append(runner.name)
                    continue
                activity.logger.warning("deleted orphan runner registration %s", runner.name)
                report.removed.append(runner.name)
        except GitHubError as error:
            raise github_failure(error) from None
        return report
