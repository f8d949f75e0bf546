"""Sweeps: find containers and runner registrations whose owning workflow has closed, and remove them.

A workflow that was terminated, timed out or lost its worker at the wrong moment never ran
its teardown. Anything named after it that outlives it is an orphan.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from pydantic import BaseModel
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError

from activities.errors import backend_failure, github_failure
from activities.github import client_for_scope
from activities.heartbeat import heartbeating
from activities.owners import owner_running, workflow_status
from mayfly.backends import BackendError, ContainerBackend, ContainerRecord, ContainerState
from mayfly.config import MayflySettings
from mayfly.dispatch import DispatchUnavailable, JobDispatcher
from mayfly.github import GitHubClient, Runner, WorkflowJob
from mayfly.github_errors import GitHubError, RunnerBusy
from mayfly.models import RUNNER_JOB_WORKFLOW, JobEvent, JobInfo, job_workflow_id
from mayfly.warm import owner_workflow_of

T = TypeVar("T")


class SweepReport(BaseModel):
    checked: int = 0
    removed: list[str] = []
    busy: list[str] = []
    recovered: list[str] = []
    gave_up: list[str] = []


async def remove_orphans(
    what: str,
    named: Iterable[tuple[T, str, str | None]],
    remove: Callable[[T], Awaitable[bool]],
) -> SweepReport:
    """Remove the items (each with its name and owning workflow id, None if not ours) whose owner
    has closed. `remove` answers False for one still in use, left for the next sweep. A heartbeat
    per item lets a long sweep show its progress."""
    report = SweepReport()
    for item, name, owner in named:
        if owner is None:
            continue
        report.checked += 1
        activity.heartbeat(name)
        if await owner_running(owner):
            continue
        if await remove(item):
            activity.logger.warning("removed orphan %s %s of %s", what, name, owner)
            report.removed.append(name)
        else:
            report.busy.append(name)
    return report


async def _running_job_workflows(client: Client) -> set[str]:
    query = f'WorkflowType = "{RUNNER_JOB_WORKFLOW}" AND ExecutionStatus = "Running"'
    return {execution.id async for execution in client.list_workflows(query)}


class SweepActivities:
    def __init__(
        self,
        clients: Mapping[str, GitHubClient],
        backends: Mapping[str, ContainerBackend],
        settings: MayflySettings,
    ) -> None:
        self._clients = clients
        self._backends = backends
        self._settings = settings
        self._dispatcher = JobDispatcher(settings)

    def _client(self, scope: str) -> GitHubClient:
        return client_for_scope(self._clients, scope)

    async def _still_open(self, scope: str, job: WorkflowJob) -> bool:
        try:
            current = await self._client(scope).get_job(job.repository, job.id)
        except GitHubError as error:
            raise github_failure(error) from None
        return current is not None and current.status in ("queued", "waiting")

    @activity.defn(name="sweep.containers")
    async def containers(self, pool: str) -> SweepReport:
        backend = self._backends.get(pool)
        if backend is None:
            return SweepReport()

        async def terminate(record: ContainerRecord) -> bool:
            await backend.terminate(record.name)
            return True

        try:
            records = await heartbeating(backend.list(), "listing")
            running = [(r, r.name, r.owner_workflow_id) for r in records if r.state is ContainerState.RUNNING]
            return await remove_orphans("container", running, terminate)
        except BackendError as error:
            raise backend_failure(error) from None

    @activity.defn(name="sweep.registrations")
    async def registrations(self, scope: str) -> SweepReport:
        """One scope's registrations: only runners named with its prefix are ours to remove."""
        github = self._client(scope)
        prefix = self._settings.runner_prefix(scope)

        async def delete(runner: Runner) -> bool:
            try:
                await github.delete_runner(runner.id)
            except RunnerBusy:
                # Still running a job; GitHub frees it when that ends.
                return False
            return True

        try:
            runners = await heartbeating(github.list_runners(), "listing")
            named = [(r, r.name, owner_workflow_of(r.name, prefix)) for r in runners]
            return await remove_orphans("runner registration", named, delete)
        except GitHubError as error:
            raise github_failure(error) from None

    @activity.defn(name="sweep.queued_jobs")
    async def queued_jobs(self, scope: str) -> SweepReport:
        """Give every job GitHub still has queued (or waiting) a running workflow.

        GitHub does not redeliver a failed delivery by itself, and a workflow can close without
        serving its job (it failed, or an operator terminated or cancelled it). A job is given a
        new workflow at most `max_job_restarts` times, and never once it is older than the job
        deadline.
        """
        report = SweepReport()
        settings = self._settings
        try:
            open_jobs = await heartbeating(
                self._client(scope).list_open_jobs(min_age_s=settings.reconcile_min_age_s), "listing"
            )
        except GitHubError as error:
            raise github_failure(error) from None
        if not open_jobs:
            return report
        client = activity.client()
        running = await heartbeating(_running_job_workflows(client), "listing workflows")
        oldest = datetime.now(UTC) - timedelta(seconds=settings.job_deadline_s)
        for job in open_jobs:
            report.checked += 1
            workflow_id = job_workflow_id(job.id, settings.runner_prefix(scope))
            if workflow_id in running:
                continue
            activity.heartbeat(job.id)
            status = await workflow_status(workflow_id)
            if status == WorkflowExecutionStatus.RUNNING:
                continue  # started after the listing
            if job.created_at is not None and job.created_at < oldest:
                continue
            if status is not None and not await self._still_open(scope, job):
                # Served since the listing was taken: a listing of thousands of jobs, walked by
                # a loaded worker, is minutes old by the time it reaches the last of them.
                continue
            if status is not None:
                runs = (await client.count_workflows(f'WorkflowId = "{workflow_id}"')).count
                if runs > settings.max_job_restarts:
                    activity.logger.warning(
                        "job %s is still %s on GitHub after %d workflows; not starting another",
                        job.id,
                        job.status,
                        runs,
                    )
                    report.gave_up.append(f"job {job.id}")
                    continue
            info = JobInfo.unrouted(job, job.repository, scope)
            action = "waiting" if job.status == "waiting" else "queued"
            try:
                pool = await self._dispatcher.dispatch(
                    client, info, JobEvent(action=action, job_id=job.id), restart_closed=status is not None
                )
            except DispatchUnavailable as error:
                raise ApplicationError(str(error), type="TemporalUnavailable") from None
            if pool is None:
                continue
            if status is None:
                activity.logger.warning(
                    "job %s was %s with no workflow (webhook lost); started one", job.id, job.status
                )
            else:
                activity.logger.warning(
                    "job %s was %s but its workflow had closed (%s); started a new one",
                    job.id,
                    job.status,
                    status.name,
                )
            report.recovered.append(f"job {job.id}")
        return report
