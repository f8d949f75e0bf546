"""GitHub simulator for Mayfly: self-hosted runner REST API, workflow_job webhooks, a job
scheduler and a simulated runner program (``python -m simulator.runner``).

Exports are resolved lazily so ``python -m simulator.runner`` does not pay for importing
Starlette, uvicorn and pydantic on every runner start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulator.faults import FaultConfig
    from simulator.server import BackgroundServer, GitHubSimulator, SimStats
    from simulator.state import ApiError, JobView, LabelView, RunnerView, WorkflowJobEvent, WorkflowJobView
    from simulator.webhooks import DeliveryRecord

__all__ = [
    "ApiError",
    "BackgroundServer",
    "DeliveryRecord",
    "FaultConfig",
    "GitHubSimulator",
    "JobView",
    "LabelView",
    "RunnerView",
    "SimStats",
    "WorkflowJobEvent",
    "WorkflowJobView",
]

_HOME = {
    "FaultConfig": "simulator.faults",
    "BackgroundServer": "simulator.server",
    "GitHubSimulator": "simulator.server",
    "SimStats": "simulator.server",
    "ApiError": "simulator.state",
    "JobView": "simulator.state",
    "LabelView": "simulator.state",
    "RunnerView": "simulator.state",
    "WorkflowJobEvent": "simulator.state",
    "WorkflowJobView": "simulator.state",
    "DeliveryRecord": "simulator.webhooks",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'simulator' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
