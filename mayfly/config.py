"""Settings, validated once at start so a bad field fails loudly and by name."""

from __future__ import annotations

import os
import re
import socket
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from mayfly.models import DEFAULT_SCOPE, RunnerRecipe

POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
# A scope's name is also its runners' name prefix and part of its workflow ids.
SCOPE_NAME = r"^[a-z][a-z0-9]{0,15}$"
REPOSITORY = re.compile(r"^[\w.-]+/[\w.-]+$")
# HMAC and HKDF inputs shorter than the hash's output weaken them; 32 bytes also rules out
# the empty string an unset environment variable leaves behind.
MIN_SECRET_BYTES = 32
# The file load_settings was given: named for one construction, so loading one file never
# leaks into settings built later in the same process (as MAYFLY_CONFIG in os.environ would).
_config_file: ContextVar[Path | None] = ContextVar("mayfly_config_file", default=None)


def require_strong_secret(value: SecretStr | None) -> SecretStr | None:
    if value is not None and len(value.get_secret_value().encode()) < MIN_SECRET_BYTES:
        raise ValueError(
            f"must be at least {MIN_SECRET_BYTES} bytes (got {len(value.get_secret_value().encode())}); "
            "generate one with `openssl rand -hex 32`"
        )
    return value


HOST_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


def default_host_id() -> str:
    """The machine's short hostname, reduced to what a task queue name may carry."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]).strip("-.")
    return cleaned[:63] or "host"


class LocalBackendSettings(BaseModel):
    kind: Literal["local"] = "local"
    # The actions runner reads its JIT config from ACTIONS_RUNNER_INPUT_JITCONFIG, so the
    # default is the real runner's entry point; the demo swaps in the simulated runner.
    # The listener itself, not run.sh, which exits 0 even when the listener failed.
    command: list[str] = Field(default_factory=lambda: ["./bin/Runner.Listener", "run"], min_length=1)
    workdir: Path | None = None
    state_dir: Path = Path(".mayfly/local-backend")
    # Only these variables (and PATH, LANG and a private HOME) reach a runner; nothing else of
    # the worker's environment does.
    env: dict[str, str] = Field(default_factory=dict)
    # Run runners as this unprivileged user (name or uid). A worker running as root drops to it
    # in the child (setgid, setgroups([]), setuid); a worker that is not root can only use its
    # own user. Unset: runners run as the worker's user, which is only safe on a throwaway host.
    run_as_user: str | None = Field(default=None, min_length=1)


RUNNER_VERSION = "2.336.0"


class ModalBackendSettings(BaseModel):
    kind: Literal["modal"] = "modal"
    app_name: str = Field(default="mayfly-runners", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    # Credentials come from MODAL_TOKEN_ID / MODAL_TOKEN_SECRET or ~/.modal.toml, as for the modal CLI.
    environment: str | None = None
    # A registry image with the actions runner in /opt/actions-runner; by default Mayfly builds
    # one from debian-slim with the pinned runner release below.
    image: str | None = None
    # Modal expects python in an image; set this (e.g. "3.12") for registry images without one.
    image_add_python: str | None = None
    runner_version: str = RUNNER_VERSION
    # The listener itself, not run.sh: run.sh exits 0 even when the listener failed.
    command: list[str] = Field(
        default_factory=lambda: ["/opt/actions-runner/bin/Runner.Listener", "run"], min_length=1
    )
    gpu: str | None = None
    cpu: float | None = Field(default=None, gt=0)
    memory_mib: int | None = Field(default=None, gt=0)
    region: str | None = None
    cloud: str | None = None
    # Bounds how long Modal's server-directed throttling may hold a create (MODAL_MAX_THROTTLE_WAIT).
    max_throttle_wait_s: int = Field(default=300, ge=0)


BackendSettings = Annotated[LocalBackendSettings | ModalBackendSettings, Field(discriminator="kind")]


class PoolSettings(BaseModel):
    name: str
    labels: list[str] = Field(min_length=1)
    max_runners: int = Field(ge=0, le=10_000)
    backend: BackendSettings = Field(default_factory=LocalBackendSettings)
    registration_timeout_s: float = Field(default=120.0, gt=0)
    # How long after a spawn the workflow first asks GitHub whether the runner registered, when
    # no webhook has said so (then this often). The webhook usually wins, and then no poll runs.
    registration_poll_s: float = Field(default=10.0, gt=0)
    max_registration_attempts: int = Field(default=3, ge=1)
    # A runner that never gets a job, or one that runs too long, is reaped anyway so a
    # stuck container cannot hold a slot forever.
    idle_ttl_s: float = Field(default=300.0, gt=0)
    max_lifetime_s: float = Field(default=6 * 3600.0, gt=0)
    # Registered, idle runners kept ready (a warm pool); they hold slots and count against the cap.
    min_idle: int = Field(default=0, ge=0)
    # The scopes (`[[scopes]]` names) whose jobs this pool serves; empty: every scope.
    scopes: list[str] = Field(default_factory=list)
    # The runner group its runners join; None: the scope's (`github.runner_group_id`).
    runner_group_id: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _min_idle_within_cap(self) -> PoolSettings:
        if self.min_idle > self.max_runners:
            raise ValueError(
                f"min_idle ({self.min_idle}) must not exceed max_runners ({self.max_runners}): "
                "warm runners hold slots of the pool's cap"
            )
        return self

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, value: str) -> str:
        if not POOL_NAME.match(value):
            raise ValueError("must be lowercase letters, digits and '-', at most 31 characters")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_not_blank(cls, value: list[str]) -> list[str]:
        if any(not label.strip() for label in value):
            raise ValueError("labels must not be blank")
        return value

    def serves(self, job_labels: list[str]) -> bool:
        """GitHub matches a runner when the job's labels are a subset of the runner's (case-insensitive)."""
        mine = {label.lower() for label in self.labels}
        return all(label.lower() in mine for label in job_labels)


def _owner_name(value: str) -> str:
    if not REPOSITORY.match(value):
        raise ValueError("must look like 'owner/name'")
    return value


def _api_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value.rstrip("/")


RepositoryName = Annotated[str, AfterValidator(_owner_name)]
ApiUrl = Annotated[str, AfterValidator(_api_url)]


class GitHubSettings(BaseModel):
    api_url: ApiUrl = "https://api.github.com"
    repository: RepositoryName | None = None
    organization: str | None = None
    # Either a PAT (token) or a GitHub App (app_id + installation_id + private key).
    token: SecretStr | None = None
    app_id: int | None = Field(default=None, ge=1)
    installation_id: int | None = Field(default=None, ge=1)
    private_key: SecretStr | None = None
    private_key_path: Path | None = None
    webhook_secret: SecretStr | None = None
    runner_group_id: int = Field(default=1, ge=1)
    runner_name_prefix: str = Field(default="mayfly", pattern=r"^[a-z][a-z0-9]{0,15}$")
    request_timeout_s: float = Field(default=10.0, gt=0, le=60)
    # GitHub calls run on their own task queue with a server-side rate limit, so a burst of
    # jobs becomes a steady trickle of registration calls instead of a burst of 502s.
    max_calls_per_second: float = Field(default=10.0, gt=0)

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_is_strong(cls, value: SecretStr | None) -> SecretStr | None:
        return require_strong_secret(value)

    @model_validator(mode="after")
    def _one_credential(self) -> GitHubSettings:
        app_fields = [self.app_id, self.private_key or self.private_key_path]
        if self.token is not None and any(field is not None for field in [*app_fields, self.installation_id]):
            raise ValueError("set either github.token or the github.app_* fields, not both")
        if any(field is not None for field in app_fields) and not all(
            field is not None for field in app_fields
        ):
            raise ValueError("a GitHub App needs github.app_id and github.private_key(_path)")
        if self.installation_id is not None and self.app_id is None:
            raise ValueError(
                "github.installation_id needs the App: github.app_id and github.private_key(_path)"
            )
        if self.private_key is not None and self.private_key_path is not None:
            raise ValueError("set only one of github.private_key and github.private_key_path")
        if self.private_key_path is not None and not self.private_key_path.is_file():
            raise ValueError(f"github.private_key_path: no file at {self.private_key_path}")
        return self

    @property
    def uses_app(self) -> bool:
        return self.app_id is not None

    def private_key_pem(self) -> str:
        if self.private_key is not None:
            return self.private_key.get_secret_value()
        assert self.private_key_path is not None
        return self.private_key_path.read_text()

    @property
    def runners_path(self) -> str:
        if self.repository is not None:
            return f"/repos/{self.repository}/actions/runners"
        return f"/orgs/{self.organization}/actions/runners"


class ScopeSettings(BaseModel):
    """One repository or organization a deployment serves, with its own credential: a PAT
    (`token`), or an installation of the App configured under `[github]`. Unset fields come
    from `[github]`."""

    name: str = Field(pattern=SCOPE_NAME)
    repository: RepositoryName | None = None
    organization: str | None = Field(default=None, pattern=r"^[\w.-]{1,39}$")
    # GitHub Enterprise Server: its API, e.g. https://ghe.example.com/api/v3.
    api_url: ApiUrl | None = None
    token: SecretStr | None = None
    installation_id: int | None = Field(default=None, ge=1)
    runner_group_id: int | None = Field(default=None, ge=1)
    # The scope's own throttle: its calls run on their own rate-limited task queue.
    max_calls_per_second: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_target_one_credential(self) -> ScopeSettings:
        if (self.repository is None) == (self.organization is None):
            raise ValueError(f"scope {self.name}: set exactly one of repository or organization")
        if self.token is not None and self.installation_id is not None:
            raise ValueError(f"scope {self.name}: set either token or installation_id, not both")
        return self


class TemporalSettings(BaseModel):
    address: str = "localhost:7233"
    # Where `mayfly explain` points for a workflow's page; the dev server's UI by default.
    ui_url: str = "http://localhost:8233"
    # Temporal Cloud namespaces look like "<name>.<account>".
    namespace: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
    task_queue: str = "mayfly"
    # None: TLS whenever a certificate, a CA or an API key is configured. True with nothing
    # else: TLS against the system's root CAs (Temporal Cloud with an API key needs no more).
    tls: bool | None = None
    # PEM files. The CA verifies the server; cert and key authenticate Mayfly (mTLS).
    tls_ca_path: Path | None = None
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    # The name the server certificate must carry, when it is not the host in `address`.
    tls_server_name: str | None = None
    # Temporal Cloud API key (MAYFLY_TEMPORAL__API_KEY); sent as a bearer token, so only over TLS.
    api_key: SecretStr | None = None

    @property
    def github_task_queue(self) -> str:
        return self.github_queue(DEFAULT_SCOPE)

    def github_queue(self, scope: str) -> str:
        """Each scope's GitHub calls have a queue of their own, so each has its own throttle."""
        base = f"{self.task_queue}-github"
        return base if scope == DEFAULT_SCOPE else f"{base}-{scope}"

    @property
    def uses_tls(self) -> bool:
        if self.tls is not None:
            return self.tls
        return any(
            value is not None
            for value in (self.tls_ca_path, self.tls_cert_path, self.tls_key_path, self.api_key)
        )

    @field_validator("api_key")
    @classmethod
    def _api_key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is empty; unset it or give the key")
        return value

    @model_validator(mode="after")
    def _tls_is_consistent(self) -> TemporalSettings:
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ValueError(
                "temporal.tls_cert_path and temporal.tls_key_path go together: set both or neither"
            )
        for name in ("tls_ca_path", "tls_cert_path", "tls_key_path"):
            path: Path | None = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"temporal.{name}: no file at {path}")
        if self.tls is False:
            if self.api_key is not None:
                raise ValueError("temporal.api_key requires TLS; remove temporal.tls = false")
            if any(p is not None for p in (self.tls_ca_path, self.tls_cert_path, self.tls_key_path)):
                raise ValueError("temporal.tls = false contradicts the temporal.tls_* paths that are set")
        return self


class StarterSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=1_000_000, gt=0)
    # Past this many open connections and requests in progress, new ones get a 503 at once.
    max_concurrency: int = Field(default=200, ge=1)
    # Deadline for a request's head, and separately for its body, before the signature is
    # checked: a slow client cannot hold a connection open for free.
    read_timeout_s: float = Field(default=10.0, gt=0, le=60)
    keep_alive_s: int = Field(default=5, ge=1, le=300)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)


class MayflySettings(BaseSettings):
    """Loaded from the TOML file named by MAYFLY_CONFIG (if any), then MAYFLY_* env vars."""

    model_config = SettingsConfigDict(env_prefix="MAYFLY_", env_nested_delimiter="__", extra="forbid")

    github: GitHubSettings
    # Several repositories or organizations; unset: the one `github.repository` or
    # `github.organization` names.
    scopes: list[ScopeSettings] = Field(default_factory=list)
    temporal: TemporalSettings = Field(default_factory=TemporalSettings)
    starter: StarterSettings = Field(default_factory=StarterSettings)
    pools: list[PoolSettings] = Field(min_length=1)
    # Seals JIT configs between activities so they never sit in workflow history in plaintext.
    # Every worker needs the same one; `mayfly worker` refuses to start without it.
    secret_key: SecretStr | None = None
    # Rotation: the new key goes in secret_key, the old ones here until no running job can
    # still hold a config sealed under them (max_lifetime_s of the longest pool).
    previous_secret_keys: list[SecretStr] = Field(default_factory=list)
    semaphore_reap_interval_s: float = Field(default=20.0, gt=0)
    sweep_interval_s: float = Field(default=60.0, gt=0)
    # Queued jobs younger than this are left to their webhook before the sweeper steps in.
    reconcile_min_age_s: float = Field(default=120.0, ge=0)
    # A job workflow gives up once its job has waited this long (GitHub cancels a job that
    # stays queued for 24 h), and the sweeper restarts no workflow for a job older than this.
    job_deadline_s: float = Field(default=24 * 3600.0, gt=0)
    # How often a job workflow that waits long (for approval, a slot, or a job for its idle
    # runner) asks GitHub whether its job still needs a runner, in case webhooks were lost.
    job_status_check_interval_s: float = Field(default=300.0, gt=0)
    # How many times the sweeper starts a new workflow for a job that GitHub still has queued
    # after its workflow closed (failed, terminated, cancelled) without serving it.
    max_job_restarts: int = Field(default=3, ge=0)
    # Keep it below the orchestrator's kill deadline (Kubernetes terminationGracePeriodSeconds).
    worker_graceful_shutdown_s: float = Field(default=30.0, ge=0)
    # "json" writes one object per line, for log shippers.
    log_format: Literal["text", "json"] = "text"
    # Names this worker's host queue `<task_queue>-host-<host_id>`, where the local backend's
    # wait_exit, terminate and container sweeps run, since only this host sees its processes.
    # Every worker host needs its own; two workers sharing one state_dir on one machine may share it.
    host_id: str = Field(default_factory=default_host_id, pattern=HOST_ID)
    # Container-watching activities (one per live runner, a poll and a heartbeat each) run on
    # their own workers with this many slots, so live runners are not capped by activity slots.
    max_watched_containers: int = Field(default=5000, ge=1, le=100_000)
    # Workflow tasks the main worker takes at once (the SDK's default). Activations run one at a
    # time in the interpreter, so on a small, saturated worker a burst of thousands of jobs
    # queues tasks inside the worker, where their 10 s timeout runs; fewer slots leave them
    # queued on the server instead, at some cost to a burst's first wave (see the README).
    workflow_task_slots: int = Field(default=100, ge=2, le=1000)
    # host:port for the worker's /healthz and /readyz; unset = off.
    health_bind_address: str | None = Field(default=None, pattern=r"^[\w.-]+:\d{1,5}$")
    # host:port for the worker's Prometheus endpoint (SDK and Mayfly metrics); unset = off.
    metrics_bind_address: str | None = Field(default=None, pattern=r"^[\w.-]+:\d{1,5}$")

    @field_validator("secret_key")
    @classmethod
    def _secret_key_is_strong(cls, value: SecretStr | None) -> SecretStr | None:
        return require_strong_secret(value)

    @field_validator("previous_secret_keys")
    @classmethod
    def _previous_keys_are_strong(cls, values: list[SecretStr]) -> list[SecretStr]:
        for value in values:
            require_strong_secret(value)
        return values

    @model_validator(mode="after")
    def _previous_keys_need_a_current_one(self) -> MayflySettings:
        if self.previous_secret_keys and self.secret_key is None:
            raise ValueError("previous_secret_keys is set but secret_key is not: the newest key seals")
        return self

    _github_scopes: dict[str, GitHubSettings] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _resolve_scopes(self) -> MayflySettings:
        github = self.github
        if not self.scopes:
            if (github.repository is None) == (github.organization is None):
                raise ValueError(
                    "set exactly one of github.repository or github.organization, or list [[scopes]]"
                )
            if github.uses_app and github.installation_id is None:
                raise ValueError("a GitHub App needs github.installation_id")
            self._github_scopes = {DEFAULT_SCOPE: github}
        else:
            if github.repository is not None or github.organization is not None:
                raise ValueError(
                    "with [[scopes]], each scope names its repository or organization: "
                    "remove github.repository and github.organization"
                )
            names = [scope.name for scope in self.scopes]
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ValueError(f"scope names must be unique, repeated: {', '.join(repeated)}")
            self._github_scopes = {scope.name: _resolve_scope(github, scope) for scope in self.scopes}
        for index, pool in enumerate(self.pools):
            unknown = [name for name in pool.scopes if name not in self._github_scopes]
            if unknown:
                raise ValueError(
                    f"pools.{index}.scopes: no scope named {', '.join(unknown)} "
                    f"(configured: {', '.join(self._github_scopes)})"
                )
            if pool.min_idle > 0 and len(self.pool_scopes(pool)) != 1:
                raise ValueError(
                    f"pools.{index}: a warm pool (min_idle > 0) registers its runners in one scope; "
                    "name exactly one in its scopes"
                )
        return self

    @field_validator("pools")
    @classmethod
    def _unique_pool_names(cls, pools: list[PoolSettings]) -> list[PoolSettings]:
        names = [pool.name for pool in pools]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"pool names must be unique, repeated: {', '.join(duplicates)}")
        return pools

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get() or os.environ.get("MAYFLY_CONFIG")
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    @property
    def github_scopes(self) -> dict[str, GitHubSettings]:
        """Each scope's GitHub settings, complete: one repository or organization, one credential."""
        return self._github_scopes

    def pool_scopes(self, pool: PoolSettings) -> list[str]:
        return pool.scopes or list(self._github_scopes)

    def runner_prefix(self, scope: str) -> str:
        return self._github_scopes[scope].runner_name_prefix

    def runner_recipe(self, pool: PoolSettings, scope: str) -> RunnerRecipe:
        """How `pool` makes its runners for jobs of `scope`, for job and warm runners alike."""
        return RunnerRecipe(
            pool=pool.name,
            labels=pool.labels,
            scope=scope,
            runner_group_id=pool.runner_group_id,
            runner_name_prefix=self.runner_prefix(scope),
            github_task_queue=self.temporal.github_queue(scope),
            registration_timeout_s=pool.registration_timeout_s,
            registration_poll_s=pool.registration_poll_s,
            max_lifetime_s=pool.max_lifetime_s,
            status_check_interval_s=self.job_status_check_interval_s,
        )

    def pool_for(self, job_labels: list[str], scope: str = DEFAULT_SCOPE) -> PoolSettings | None:
        """The most specific pool whose labels cover the job's: the one with the fewest labels
        the job did not ask for; ties go to the pool listed first.

        So a `[self-hosted, linux]` job lands on a plain linux pool, not on a GPU pool listed
        before it, and a GPU box is only used by jobs that ask for one (or when nothing else
        serves them)."""
        wanted = {label.lower() for label in job_labels}
        serving = [
            (len({label.lower() for label in pool.labels} - wanted), order, pool)
            for order, pool in enumerate(self.pools)
            if pool.serves(job_labels) and scope in self.pool_scopes(pool)
        ]
        return min(serving, key=lambda entry: entry[:2])[2] if serving else None


def _resolve_scope(github: GitHubSettings, scope: ScopeSettings) -> GitHubSettings:
    """A scope's complete GitHub settings: its own target and credential over `[github]`'s."""
    if scope.token is None and scope.installation_id is None and github.token is None:
        raise ValueError(f"scope {scope.name}: set its token or installation_id (or github.token)")
    if scope.installation_id is not None and not github.uses_app:
        raise ValueError(
            f"scope {scope.name}: installation_id needs the App: github.app_id and github.private_key(_path)"
        )
    app = scope.installation_id is not None
    return github.model_copy(
        update={
            "repository": scope.repository,
            "organization": scope.organization,
            "api_url": scope.api_url or github.api_url,
            "token": None if app else (scope.token or github.token),
            "app_id": github.app_id if app else None,
            "installation_id": scope.installation_id,
            "runner_group_id": scope.runner_group_id or github.runner_group_id,
            "runner_name_prefix": scope.name,
            "max_calls_per_second": scope.max_calls_per_second or github.max_calls_per_second,
        }
    )


class ConfigError(Exception):
    """A configuration problem, already phrased for a human."""


def describe_validation_error(error: ValidationError) -> str:
    lines = ["invalid Mayfly configuration:"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(root)"
        lines.append(f"  {field}: {item['msg']}")
    return "\n".join(lines)


def load_settings(config_path: Path | None = None) -> MayflySettings:
    if config_path is not None:
        if not config_path.is_file():
            raise ConfigError(f"config file not found: {config_path}")
    token = _config_file.set(config_path)
    try:
        return MayflySettings()
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None
    finally:
        _config_file.reset(token)


def load_settings_or_report(config_path: Path | None) -> MayflySettings | None:
    """For command-line entry points: the settings, or None after printing why they are invalid."""
    try:
        return load_settings(config_path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return None
