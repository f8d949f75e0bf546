"""What a pool semaphore did, read from the server's histories of all its runs.

The history is the server's record, not the workflow's own state: the order in which acquire
signals arrived and grant signals left, how long each workflow task took, and whether any
failed. Used by bench/backlog_bench.py and the semaphore tests.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.client import Client

from mayfly.models import semaphore_workflow_id

# Completions the server refuses so the workflow sees new signals first, losing nothing:
# UNHANDLED_COMMAND when signals arrived while the task that continues as new was in flight;
# FORCE_CLOSE_COMMAND when more signals arrived during one task than the server buffers (100).
# Expected under a flood of signals; the failures were deadlocks and evictions.
BENIGN_TASK_FAILURES = {
    "WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND",
    "WORKFLOW_TASK_FAILED_CAUSE_FORCE_CLOSE_COMMAND",
}


@dataclass
class SemaphoreRun:
    run_id: str
    events: int = 0
    history_bytes: int = 0
    input_bytes: int = 0
    continued_as_new: bool = False
    max_task_s: float = 0.0
    # The slowest task: its started event id and the signals that arrived in the history before
    # it started since the previous task (what it had to handle), to tell a run's first task
    # (unpacking the carried queue) from a burst of signals.
    slowest_task_event_id: int = 0
    slowest_task_signals: int = 0
    # A task after a failed one replays the run's whole history (the worker dropped its cache).
    slowest_task_replayed: bool = False
    task_failures: list[str] = field(default_factory=list)


@dataclass
class SemaphoreHistory:
    runs: list[SemaphoreRun] = field(default_factory=list)
    # Request ids in the order their first acquire reached the semaphore, and grants went out.
    acquired: list[str] = field(default_factory=list)
    granted: list[str] = field(default_factory=list)

    @property
    def harmful_task_failures(self) -> list[str]:
        return [
            cause for run in self.runs for cause in run.task_failures if cause not in BENIGN_TASK_FAILURES
        ]

    @property
    def max_task_s(self) -> float:
        return max((run.max_task_s for run in self.runs), default=0.0)

    def slowest_tasks(self, count: int) -> list[tuple[int, SemaphoreRun]]:
        """The runs with the slowest tasks, slowest first, with each run's index."""
        indexed = sorted(enumerate(self.runs), key=lambda pair: pair[1].max_task_s, reverse=True)
        return indexed[:count]

    def fifo_violations(self) -> int:
        """Grants that overtook an earlier acquire still waiting (holders released unseen count
        as served: a request released while queued is skipped, not overtaken)."""
        position = {rid: i for i, rid in enumerate(self.acquired)}
        ordered = [position[rid] for rid in self.granted if rid in position]
        return sum(1 for earlier, later in itertools.pairwise(ordered) if later < earlier)


def _request_ids(payloads: object) -> list[str]:
    """The request ids of one acquire signal, or of every acquire in a batched one, in order."""
    data = json.loads(payloads.payloads[0].data)  # type: ignore[attr-defined]
    requests = data if isinstance(data, list) else [data.get("request", data)]
    return [str(request["request_id"]) for request in requests]


def _request_id(payloads: object) -> str:
    data = json.loads(payloads.payloads[0].data)  # type: ignore[attr-defined]
    request = data.get("request", data)
    return str(request["request_id"])


async def read_semaphore_history(client: Client, pool: str) -> SemaphoreHistory:
    workflow_id = semaphore_workflow_id(pool)
    executions = [e async for e in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
    executions.sort(key=lambda e: e.start_time)
    result = SemaphoreHistory()
    # Every acquire as the semaphore received it; a resent one counts at its first arrival.
    acquired: list[str] = []
    for execution in executions:
        handle = client.get_workflow_handle(workflow_id, run_id=execution.run_id)
        description = await handle.describe()
        run = SemaphoreRun(
            run_id=execution.run_id,
            events=description.raw_info.history_length,
            history_bytes=description.raw_info.history_size_bytes,
        )
        task_started_at = None
        task_started_id = 0
        signals_since_task = 0
        signals_for_task = 0
        last_task_failed = replaying = False
        async for event in handle.fetch_history_events():
            kind = event.event_type
            if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
                signals_since_task += 1
            if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
                run.input_bytes = sum(
                    len(p.data) for p in event.workflow_execution_started_event_attributes.input.payloads
                )
            elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
                run.continued_as_new = True
            elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                task_started_at = event.event_time.ToDatetime()
                task_started_id = event.event_id
                signals_for_task, signals_since_task = signals_since_task, 0
                replaying = last_task_failed
            elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED and task_started_at is not None:
                took = (event.event_time.ToDatetime() - task_started_at).total_seconds()
                last_task_failed = False
                if took > run.max_task_s:
                    run.max_task_s = took
                    run.slowest_task_event_id = task_started_id
                    run.slowest_task_signals = signals_for_task
                    run.slowest_task_replayed = replaying
            elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                last_task_failed = True
                cause = event.workflow_task_failed_event_attributes.cause
                run.task_failures.append(WorkflowTaskFailedCause.Name(cause))
            elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
                run.task_failures.append("TIMED_OUT")
            elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
                attributes = event.workflow_execution_signaled_event_attributes
                if attributes.signal_name in ("acquire", "acquire_batch"):
                    acquired.extend(_request_ids(attributes.input))
            elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
                update = event.workflow_execution_update_accepted_event_attributes.accepted_request.input
                if update.name == "acquire_many":
                    acquired.extend(_request_ids(update.args))
            elif kind == EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED:
                outgoing = event.signal_external_workflow_execution_initiated_event_attributes
                if outgoing.signal_name == "slot_granted":
                    result.granted.append(_request_id(outgoing.input))
        result.runs.append(run)
    result.acquired = list(dict.fromkeys(acquired))
    return result
