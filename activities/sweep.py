"""Sweeps: find containers and runner registrations whose owning workflow has closed, and remove them.

A workflow that was terminated, timed out or lost its worker at the wrong moment never ran
its teardown. Anything named after it that outlives it is an orphan.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.errors import backend_failure, github_failure
from activities.owners import owner_running
from mayfly.backends import BackendError, ContainerBackend, ContainerState
from mayfly.config import MayflySettings
from mayfly.dispatch import DispatchUnavailable, JobDispatcher
from mayfly.github import GitHubClient, GitHubError, RunnerBusy
from mayfly.models import JobEvent, JobInfo, job_workflow_id, owner_job_of


class SweepReport(BaseModel):
    checked: int = 0
    removed: list[str] = []
    busy: list[str] = []
    recovered: list[str] = []


class SweepActivities:
    def __init__(
        self, github: GitHubClient, backends: Mapping[str, ContainerBackend], settings: MayflySettings
    ) -> None:
        self._github = github
        self._backends = backends
        self._settings = settings
        self._prefix = settings.github.runner_name_prefix
        self._dispatcher = JobDispatcher(settings)

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

    @activity.defn(name="sweep.queued_jobs")
    async def queued_jobs(self) -> SweepReport:
        """Start workflows for queued jobs whose `queued` webhook never arrived.

        GitHub does not redeliver a failed delivery by itself. Dispatching a job that already
        has a workflow is harmless: it only signals `queued` again.
        """
        report = SweepReport()
        try:
            queued = await self._github.list_queued_jobs(min_age_s=self._settings.reconcile_min_age_s)
        except GitHubError as error:
            raise github_failure(error) from None
        repository = self._settings.github.repository or ""
        for job in queued:
            report.checked += 1
            if await owner_running(job_workflow_id(job.id)):
                continue
            info = JobInfo(
                job_id=job.id,
                run_id=job.run_id,
                run_attempt=job.run_attempt,
                repository=repository,
                name=job.name,
                labels=job.labels,
                pool="",
            )
            try:
                pool = await self._dispatcher.dispatch(
                    activity.client(), info, JobEvent(action="queued", job_id=job.id)
                )
            except DispatchUnavailable as error:
                raise ApplicationError(str(error), type="TemporalUnavailable") from None
            if pool is not None:
                activity.logger.warning("job %s was queued but had no workflow; started one", job.id)
                report.recovered.append(f"job {job.id}")
        return report
