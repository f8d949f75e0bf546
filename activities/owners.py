"""Whether the workflow that owns a container or registration is still running."""

from __future__ import annotations

from temporalio import activity
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode


async def workflow_status(workflow_id: str) -> WorkflowExecutionStatus | None:
    """The status of the workflow's latest run, or None if it never existed (or was deleted)."""
    try:
        description = await activity.client().get_workflow_handle(workflow_id).describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    return description.status


async def owner_running(workflow_id: str) -> bool:
    return await workflow_status(workflow_id) == WorkflowExecutionStatus.RUNNING
