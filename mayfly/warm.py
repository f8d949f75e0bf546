"""Warm pools: the names and payloads shared by the warm-pool workflows, the dispatcher and the sweeps.

A pool with `min_idle > 0` keeps that many registered, idle runners ready. One `WarmPool`
workflow per pool keeps the count; each warm runner lives in its own `WarmRunner` workflow,
which holds its slot from before its container is created until that container is gone. Its
history is bounded by one runner's life, so the pool workflow can continue as new at any time
without handing leases over.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from mayfly.models import RunnerRecipe, job_workflow_id, owner_job_of

WARM_POOL_WORKFLOW = "WarmPool"
WARM_RUNNER_WORKFLOW = "WarmRunner"
# Signals between the two.
RUNNER_REPORT_SIGNAL = "runner_report"
DRAIN_SIGNAL = "drain"
CONFIGURE_SIGNAL = "configure"

# `<prefix>-w-<pool>-<8 hex>`: the pool and a token unique per runner. Pool names may hold '-',
# so the token is matched from the end.
WARM_RUNNER_NAME = re.compile(
    r"^(?P<prefix>[a-z][a-z0-9]{0,15})-w-(?P<pool>[a-z0-9][a-z0-9-]*)-(?P<token>[0-9a-f]{8})$"
)


def warm_pool_workflow_id(pool: str) -> str:
    return f"mayfly-warmpool-{pool}"


def warm_runner_name(prefix: str, pool: str, token: str) -> str:
    return f"{prefix}-w-{pool}-{token}"


def warm_runner_workflow_id(runner_name: str) -> str:
    return f"mayfly-warmrunner-{runner_name}"


def is_warm_runner(runner_name: str, prefix: str) -> bool:
    match = WARM_RUNNER_NAME.match(runner_name)
    return match is not None and match["prefix"] == prefix


def owner_workflow_of(runner_name: str, prefix: str) -> str | None:
    """The workflow that started this runner (a job's or a warm runner's), or None for runners
    that are not ours."""
    job_id = owner_job_of(runner_name, prefix)
    if job_id is not None:
        return job_workflow_id(job_id, prefix)
    if is_warm_runner(runner_name, prefix):
        return warm_runner_workflow_id(runner_name)
    return None


class WarmPoolConfig(BaseModel):
    """What a worker start hands the pool's warm-pool workflow; a new `min_idle` grows or drains it.
    A warm pool serves one scope (its recipe's): its runners register there."""

    recipe: RunnerRecipe
    min_idle: int = Field(ge=0)


WarmRunnerPhase = Literal["starting", "idle", "busy", "gone"]


class WarmRunnerReport(BaseModel):
    """A warm runner telling its pool where it stands."""

    runner_name: str
    phase: WarmRunnerPhase
    job_id: int | None = None
    # Set with "gone": the runner never registered (the pool backs off before the next one).
    failed: bool = False
    reason: str = ""


class WarmRunnerInput(BaseModel):
    runner_name: str
    pool_workflow_id: str
    recipe: RunnerRecipe


class WarmRunnerResult(BaseModel):
    """The usage record of one warm runner: the job it served, if any, and how long it held its slot."""

    runner_name: str
    pool: str
    job_id: int | None
    registered: bool
    slot_held_s: float
    reason: str


class ServedJob(BaseModel):
    runner_name: str
    job_id: int
    at: datetime


class WarmPoolCarry(BaseModel):
    # Runner name -> last reported phase, for every warm runner not yet gone.
    runners: dict[str, WarmRunnerPhase] = Field(default_factory=dict)
    draining: list[str] = Field(default_factory=list)
    consecutive_failures: int = 0
    # No new runner before this, after runners failed to register.
    not_before: datetime | None = None
    started_total: int = 0
    # The most recent jobs warm runners took (bounded), for `status` and accounting.
    served: list[ServedJob] = Field(default_factory=list)
    served_total: int = 0


class WarmPoolInput(BaseModel):
    config: WarmPoolConfig
    carry: WarmPoolCarry | None = None


class WarmPoolStatus(BaseModel):
    pool: str
    min_idle: int
    starting: list[str]
    idle: list[str]
    busy: list[str]
    draining: list[str]
    started_total: int
    served_total: int
    served: list[ServedJob]
