"""Pure in-memory model of GitHub's side of self-hosted runners: runners, jobs, scheduler.

Nothing here awaits. Every operation runs to completion inside one event-loop step, which
is what makes e.g. "delete runner" atomic with respect to "assign job": they can never
interleave. The HTTP layer (server.py) translates ``ApiError`` into GitHub error bodies.
"""

from __future__ import annotations

import base64
import hmac
import json
import math
import secrets
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeGuard

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import BaseModel

from simulator.jitconfig import JitConfig

DEFAULT_GROUP_ID = 1
DEFAULT_GROUP_NAME = "Default"

# GitHub marks the labels it derives itself as read-only; everything a caller adds is custom.
_READ_ONLY_LABELS = frozenset({"self-hosted", "linux", "windows", "macos", "x64", "arm", "arm64"})

# "waiting": held by an environment protection rule until a reviewer approves it; no runner may take it.
JobStatus = Literal["waiting", "queued", "in_progress", "completed"]
Conclusion = Literal["success", "failure", "cancelled", "skipped", "timed_out", "neutral", "action_required"]
RunnerStatus = Literal["online", "offline"]


class ApiError(Exception):
    """A request the simulated GitHub refuses; ``status`` is the HTTP status it answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------
# Views: the shapes that leave the simulator (REST bodies, webhook payloads, python API).
# ---------------------------------------------------------------------------------------------


class LabelView(BaseModel):
    id: int
    name: str
    type: Literal["read-only", "custom"]


class RunnerView(BaseModel):
    """A runner object exactly as GitHub's REST API returns it."""

    id: int
    name: str
    os: str
    status: RunnerStatus
    busy: bool
    ephemeral: bool
    labels: list[LabelView]
    runner_group_id: int


class JobView(BaseModel):
    """Compact job summary for tests and the /_sim API (not a GitHub shape)."""

    id: int
    run_id: int
    name: str
    labels: list[str]
    status: JobStatus
    conclusion: Conclusion | None
    runner_id: int | None
    runner_name: str | None
    duration_s: float


class StepView(BaseModel):
    name: str
    status: JobStatus
    conclusion: Conclusion | None
    number: int
    started_at: datetime | None
    completed_at: datetime | None


class WorkflowJobView(BaseModel):
    """``workflow_job`` as in the webhook payload and ``GET /actions/jobs/{id}``."""

    id: int
    run_id: int
    run_attempt: int
    name: str
    workflow_name: str
    head_branch: str
    head_sha: str
    labels: list[str]
    status: JobStatus
    conclusion: Conclusion | None
    created_at: datetime
    started_at: datetime
    completed_at: datetime | None
    runner_id: int | None
    runner_name: str | None
    runner_group_id: int | None
    runner_group_name: str | None
    steps: list[StepView]
    url: str
    html_url: str
    run_url: str
    check_run_url: str
    node_id: str


class OwnerView(BaseModel):
    login: str
    id: int
    type: str


class RepositoryView(BaseModel):
    id: int
    node_id: str
    name: str
    full_name: str
    owner: OwnerView
    private: bool
    html_url: str


class OrganizationView(BaseModel):
    login: str
    id: int
    node_id: str


class InstallationView(BaseModel):
    id: int
    node_id: str


class WorkflowJobEvent(BaseModel):
    action: JobStatus
    workflow_job: WorkflowJobView
    repository: RepositoryView
    organization: OrganizationView
    sender: OwnerView
    # GitHub sends it only on an App's deliveries; the payload omits the key otherwise.
    installation: InstallationView | None = None


# ---------------------------------------------------------------------------------------------
# Internal records.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Runner:
    id: int
    name: str
    labels: list[str]
    secret: str
    status: RunnerStatus = "offline"
    busy: bool = False
    jit_used: bool = False
    session_id: str | None = None
    connected_seq: int = 0
    last_seen: float = 0.0
    job_id: int | None = None
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class _Repo:
    name: str
    id: int


@dataclass
class _Job:
    id: int
    run_id: int
    repo: _Repo
    name: str
    workflow_name: str
    labels: list[str]
    duration_s: float
    created_at: datetime
    head_sha: str
    status: JobStatus = "queued"
    conclusion: Conclusion | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    runner_id: int | None = None
    runner_name: str | None = None
    steps: list[StepView] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _labels_match(job_labels: list[str], runner_labels: list[str]) -> bool:
    # GitHub compares runs-on labels case-insensitively.
    return {label.casefold() for label in job_labels} <= {label.casefold() for label in runner_labels}


JobEventSink = Callable[[WorkflowJobEvent], None]


class SimState:
    """Runners, jobs and the scheduler that pairs them."""

    def __init__(
        self,
        *,
        owner: str,
        repo: str,
        agent_timeout_s: float,
        on_job_event: JobEventSink,
        on_change: Callable[[], None],
        first_job_id: int = 1000,
        repos: Sequence[str] | None = None,
        installation_id: int | None = None,
    ) -> None:
        """`repos` names all the organization's repositories (default: just `repo`); `repo`,
        one of them, is where jobs go unless told otherwise. `installation_id` is set when a
        GitHub App sends the webhooks."""
        names = [repo] if repos is None else list(repos)
        folded = [name.casefold() for name in names]
        if len(set(folded)) != len(folded):
            # GitHub repository names are case-insensitive: "Widgets" and "widgets" are one.
            raise ValueError(f"repository names must be distinct: {names}")
        if repo.casefold() not in folded:
            raise ValueError(f"the default repository {repo!r} is not among repos {names}")
        self.owner = owner
        self.agent_timeout_s = agent_timeout_s
        self.api_base_url = "https://api.github.com"
        self.installation_id = installation_id
        base_id = 700_000 + secrets.randbelow(100_000)
        self.organization_id = base_id
        self._repos = {name.casefold(): _Repo(name, base_id + 1 + i) for i, name in enumerate(names)}
        self._default_repo = self._repos[repo.casefold()]
        # Canonical spelling, as listed in `repos`.
        self.repo = self._default_repo.name
        self.repository_id = self._default_repo.id
        self._on_job_event = on_job_event
        self._on_change = on_change
        self._runners: dict[int, _Runner] = {}
        # Ids of runners that existed once, so an agent can tell "deleted" (410) from a typo (404).
        self._deleted_runner_ids: set[int] = set()
        # Seconds from registration to removal, per removed runner: what a runner cost.
        self.runner_lifetimes: dict[str, float] = {}
        self._jobs: dict[int, _Job] = {}
        self._label_ids: dict[str, int] = {}
        self._next_runner_id = 1
        self._next_job_id = first_job_id
        self._next_run_id = 90_000
        self._connect_seq = 0
        # Names of runners in the order they connected, for tests asserting one never did.
        self.connected_names: list[str] = []

    # ----------------------------------------------------------------- views

    def runner_view(self, runner_id: int) -> RunnerView:
        return self._view(self._runner_or_404(runner_id))

    def runner_views(self, name: str | None = None) -> list[RunnerView]:
        return [self._view(r) for r in self._runners.values() if name is None or r.name == name]

    def job_views(self) -> list[JobView]:
        return [self._job_view(j) for j in self._jobs.values()]

    def job_view(self, job_id: int) -> JobView:
        """One job, by id; KeyError if unknown. O(1): test predicates call it after every change."""
        return self._job_view(self._jobs[job_id])

    @staticmethod
    def _job_view(j: _Job) -> JobView:
        return JobView(
            id=j.id,
            run_id=j.run_id,
            name=j.name,
            labels=list(j.labels),
            status=j.status,
            conclusion=j.conclusion,
            runner_id=j.runner_id,
            runner_name=j.runner_name,
            duration_s=j.duration_s,
        )

    def workflow_job(self, job_id: int, repo: str | None = None) -> WorkflowJobView:
        """A job as GitHub shows it; with `repo`, another repository's job is Not Found, as it is
        at a URL naming that repository."""
        job = self._jobs.get(job_id)
        if job is None or (repo is not None and job.repo != self.repository(repo)):
            raise ApiError(404, "Not Found")
        return self._workflow_job(job)

    def workflow_jobs(self, repo: str | None = None) -> list[WorkflowJobView]:
        """All jobs, or with `repo` those of that repository."""
        wanted = None if repo is None else self.repository(repo)
        return [self._workflow_job(j) for j in self._jobs.values() if wanted is None or j.repo == wanted]

    def repository(self, name: str | None = None) -> _Repo:
        """The organization's repository called `name` (any case), the default one for None;
        ValueError if the organization has none of that name."""
        if name is None:
            return self._default_repo
        found = self._repos.get(name.casefold())
        if found is None:
            raise ValueError(f"{self.owner} has no repository {name!r}; it has {self.repository_names()}")
        return found

    def has_repository(self, name: str) -> bool:
        return name.casefold() in self._repos

    def repository_names(self) -> list[str]:
        return [r.name for r in self._repos.values()]

    def repository_view(self, repo: str | None = None) -> RepositoryView:
        found = self.repository(repo)
        return RepositoryView(
            id=found.id,
            node_id=f"R_sim{found.id}",
            name=found.name,
            full_name=f"{self.owner}/{found.name}",
            owner=OwnerView(login=self.owner, id=self.organization_id, type="Organization"),
            private=True,
            html_url=f"https://github.com/{self.owner}/{found.name}",
        )

    def repository_views(self) -> list[RepositoryView]:
        return [self.repository_view(name) for name in self.repository_names()]

    def organization_view(self) -> OrganizationView:
        return OrganizationView(
            login=self.owner, id=self.organization_id, node_id=f"O_sim{self.organization_id}"
        )

    # ----------------------------------------------------------------- REST side

    def create_jit_runner(self, name: str, labels: list[str]) -> tuple[_Runner, RunnerView]:
        if any(r.name == name for r in self._runners.values()):
            raise ApiError(409, f"Already exists - A runner with the name {name} already exists.")
        runner = _Runner(
            id=self._next_runner_id, name=name, labels=list(labels), secret=secrets.token_urlsafe(24)
        )
        self._next_runner_id += 1
        self._runners[runner.id] = runner
        self._on_change()
        return runner, self._view(runner)

    def delete_runner(self, runner_id: int) -> None:
        runner = self._runner_or_404(runner_id)
        if runner.busy:
            raise ApiError(422, f'Bad request - Runner "{runner.name}" is still running a job"')
        self._remove_runner(runner)

    # ----------------------------------------------------------------- agent side

    def agent_connect(self, config: JitConfig) -> _Runner:
        runner = self._runners.get(config.agent_id)
        if runner is None:
            raise ApiError(404, f"Registration {config.agent_id} was not found.")
        if not hmac.compare_digest(runner.secret.encode(), config.secret.encode()):
            raise ApiError(401, "Invalid runner credentials.")
        if runner.jit_used:
            raise ApiError(409, "This JIT configuration has already been used.")
        runner.jit_used = True
        runner.session_id = secrets.token_urlsafe(16)
        self._connect_seq += 1
        runner.connected_seq = self._connect_seq
        self.connected_names.append(runner.name)
        self._mark_online(runner)
        self._on_change()
        return runner

    def agent_poll(self, runner_id: int, session_id: str) -> _Job | None:
        runner = self._agent_runner(runner_id, session_id)
        self._touch(runner)
        return self._jobs[runner.job_id] if runner.job_id is not None else None

    def agent_heartbeat(self, runner_id: int, session_id: str) -> None:
        self._touch(self._agent_runner(runner_id, session_id))

    def agent_complete(self, runner_id: int, session_id: str, job_id: int, conclusion: Conclusion) -> None:
        runner = self._agent_runner(runner_id, session_id)
        if runner.job_id != job_id:
            raise ApiError(409, f"Job {job_id} is not assigned to runner {runner.name}.")
        self._finish(self._jobs[job_id], conclusion)
        # Ephemeral runners are de-registered by GitHub right after their one job.
        self._remove_runner(runner)

    def reap(self) -> None:
        """Mark runners whose agent went silent offline; fail the job of a busy one."""
        deadline = time.monotonic() - self.agent_timeout_s
        for runner in [r for r in self._runners.values() if r.status == "online" and r.last_seen < deadline]:
            runner.status = "offline"
            if runner.job_id is not None:
                self._finish(self._jobs[runner.job_id], "failure")
                self._remove_runner(runner)
            self._on_change()

    # ----------------------------------------------------------------- jobs

    def queue_job(
        self,
        labels: list[str],
        duration_s: float,
        *,
        name: str = "build",
        workflow_name: str = "CI",
        run_id: int | None = None,
        needs_approval: bool = False,
        repo: str | None = None,
    ) -> int:
        """Queue one job in `repo` (default: the default repository); `run_id` puts it in an
        existing run (a matrix), `needs_approval` holds it in `waiting` until `approve_job`.
        ValueError for a repository the organization lacks, or a run of another repository."""
        where = self.repository(repo)
        if run_id is not None and any(j.run_id == run_id and j.repo != where for j in self._jobs.values()):
            raise ValueError(f"run {run_id} belongs to another repository than {where.name!r}")
        now = _now()
        if run_id is None:
            run_id = self._next_run_id
            self._next_run_id += 1
        job = _Job(
            id=self._next_job_id,
            run_id=run_id,
            repo=where,
            name=name,
            workflow_name=workflow_name,
            labels=list(labels),
            duration_s=duration_s,
            created_at=now,
            head_sha=secrets.token_hex(20),
            status="waiting" if needs_approval else "queued",
        )
        self._next_job_id += 1
        self._jobs[job.id] = job
        if needs_approval:
            self._emit("waiting", job)
        else:
            self._enqueue(job)
        self._on_change()
        return job.id

    def new_run_id(self) -> int:
        run_id = self._next_run_id
        self._next_run_id += 1
        return run_id

    def approve_job(self, job_id: int) -> None:
        """A reviewer approves the deployment: the job becomes queued and may take a runner."""
        job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, "Not Found")
        if job.status != "waiting":
            raise ApiError(409, f"Job {job_id} is not waiting for approval.")
        job.status = "queued"
        self._enqueue(job)
        self._on_change()

    def _enqueue(self, job: _Job) -> None:
        self._emit("queued", job)
        idle = [
            r
            for r in self._runners.values()
            if r.status == "online" and not r.busy and _labels_match(job.labels, r.labels)
        ]
        if idle:
            self._assign(min(idle, key=lambda r: r.connected_seq), job)

    def cancel_job(self, job_id: int) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, "Not Found")
        if job.status == "completed":
            raise ApiError(409, f"Job {job_id} has already completed.")
        runner = self._runners.get(job.runner_id) if job.runner_id is not None else None
        self._finish(job, "cancelled")
        if runner is not None:
            self._remove_runner(runner)
        self._on_change()

    # ----------------------------------------------------------------- internals

    def _runner_or_404(self, runner_id: int) -> _Runner:
        runner = self._runners.get(runner_id)
        if runner is None:
            raise ApiError(404, "Not Found")
        return runner

    def _agent_runner(self, runner_id: int, session_id: str) -> _Runner:
        runner = self._runners.get(runner_id)
        if runner is None:
            if runner_id in self._deleted_runner_ids:
                raise ApiError(410, "The runner registration has been deleted from the server.")
            raise ApiError(404, f"Registration {runner_id} was not found.")
        if runner.session_id is None or not hmac.compare_digest(runner.session_id, session_id):
            raise ApiError(401, "Invalid runner session.")
        return runner

    def _touch(self, runner: _Runner) -> None:
        runner.last_seen = time.monotonic()
        if runner.status == "offline":
            # The agent came back after being presumed dead; GitHub shows it online again.
            self._mark_online(runner)
            self._on_change()

    def _mark_online(self, runner: _Runner) -> None:
        runner.status = "online"
        runner.last_seen = time.monotonic()
        if runner.busy:
            return
        waiting = sorted(
            (
                j
                for j in self._jobs.values()
                if j.status == "queued" and _labels_match(j.labels, runner.labels)
            ),
            key=lambda j: j.id,
        )
        if waiting:
            self._assign(runner, waiting[0])

    def _assign(self, runner: _Runner, job: _Job) -> None:
        runner.busy = True
        runner.job_id = job.id
        job.status = "in_progress"
        job.started_at = _now()
        job.runner_id = runner.id
        job.runner_name = runner.name
        job.steps = [
            StepView(
                name="Set up job",
                status="in_progress",
                conclusion=None,
                number=1,
                started_at=job.started_at,
                completed_at=None,
            )
        ]
        self._emit("in_progress", job)

    def _finish(self, job: _Job, conclusion: Conclusion) -> None:
        job.status = "completed"
        job.conclusion = conclusion
        job.completed_at = _now()
        for step in job.steps:
            step.status = "completed"
            step.conclusion = step.conclusion or conclusion
            step.completed_at = step.completed_at or job.completed_at
        self._emit("completed", job)

    def _remove_runner(self, runner: _Runner) -> None:
        self.runner_lifetimes[runner.name] = time.time() - runner.created_at
        del self._runners[runner.id]
        self._deleted_runner_ids.add(runner.id)
        self._on_change()

    def _emit(self, action: JobStatus, job: _Job) -> None:
        self._on_job_event(
            WorkflowJobEvent(
                action=action,
                workflow_job=self._workflow_job(job),
                repository=self.repository_view(job.repo.name),
                organization=self.organization_view(),
                sender=OwnerView(login="sim-user", id=1, type="User"),
                installation=(
                    None
                    if self.installation_id is None
                    else InstallationView(id=self.installation_id, node_id=f"MDI_sim{self.installation_id}")
                ),
            )
        )

    def _workflow_job(self, job: _Job) -> WorkflowJobView:
        api_repo = f"{self.api_base_url}/repos/{self.owner}/{job.repo.name}"
        assigned = job.runner_id is not None
        return WorkflowJobView(
            id=job.id,
            run_id=job.run_id,
            run_attempt=1,
            name=job.name,
            workflow_name=job.workflow_name,
            head_branch="main",
            head_sha=job.head_sha,
            labels=list(job.labels),
            status=job.status,
            conclusion=job.conclusion,
            created_at=job.created_at,
            # GitHub fills started_at with the creation time while a job is still queued.
            started_at=job.started_at or job.created_at,
            completed_at=job.completed_at,
            runner_id=job.runner_id,
            runner_name=job.runner_name,
            runner_group_id=DEFAULT_GROUP_ID if assigned else None,
            runner_group_name=DEFAULT_GROUP_NAME if assigned else None,
            steps=[s.model_copy() for s in job.steps],
            url=f"{api_repo}/actions/jobs/{job.id}",
            html_url=f"https://github.com/{self.owner}/{job.repo.name}/actions/runs/{job.run_id}/job/{job.id}",
            run_url=f"{api_repo}/actions/runs/{job.run_id}",
            check_run_url=f"{api_repo}/check-runs/{job.id}",
            node_id=f"CR_sim{job.id}",
        )

    def _view(self, runner: _Runner) -> RunnerView:
        return RunnerView(
            id=runner.id,
            name=runner.name,
            os="linux",
            status=runner.status,
            busy=runner.busy,
            ephemeral=True,
            labels=[self._label(name) for name in runner.labels],
            runner_group_id=DEFAULT_GROUP_ID,
        )

    def _label(self, name: str) -> LabelView:
        label_id = self._label_ids.setdefault(name, len(self._label_ids) + 1)
        kind: Literal["read-only", "custom"] = "read-only" if name in _READ_ONLY_LABELS else "custom"
        return LabelView(id=label_id, name=name, type=kind)


# ---------------------------------------------------------------------------------------------
# GitHub App authentication: App JWTs in, installation tokens out.
# ---------------------------------------------------------------------------------------------

# GitHub caps an App JWT's lifetime at ten minutes; the slack forgives a client whose clock
# ticked between computing iat and exp.
JWT_MAX_LIFETIME_S = 600
JWT_SLACK_S = 30
_TOKEN_ALPHABET = string.ascii_letters + string.digits
_JWT_UNDECODABLE = "A JSON web token could not be decoded"
_B64URL_CHARS = frozenset(string.ascii_letters + string.digits + "-_")


def _b64url_decode(segment: str) -> bytes:
    if not segment or not set(segment) <= _B64URL_CHARS:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass, but true is not a timestamp.
    return isinstance(value, int) and not isinstance(value, bool)


class AppAuth:
    """One GitHub App with one installation: verifies App JWTs and issues installation tokens.

    Error wording follows what GitHub answers where known; the checks themselves are the
    documented ones (RS256 signature, iss, exp in the future, at most ten minutes of lifetime).
    """

    def __init__(
        self,
        *,
        app_id: int,
        public_key_pem: str,
        installation_id: int,
        token_ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        key = serialization.load_pem_public_key(public_key_pem.encode())
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("app_public_key_pem must be an RSA public key")
        self.app_id = app_id
        self.installation_id = installation_id
        self.token_ttl_s = token_ttl_s
        self._key = key
        self._clock = clock
        self._tokens: dict[str, float] = {}  # token -> expiry, epoch seconds

    def verify_jwt(self, authorization: str) -> None:
        """Check an ``Authorization`` header value; raises ``ApiError(401)`` unless it holds a
        valid JWT for this App."""
        scheme, _, jwt = authorization.partition(" ")
        if scheme.lower() != "bearer" or jwt.count(".") != 2:
            raise ApiError(401, _JWT_UNDECODABLE)
        header_b64, claims_b64, signature_b64 = jwt.strip().split(".")
        try:
            header = json.loads(_b64url_decode(header_b64))
            claims = json.loads(_b64url_decode(claims_b64))
            signature = _b64url_decode(signature_b64)
        except ValueError as exc:  # bad base64, bad UTF-8 and bad JSON alike
            raise ApiError(401, _JWT_UNDECODABLE) from exc
        if not isinstance(header, dict) or not isinstance(claims, dict) or header.get("alg") != "RS256":
            raise ApiError(401, _JWT_UNDECODABLE)
        try:
            self._key.verify(
                signature, f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature as exc:
            raise ApiError(401, _JWT_UNDECODABLE) from exc
        now = self._clock()
        iat, exp, iss = claims.get("iat"), claims.get("exp"), claims.get("iss")
        if not _is_int(iat) or iat > now + JWT_SLACK_S:
            raise ApiError(
                401,
                "'Issued at' claim ('iat') must be an Integer representing the time that the "
                "assertion was issued",
            )
        if not _is_int(exp) or exp <= now:
            raise ApiError(
                401,
                "'Expiration time' claim ('exp') must be a numeric value representing the future "
                "time at which the assertion expires",
            )
        if exp - iat > JWT_MAX_LIFETIME_S + JWT_SLACK_S or exp > now + JWT_MAX_LIFETIME_S + JWT_SLACK_S:
            raise ApiError(401, "'Expiration time' claim ('exp') is too far in the future")
        if iss is None or str(iss) != str(self.app_id):
            raise ApiError(401, "Integration not found")

    def issue(self, installation_id: int) -> tuple[str, datetime]:
        """A new installation token and its expiry; ``ApiError(404)`` for another installation."""
        if installation_id != self.installation_id:
            raise ApiError(404, "Not Found")
        now = self._clock()
        # Forget lapsed tokens so a long run does not accumulate them.
        self._tokens = {token: expiry for token, expiry in self._tokens.items() if expiry > now}
        # Not the classic 40 characters: GitHub is rolling out longer tokens, and clients must
        # not depend on the length.
        token = "ghs_" + "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(52))
        expiry = now + self.token_ttl_s
        self._tokens[token] = expiry
        # GitHub states whole seconds; rounding down makes the client refresh early, never late.
        return token, datetime.fromtimestamp(math.floor(expiry), UTC)

    def token_valid(self, token: str) -> bool:
        expiry = self._tokens.get(token)
        return expiry is not None and self._clock() < expiry

    def revoke_all(self) -> None:
        self._tokens.clear()
