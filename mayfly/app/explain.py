"""`mayfly explain JOB_ID` and `mayfly jobs`: why a job is (not) running, without the UI.

Everything comes from what the job's workflow knows (its `state` query, or its result or
failure once closed), the pool's semaphore (queue place and holders), visibility (earlier
runs, job lists) and, for the truth, GitHub itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from urllib.parse import quote

from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.common import QueryRejectCondition

from mayfly import search_attributes
from mayfly.config import MayflySettings
from mayfly.github import GitHubClient
from mayfly.models import (
    RUNNER_JOB_WORKFLOW,
    RunnerJobResult,
    RunnerJobState,
    SemaphoreStatus,
    job_workflow_id,
    semaphore_workflow_id,
)

QUERY_TIMEOUT = timedelta(seconds=10)


def ui_link(settings: MayflySettings, workflow_id: str, run_id: str) -> str:
    base = settings.temporal.ui_url.rstrip("/")
    namespace = quote(settings.temporal.namespace, safe="")
    return f"{base}/namespaces/{namespace}/workflows/{quote(workflow_id, safe='')}/{run_id}/history"


async def _find(
    client: Client, settings: MayflySettings, job_id: int, scope: str | None
) -> tuple[str, WorkflowHandle[object, object], WorkflowExecutionDescription] | str:
    """The job's workflow in the given scope, or in the first scope that has one; else why not."""
    scopes = [scope] if scope else list(settings.github_scopes)
    errors = []
    for candidate in scopes:
        workflow_id = job_workflow_id(job_id, settings.runner_prefix(candidate))
        handle: WorkflowHandle[object, object] = client.get_workflow_handle(workflow_id)
        try:
            return candidate, handle, await handle.describe()
        except Exception as error:
            errors.append(f"{workflow_id} ({type(error).__name__})")
    return f"job {job_id}: no workflow {', '.join(errors)}; was its webhook delivered?"


async def explain(
    client: Client,
    settings: MayflySettings,
    job_id: int,
    github: Mapping[str, GitHubClient] | None,
    scope: str | None = None,
) -> list[str]:
    found = await _find(client, settings, job_id, scope)
    if isinstance(found, str):
        return [found]
    scope, handle, description = found
    workflow_id = handle.id
    runs = [run async for run in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
    status = description.status.name if description.status else "UNKNOWN"
    started = f"{description.start_time:%Y-%m-%d %H:%M:%S} UTC"
    lines = [f"job {job_id}: workflow {workflow_id} (scope {scope}), {status}, started {started}"]
    if len(runs) > 1:
        lines.append(f"  {len(runs) - 1} earlier run(s) of this workflow id (continued as new or restarted)")
    if description.status == WorkflowExecutionStatus.RUNNING:
        state = await handle.query(
            "state",
            result_type=RunnerJobState,
            rpc_timeout=QUERY_TIMEOUT,
            reject_condition=QueryRejectCondition.NONE,
        )
        lines += [
            f"  phase: {state.phase.value}; GitHub status as the workflow believes it: {state.job_status}",
            f"  runners started: {state.runners_spawned} ({state.registration_failures} failed to register); "
            f"current runner: {state.current_runner or 'none'}; served by: {state.served_by or 'nobody yet'}",
        ]
        lines += await _slot_lines(client, state, workflow_id)
        if state.last_error:
            lines.append(f"  last error: {state.last_error}")
    else:
        try:
            result = RunnerJobResult.model_validate(await handle.result(follow_runs=False))
            lines.append(
                f"  outcome: {result.outcome}; served by: {result.served_by or 'nobody'}; runners started: "
                f"{result.runners_spawned} ({result.registration_failures} failed to register); "
                f"slot held {result.slot_held_s:.0f}s"
            )
        except WorkflowFailureError as failure:
            lines.append(f"  last error: {_failure_text(failure.cause)}")
    listed = (description.search_attributes or {}).get(search_attributes.REPOSITORY.name)
    repository = str(listed[0]) if listed else (settings.github_scopes[scope].repository or "")
    lines.append(await _github_line(github.get(scope) if github else None, repository, job_id))
    lines.append(f"  UI: {ui_link(settings, workflow_id, description.run_id)}")
    return lines


async def _slot_lines(client: Client, state: RunnerJobState, workflow_id: str) -> list[str]:
    if state.slot_held:
        return [f"  slot: held in pool `{state.pool}`"]
    semaphore = client.get_workflow_handle(semaphore_workflow_id(state.pool))
    try:
        status = await semaphore.query("status", result_type=SemaphoreStatus, rpc_timeout=QUERY_TIMEOUT)
        # Without a result type the answer is the JSON value: an int, or None when not queued.
        position = await semaphore.query("queue_position", workflow_id, rpc_timeout=QUERY_TIMEOUT)
    except Exception as error:
        return [f"  slot: none; the semaphore of pool `{state.pool}` did not answer ({type(error).__name__})"]
    place = f"place {position} of {status.waiting} in the queue" if position else "not queued"
    holders = ", ".join(f"{h.workflow_id} ({h.held_for_s:.0f}s)" for h in status.holders) or "none"
    return [
        f"  slot: none; {place} of pool `{state.pool}` ({len(status.holders)}/{status.capacity} held)",
        f"  holders: {holders}",
    ]


async def _github_line(github: GitHubClient | None, repository: str, job_id: int) -> str:
    if github is None or not repository:
        return "  GitHub: not asked (no repository known for this job)"
    try:
        job = await github.get_job(repository, job_id)
    except Exception as error:
        return f"  GitHub: could not ask ({type(error).__name__}: {error})"
    if job is None:
        return f"  GitHub: job {job_id} not found in {repository}"
    runner = f" on runner {job.runner_name}" if job.runner_name else ""
    conclusion = f", {job.conclusion}" if job.conclusion else ""
    return f"  GitHub: {job.status}{conclusion}{runner}"


async def list_jobs(
    client: Client, *, pool: str | None, state: str | None, limit: int, scope: str | None = None
) -> list[str]:
    clauses = [f"WorkflowType = '{RUNNER_JOB_WORKFLOW}'"]
    if scope:
        clauses.append(f"{search_attributes.SCOPE.name} = '{_quoted(scope)}'")
    if pool:
        clauses.append(f"{search_attributes.POOL.name} = '{_quoted(pool)}'")
    if state:
        clauses.append(f"{search_attributes.STATE.name} = '{_quoted(state)}'")
    lines = []
    async for run in client.list_workflows(" AND ".join(clauses), limit=limit):
        attributes = run.search_attributes or {}
        phase = attributes.get(search_attributes.STATE.name, ["?"])[0]
        runner = attributes.get(search_attributes.RUNNER.name, ["-"])[0]
        status = run.status.name if run.status else "?"
        lines.append(f"{run.id}  {status:<10} {phase:<20} {runner}  started {run.start_time:%H:%M:%S}")
    return lines or ["no job workflows match"]


def _failure_text(error: BaseException | None) -> str:
    """A failure and its causes in one line: an activity's failure names the GitHub error."""
    parts: list[str] = []
    while error is not None:
        parts.append(getattr(error, "message", None) or str(error) or type(error).__name__)
        error = error.__cause__ if error.__cause__ is not None else getattr(error, "cause", None)
    return ": ".join(parts) or "unknown"


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")
