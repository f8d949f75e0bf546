"""Turn one `workflow_job` event into Temporal calls: signal-with-start the job's workflow,
and tell the workflow that owns the runner named in the event.

Used by the webhook starter and by the reconciler that recovers missed deliveries, so both
rely on the same Temporal id policies for deduplication instead of any in-memory state.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from mayfly import search_attributes
from mayfly.config import MayflySettings, PoolSettings
from mayfly.models import (
    RUNNER_JOB_WORKFLOW,
    JobEvent,
    JobInfo,
    RunnerJobInput,
    job_workflow_id,
)
from mayfly.warm import owner_workflow_of

# Well inside GitHub's 10 s delivery timeout.
RPC_TIMEOUT = timedelta(seconds=5)
# The request itself is at fault (a payload over Temporal's size limits, say); redelivering the
# same event cannot help. Every other status (throttling, outages, timeouts, auth or namespace
# trouble on our side) is transient or ours to fix, and the event may succeed when redelivered.
_REJECTED = (RPCStatusCode.INVALID_ARGUMENT,)


class DispatchUnavailable(Exception):
    """Temporal could not take the event now (unreachable, throttled, misconfigured); the caller
    should let it be delivered again."""


class DispatchRejected(Exception):
    """Temporal refused the event as invalid; redelivering it would fail the same way."""


def _classify(error: RPCError) -> Exception:
    if error.status in _REJECTED:
        return DispatchRejected(f"{error.status.name}: {error.message}")
    return DispatchUnavailable(f"{error.status.name}: {error.message}")


class JobDispatcher:
    def __init__(self, settings: MayflySettings) -> None:
        self._settings = settings

    def workflow_input(self, job: JobInfo, pool: PoolSettings) -> RunnerJobInput:
        return RunnerJobInput(
            job=job.model_copy(update={"pool": pool.name}),
            recipe=self._settings.runner_recipe(pool, job.scope),
            max_registration_attempts=pool.max_registration_attempts,
            idle_ttl_s=pool.idle_ttl_s,
            job_deadline_s=self._settings.job_deadline_s,
        )

    async def dispatch(
        self, client: Client, job: JobInfo, event: JobEvent, *, restart_closed: bool = False
    ) -> str | None:
        """The pool the job went to, or None when no pool serves its labels.

        A job's workflow runs once: a redelivered event for a finished job starts nothing.
        Only the reconciler, which has asked GitHub that the job still needs a runner, passes
        `restart_closed` to start a new run after a closed one."""
        if job.scope not in self._settings.github_scopes:
            return None
        pool = self._settings.pool_for(job.labels, job.scope)
        if pool is None:
            return None
        await self._signal_with_start(client, job, pool, event, restart_closed=restart_closed)
        prefix = self._settings.runner_prefix(job.scope)
        owner = owner_workflow_of(event.runner_name or "", prefix)
        if owner is not None and owner != job_workflow_id(job.job_id, prefix):
            # The runner that took this job was started by another job's workflow or is a warm
            # runner; tell its workflow too.
            await self._signal_existing(client, owner, event)
        return pool.name

    async def _signal_with_start(
        self, client: Client, job: JobInfo, pool: PoolSettings, event: JobEvent, *, restart_closed: bool
    ) -> None:
        labels = ", ".join(job.labels)
        try:
            await client.start_workflow(
                # By name: the core knows the workflow's contract (its name and input), not its code.
                RUNNER_JOB_WORKFLOW,
                self.workflow_input(job, pool),
                id=job_workflow_id(job.job_id, self._settings.runner_prefix(job.scope)),
                task_queue=self._settings.temporal.task_queue,
                start_signal="job_event",
                start_signal_args=[event],
                id_reuse_policy=(
                    WorkflowIDReusePolicy.ALLOW_DUPLICATE
                    if restart_closed
                    else WorkflowIDReusePolicy.REJECT_DUPLICATE
                ),
                static_summary=f"{job.repository} job {job.job_id} ({pool.name})",
                static_details=(
                    f"**Repository:** {job.repository}  \n**Job:** {job.name} (id {job.job_id}, "
                    f"run {job.run_id} attempt {job.run_attempt})  \n**Labels:** {labels}  \n"
                    f"**Pool:** {pool.name}  \n**Scope:** {job.scope}"
                ),
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(search_attributes.POOL, pool.name),
                        SearchAttributePair(search_attributes.REPOSITORY, job.repository),
                        SearchAttributePair(search_attributes.SCOPE, job.scope),
                        SearchAttributePair(search_attributes.JOB_ID, job.job_id),
                        SearchAttributePair(search_attributes.STATE, "queued"),
                    ]
                ),
                rpc_timeout=RPC_TIMEOUT,
            )
        except WorkflowAlreadyStartedError:
            pass  # the job's workflow has already finished: this is a late or duplicate event
        except RPCError as error:
            raise _classify(error) from error

    async def _signal_existing(self, client: Client, workflow_id: str, event: JobEvent) -> None:
        try:
            await client.get_workflow_handle(workflow_id).signal("job_event", event, rpc_timeout=RPC_TIMEOUT)
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return
            raise _classify(error) from error
