"""Pydantic payloads that cross Temporal boundaries (workflow, activity, signal and query arguments).

Nothing here may carry a secret in plaintext: JIT configs travel as `SealedSecret`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Literal, Protocol

from pydantic import BaseModel, Field

JobAction = Literal["queued", "waiting", "in_progress", "completed"]
# What the job workflow believes of its GitHub job. "unknown" until a webhook or GitHub says;
# statuses only move forward (waiting -> queued -> in_progress -> completed).
JobStatus = Literal["unknown", "waiting", "queued", "in_progress", "completed"]


class JobPhase(StrEnum):
    """Where a job's workflow is in its runner's lifecycle: the UI's details and `mayfly explain`."""

    QUEUED = "queued"
    WAITING_FOR_APPROVAL = "waiting-for-approval"
    WAITING_FOR_SLOT = "waiting-for-slot"
    MINTING = "minting"
    SPAWNING = "spawning"
    REGISTERING = "registering"
    RUNNING = "running"
    TEARING_DOWN = "tearing-down"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


# The scope of a deployment configured the single-scope way (`github.repository` or
# `github.organization`); named scopes come from `[[scopes]]`.
DEFAULT_SCOPE = "default"


class GitHubJob(Protocol):
    """A job as GitHub describes it, in a webhook or in a listing."""

    @property
    def id(self) -> int: ...
    @property
    def run_id(self) -> int: ...
    @property
    def run_attempt(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def labels(self) -> Sequence[str]: ...


class JobInfo(BaseModel):
    job_id: int
    # The repository or organization (with its credential) the job came from.
    scope: str = DEFAULT_SCOPE
    run_id: int = 0
    run_attempt: int = 1
    repository: str = ""
    name: str = ""
    labels: list[str] = Field(default_factory=list)
    pool: str

    @classmethod
    def unrouted(cls, job: GitHubJob, repository: str, scope: str) -> JobInfo:
        """The job before dispatch has chosen its pool."""
        return cls(
            job_id=job.id,
            run_id=job.run_id,
            run_attempt=job.run_attempt,
            repository=repository,
            name=job.name,
            labels=list(job.labels),
            pool="",
            scope=scope,
        )


class JobEvent(BaseModel):
    """What a `workflow_job` webhook says, reduced to what the workflows act on."""

    action: JobAction
    job_id: int
    runner_name: str | None = None


class RunnerJobCarry(BaseModel):
    """What one run of a job workflow hands to the next when it continues as new."""

    job_status: JobStatus
    served_by: str | None
    runners_started: int
    failed_attempts: int
    clean_exits_unseen: int
    last_error: str | None
    first_started_at: datetime
    deadline: datetime
    slot_held_s: float
    runner_s: float = 0.0


class RunnerRecipe(BaseModel):
    """How a pool makes and watches its runners: the same for a job's runners and warm ones."""

    pool: str
    labels: list[str]
    scope: str = DEFAULT_SCOPE
    # The pool's runner group; None: the scope's.
    runner_group_id: int | None = None
    runner_name_prefix: str = "mayfly"
    # Empty means the workflow's own task queue (no separate throttle).
    github_task_queue: str = ""
    registration_timeout_s: float
    registration_poll_s: float = Field(default=10.0, gt=0)
    max_lifetime_s: float
    # While waiting long (for approval, a slot or a job for an idle runner) a workflow asks
    # GitHub this often whether it still needs a runner: webhooks can be lost.
    status_check_interval_s: float = Field(default=300.0, gt=0)

    def mint_request(self, runner_name: str) -> MintRequest:
        return MintRequest(
            pool=self.pool,
            runner_name=runner_name,
            labels=self.labels,
            scope=self.scope,
            runner_group_id=self.runner_group_id,
        )


class RunnerJobInput(BaseModel):
    job: JobInfo
    recipe: RunnerRecipe
    max_registration_attempts: int
    idle_ttl_s: float
    # GitHub cancels a job that stayed queued for 24 h; past this the workflow gives up too.
    job_deadline_s: float = Field(default=24 * 3600.0, gt=0)
    carry: RunnerJobCarry | None = None


JobOutcome = Literal["served", "served-elsewhere", "cancelled-before-start"]


class RunnerJobResult(BaseModel):
    job_id: int
    served_by: str | None
    runners_spawned: int
    registration_failures: int
    outcome: JobOutcome
    # From grant to the moment its last container was confirmed gone (the release follows).
    slot_held_s: float = 0.0
    # Summed over its containers, from asking for each one to its confirmed end.
    runner_s: float = 0.0


class RunnerJobState(BaseModel):
    job_id: int
    pool: str
    phase: JobPhase
    job_status: JobStatus
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
    # Served before every request without it (see `mayfly.slot_queue.WaiterQueue`).
    front: bool = False
    # The GitHub job the slot is for. Waiters for older jobs (lower ids) go first: GitHub hands
    # an idle runner the oldest queued job, so a slot granted in any other order starts a
    # runner that takes some other waiter's job.
    job_id: int | None = None


class ReleaseRequest(BaseModel):
    request_id: str


# The signal a semaphore sends a holder when its slot is granted.
SLOT_GRANTED_SIGNAL = "slot_granted"


class SlotGrant(BaseModel):
    request_id: str


# Sent to the few waiters at the head of a full pool's queue: their grant is near, so a holder
# may prepare what needs no slot (a runner's JIT config) and spend none of the slot's time on it.
SLOT_SOON_SIGNAL = "slot_soon"


class SlotSoon(BaseModel):
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
    # Waiters already told their slot is near (at most SOON_AHEAD_MAX): telling them again
    # after each continue-as-new would reach holders that are finishing, costing them a task.
    told_soon: list[str] = Field(default_factory=list)


class SemaphoreInput(BaseModel):
    pool: str
    capacity: int = Field(ge=0)
    reap_interval_s: float = Field(default=20.0, gt=0)
    # Only continue-as-new sets it. A run started without it may follow a terminated or
    # failed run whose holders it does not know, so it recovers before granting.
    carried: CarriedSemaphore | None = None


class SemaphoreTerms(BaseModel):
    """A pool's cap and semaphore tuning: the worker's configuration, never a holder's say."""

    capacity: int = Field(ge=0)
    reap_interval_s: float = Field(default=20.0, gt=0)


class SlotRequest(BaseModel):
    pool: str
    # The holder's task queue. A semaphore this request brings to life runs on it, or on its
    # slots queue when the worker names its main queue (see `SlotActivities`).
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
    """What a recheck found: the run knew the slot, was told it again, or did not answer."""

    KNOWN = "known"
    RESENT = "resent"
    UNANSWERED = "unanswered"


class SlotLookup(StrEnum):
    """What the semaphore's current run knows of one request id."""

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
    nonce: str = Field(repr=False)
    ciphertext: str = Field(repr=False)


class MintRequest(BaseModel):
    pool: str
    runner_name: str
    labels: list[str]
    scope: str = DEFAULT_SCOPE
    # None: the scope's runner group.
    runner_group_id: int | None = None


class MintedRunner(BaseModel):
    runner_id: int
    jit_config: SealedSecret


class RunnerRef(BaseModel):
    runner_name: str
    runner_id: int | None = None
    scope: str = DEFAULT_SCOPE


class JobRef(BaseModel):
    repository: str
    job_id: int
    scope: str = DEFAULT_SCOPE


class GitHubJobStatus(BaseModel):
    """GitHub's own word on a job; `found` is False once GitHub no longer knows it."""

    found: bool
    status: str = ""
    conclusion: str | None = None
    runner_name: str | None = None


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
    # Where wait_exit and terminate of this container must run: the owning host's queue for
    # local processes, the shared watch queue for provider containers. None (refs made before
    # there were host queues) means the workflow's own task queue.
    task_queue: str | None = None


class ContainerExit(BaseModel):
    exit_code: int | None
    # The watcher saw the container exit and removed what was left of it, so nothing remains
    # to terminate. False when the backend had lost track of it: then it is terminated by name.
    gone: bool = False


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


# Workflow type names, shared by the workflows and the code that starts them by name.
RUNNER_JOB_WORKFLOW = "RunnerJob"


def job_workflow_id(job_id: int, prefix: str = "mayfly") -> str:
    """Scopes differ in their runner-name prefix, so ids stay unique across them (job ids of
    two GitHub Enterprise servers may meet)."""
    return f"{prefix}-job-{job_id}"


def semaphore_workflow_id(pool: str) -> str:
    return f"mayfly-slots-{pool}"


def host_task_queue(task_queue: str, host_id: str) -> str:
    """The queue only the worker(s) of one host poll: they alone see that host's runner processes."""
    return f"{task_queue}-host-{host_id}"


def semaphore_task_queue(task_queue: str) -> str:
    """The queue the pools' semaphores run on, apart from the job workflows: a semaphore's task
    must not wait behind thousands of job workflows' tasks (after a continue-as-new races with a
    signal, its replay went to the shared queue's back, and 700 signals piled up meanwhile)."""
    return f"{task_queue}-slots"


def watch_task_queue(task_queue: str) -> str:
    """Shared by every worker, for watching containers that any worker can reach (Modal)."""
    return f"{task_queue}-watch"


class HostSweepReport(BaseModel):
    """One host's container sweep, as its host sweeper workflow keeps it for slot reclaim."""

    host_id: str
    # Server time at which the sweep was scheduled: every record it judged was listed after it.
    scheduled_at: datetime
    checked: int = 0
    removed: list[str] = Field(default_factory=list)
    # Owners whose workflow had closed but whose containers this sweep could not stop: their
    # slots must not be reclaimed yet.
    unremoved_owners: list[str] = Field(default_factory=list)
