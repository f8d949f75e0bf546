"""Logging setup: human-readable by default, one JSON object per line for log pipelines."""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from mayfly.models import ContainerRef

LogFormat = Literal["text", "json"]

# The runner an activity is acting on, so each of its log lines can name it.
current_runner: ContextVar[str | None] = ContextVar("current_runner", default=None)


def runner_named_by(argument: object) -> str | None:
    """The runner a payload is about: mint and deregister requests carry `runner_name`; a
    container is named after its runner."""
    if isinstance(argument, ContainerRef):
        return argument.name
    value = getattr(argument, "runner_name", None)
    return value if isinstance(value, str) else None


class _RunnerContextInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        runner = next((name for arg in input.args if (name := runner_named_by(arg))), None)
        token = current_runner.set(runner)
        try:
            return await self.next.execute_activity(input)
        finally:
            current_runner.reset(token)


class RunnerLogContext(Interceptor):
    """Worker interceptor: an activity's log lines name the runner its input is about."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _RunnerContextInbound(next)


class JobContext(logging.Filter):
    """Gives every record a `job` (the Temporal workflow id it came from or `extra={"job": ...}`,
    "-" outside one) and a `runner` (from a workflow's `extra={"runner": ...}` or the activity's input), so an
    operator can grep one job's or one runner's lines across workflows, activities and hosts."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = getattr(record, "job", None)
        if job is None:
            details = getattr(record, "temporal_activity", None) or getattr(record, "temporal_workflow", None)
            job = details.get("workflow_id") if isinstance(details, dict) else None
        record.job = job or "-"
        runner = getattr(record, "runner", None) or current_runner.get()
        record.runner = runner or "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "job": getattr(record, "job", "-"),
            "runner": getattr(record, "runner", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: LogFormat = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(JobContext())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s [job=%(job)s runner=%(runner)s]: %(message)s"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO: too chatty for a worker making thousands of calls.
    logging.getLogger("httpx").setLevel(logging.WARNING)
