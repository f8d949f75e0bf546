"""Pydantic payloads that cross Temporal boundaries (workflow, activity, signal and query arguments).

Nothing here may carry a secret in plaintext: JIT configs travel as `SealedSecret`.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

JobAction = Literal["queued", "waiting", "in_progress", "completed"]


class JobInfo(BaseModel):
    job_id: int
    run_id: int = 0
    run_attempt: int = 1
    repository: str = ""
    name: str = ""
    labels: list[str] = Field(default_factory=list)
    pool: str


class JobEvent(BaseModel):
    """What a `workflow_job` webhook says, reduced to what the workflows act on."""

    action: JobAction
    job_id: int
    runner_name: str | None = None
    conclusion: str | None = None


class JobPhase(StrEnum):
    QUEUED = "queued"
    WAITING_FOR_SLOT = "waiting-for-slot"
    MINTING = "minting"
    SPAWNING = "spawning"
    REGISTERING = "registering"
    RUNNING = "running"
    TEARING_DOWN = "tearing-down"
    DONE = "done"
    FAILED = "failed"


class RunnerJobInput(BaseModel):
    job: JobInfo
    pool_labels: list[str]
    capacity: int = Field(ge=0)
    semaphore_reap_interval_s: float = 20.0
    registration_timeout_s: float
    max_registration_attempts: int
    idle_ttl_s: float
    max_lifetime_s: float
    runner_name_prefix: str = "mayfly"
    # Empty means the workflow's own task queue (no separate throttle).
    github_task_queue: str = ""


class RunnerJobResult(BaseModel):
    job_id: int
    served_by: str | None
    runners_spawned: int
    registration_failures: int
    outcome: Literal["served", "served-elsewhere", "cancelled-before-start"]
    # From grant to the moment its last container was confirmed gone (the release follows).
    slot_held_s: float = 0.0


class RunnerJobState(BaseModel):
    job_id: int
    pool: str
    phase: JobPhase
    job_status: Literal["queued", "in_progress", "completed"]
    served_by: str | None
    slot_held: bool
    current_runner: str | None
    runners_spawned: int
    registration_failures: int
    last_error: str | None


# --- slot semaphore -------------------------------------------------------------------------


class AcquireRequest(BaseModel):
    request_id: str
    holder_workflow_id: str
    # Compared on liveness checks, so a reset or reused workflow id is not mistaken for the holder.
    holder_run_id: str
    requested_at: datetime


class ReleaseRequest(BaseModel):
    request_id: str
    reason: str = "released"


class SlotGrant(BaseModel):
    request_id: str


class Holder(BaseModel):
    request: AcquireRequest
    granted_at: datetime


class CarriedSemaphore(BaseModel):
    """What one semaphore run hands the next through continue-as-new.

    Waiters and the ids of recent releases travel as one compressed blob (see
    `mayfly.slot_queue`): a backlog of thousands of full `AcquireRequest`s would otherwise
    approach the 2 MB payload limit.
    """

    holders: list[Holder] = Field(default_factory=list)
    packed_queue: str = ""
    granted_total: int = 0
    reclaimed_total: int = 0
    recovering_until: datetime | None = None


class SemaphoreInput(BaseModel):
    pool: str
    capacity: int = Field(ge=0)
    reap_interval_s: float = Field(default=20.0, gt=0)
    # Only continue-as-new sets it. A run started without it may follow a terminated or
    # failed run whose holders it does not know, so it recovers before granting.
    carried: CarriedSemaphore | None = None


class SlotRequest(BaseModel):
    pool: str
    capacity: int
    reap_interval_s: float
    task_queue: str
    acquire: AcquireRequest


class SlotRelease(BaseModel):
    pool: str
    release: ReleaseRequest


class SlotRecheck(BaseModel):
    """A holder or waiter making sure the semaphore's current run still knows it."""

    slot: SlotRequest
    # Set once granted: the holder re-asserts its slot rather than asking for one.
    granted_at: datetime | None = None


class RecheckOutcome(StrEnum):
    KNOWN = "known"
    RESENT = "resent"
    UNANSWERED = "unanswered"


class SlotLookup(StrEnum):
    HOLDING = "holding"
    WAITING = "waiting"
    RELEASED = "released"
    UNKNOWN = "unknown"


class EarlierRunCheck(BaseModel):
    workflow_id: str
    run_id: str


class HolderView(BaseModel):
    request_id: str
    workflow_id: str
    held_for_s: float


class SemaphoreStatus(BaseModel):
    pool: str
    capacity: int
    holders: list[HolderView]
    # The head of the queue only: a backlog of thousands would make every status call huge.
    waiters: list[str]
    waiting: int = 0
    granted_total: int
    reclaimed_total: int
    recovering: bool = False


class DeadHolderCheck(BaseModel):
    pool: str
    holders: list[Holder]


def holder_recheck_s(reap_interval_s: float) -> float:
    """How often a holder makes sure the semaphore still counts its slot."""
    return 2 * reap_interval_s


def waiter_recheck_s(reap_interval_s: float) -> float:
    """How often a waiter makes sure it is still queued: rarely, as thousands may wait and
    each recheck is a query the semaphore must answer."""
    return 30 * reap_interval_s


def recovery_grace_s(reap_interval_s: float) -> float:
    """How long a semaphore that may have lost its holders waits for them to re-assert.

    Two holder rechecks plus one reap interval of slack: a holder misses at most one
    recheck before the grace runs out, even when its worker is briefly busy.
    """
    return 2 * holder_recheck_s(reap_interval_s) + reap_interval_s


# --- runners and containers -----------------------------------------------------------------


class SealedSecret(BaseModel):
    """A secret encrypted with the workers' key: safe to sit in history, useless without the key."""

    key_id: str
    nonce: str
    ciphertext: str

    def __repr__(self) -> str:
        return f"SealedSecret(key_id={self.key_id!r})"


class MintRequest(BaseModel):
    pool: str
    runner_name: str
    labels: list[str]


class MintedRunner(BaseModel):
    runner_id: int
    runner_name: str
    jit_config: SealedSecret


class RunnerRef(BaseModel):
    runner_name: str
    runner_id: int | None = None


class RunnerStatus(BaseModel):
    exists: bool
    online: bool = False
    busy: bool = False


class DeregisterOutcome(StrEnum):
    DELETED = "deleted"
    ABSENT = "absent"
    BUSY = "busy"


class ContainerSpec(BaseModel):
    pool: str
    name: str
    job_id: int
    owner_workflow_id: str
    runner_name: str
    jit_config: SealedSecret
    max_lifetime_s: float


class ContainerRef(BaseModel):
    pool: str
    name: str
    backend_id: str


class ContainerExit(BaseModel):
    exit_code: int | None


RUNNER_NAME = re.compile(r"^(?P<prefix>[a-z][a-z0-9]{0,15})-(?P<job_id>\d+)-a(?P<attempt>\d+)$")


def runner_name_for(prefix: str, job_id: int, attempt: int) -> str:
    """Deterministic, so a retried mint or spawn finds what an earlier try made."""
    return f"{prefix}-{job_id}-a{attempt}"


def owner_job_of(runner_name: str, prefix: str) -> int | None:
    """Which job's workflow spawned this runner, or None for runners that are not ours."""
    match = RUNNER_NAME.match(runner_name)
    if match is None or match["prefix"] != prefix:
        return None
    return int(match["job_id"])


def job_workflow_id(job_id: int) -> str:
    return f"mayfly-job-{job_id}"


def semaphore_workflow_id(pool: str) -> str:
    return f"mayfly-slots-{pool}"
