"""The embedded stack: simulator + webhook starter + worker + local backend in one process.

`mayfly dev` runs it against a local Temporal dev server; the end-to-end tests run it against
the test's dev server. Only the GitHub side is simulated; Temporal and the processes are real.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from mayfly.app.starter import create_starter_app
from mayfly.app.wiring import build_workers, start_sweeper, sync_warm_pools
from mayfly.backends import ContainerBackend
from mayfly.backends.local import LocalProcessBackend
from mayfly.config import (
    GitHubSettings,
    LocalBackendSettings,
    MayflySettings,
    PoolSettings,
    StarterSettings,
    TemporalSettings,
)
from mayfly.github import GitHubClient
from mayfly.github_factory import scope_clients
from mayfly.models import SemaphoreStatus, job_workflow_id, semaphore_workflow_id
from mayfly.sealing import Sealer
from mayfly.serving import RunningServer, serve
from simulator import FaultConfig, GitHubSimulator
from simulator.app_keys import generate_app_key

DEMO_POOL = "demo"
DEMO_APP_ID = 424242
DEMO_INSTALLATION_ID = 7
DEMO_LABELS = ["self-hosted", "linux", "mayfly-demo"]
SIMULATED_RUNNER = [sys.executable, "-m", "simulator.runner"]


class EmbeddedStack:
    def __init__(
        self,
        client: Client,
        *,
        state_dir: Path,
        max_runners: int = 3,
        task_queue: str = "mayfly",
        pool: str = DEMO_POOL,
        runner_command: list[str] | None = None,
        runner_env: dict[str, str] | None = None,
        registration_timeout_s: float = 60.0,
        max_registration_attempts: int = 3,
        idle_ttl_s: float = 120.0,
        max_lifetime_s: float = 600.0,
        semaphore_reap_interval_s: float = 5.0,
        sweep_interval_s: float = 10.0,
        simulator_port: int = 0,
        starter_port: int = 0,
        faults: FaultConfig | None = None,
        wrap_backend: Callable[[ContainerBackend], ContainerBackend] | None = None,
        run_worker: bool = True,
        backend: ContainerBackend | None = None,
        secret_key: str | None = None,
        # Short by default so tests confirm registration fast even when webhooks are dropped;
        # the product default (10 s) lets the in_progress webhook win and saves an API call.
        registration_poll_s: float = 1.0,
        # Authenticate as a GitHub App (installation tokens) instead of with a PAT.
        use_github_app: bool = False,
        reconcile_min_age_s: float = 2.0,
        job_deadline_s: float = 24 * 3600.0,
        job_status_check_interval_s: float = 300.0,
        min_idle: int = 0,
        # False leaves the semaphores to a process of their own (`mayfly worker --role semaphores`).
        run_semaphores: bool = True,
    ) -> None:
        self.client = client
        self._state_dir = state_dir
        self._simulator_port = simulator_port
        self._starter_port = starter_port
        token = secrets.token_urlsafe(16)
        webhook_secret = secrets.token_hex(32)
        # GitHub job ids are unique for ever; a fresh range per stack keeps that true across demo
        # runs that share one Temporal database, and across tests that share one dev server.
        first_job_id = int(time.time() * 1000) % 10**12 * 10
        self._app_key_pem: str | None = None
        public_pem: str | None = None
        if use_github_app:
            keys = generate_app_key()
            self._app_key_pem, public_pem = keys.private_pem, keys.public_pem
        self.simulator = GitHubSimulator(
            token=token,
            webhook_secret=webhook_secret,
            faults=faults,
            first_job_id=first_job_id,
            app_id=DEMO_APP_ID if use_github_app else None,
            app_public_key_pem=public_pem,
            installation_id=DEMO_INSTALLATION_ID,
        )
        self._pool = PoolSettings(
            name=pool,
            labels=DEMO_LABELS,
            max_runners=max_runners,
            backend=LocalBackendSettings(
                command=runner_command or SIMULATED_RUNNER,
                state_dir=state_dir / "local-backend",
                env=runner_env or {},
            ),
            registration_timeout_s=registration_timeout_s,
            registration_poll_s=registration_poll_s,
            max_registration_attempts=max_registration_attempts,
            idle_ttl_s=idle_ttl_s,
            max_lifetime_s=max_lifetime_s,
            min_idle=min_idle,
        )
        self._token = token
        self._webhook_secret = webhook_secret
        self._task_queue = task_queue
        self._reap_interval_s = semaphore_reap_interval_s
        self._run_worker = run_worker
        self._run_semaphores = run_semaphores
        self._secret_key = secret_key
        self._registration_poll_s = registration_poll_s
        self._reconcile_min_age_s = reconcile_min_age_s
        self._job_deadline_s = job_deadline_s
        self._job_status_check_interval_s = job_status_check_interval_s
        self._sweep_interval_s = sweep_interval_s
        self.settings: MayflySettings | None = None
        self.backend: ContainerBackend = backend or LocalProcessBackend(self._pool.backend)  # type: ignore[arg-type]
        # The worker may see the backend through a fault-injecting wrapper; checks use the real one.
        self._worker_backend: ContainerBackend = wrap_backend(self.backend) if wrap_backend else self.backend
        self._github: dict[str, GitHubClient] | None = None
        self._github_context: AbstractAsyncContextManager[dict[str, GitHubClient]] | None = None
        self._starter: RunningServer | None = None
        self._workers: list[Worker] = []
        self._worker_tasks: list[asyncio.Task[None]] = []

    @property
    def backend_state_dir(self) -> Path:
        return self._state_dir / "local-backend"

    @property
    def starter_url(self) -> str:
        assert self._starter is not None
        return f"{self._starter.url}/webhook"

    def _credentials(self) -> dict[str, object]:
        if self._app_key_pem is None:
            return {"token": self._token}
        return {
            "app_id": DEMO_APP_ID,
            "installation_id": DEMO_INSTALLATION_ID,
            "private_key": self._app_key_pem,
        }

    async def start(self) -> None:
        await self.simulator.start(port=self._simulator_port)
        self.settings = MayflySettings(
            github=GitHubSettings(
                api_url=self.simulator.url,
                repository=f"{self.simulator.owner}/{self.simulator.repo}",
                webhook_secret=self._webhook_secret,
                **self._credentials(),
            ),
            temporal=TemporalSettings(task_queue=self._task_queue),
            starter=StarterSettings(port=self._starter_port),
            pools=[self._pool],
            semaphore_reap_interval_s=self._reap_interval_s,
            sweep_interval_s=self._sweep_interval_s,
            reconcile_min_age_s=self._reconcile_min_age_s,
            job_deadline_s=self._job_deadline_s,
            job_status_check_interval_s=self._job_status_check_interval_s,
        )
        client = self.client

        async def client_provider() -> Client:
            return client

        self._starter = await serve(
            create_starter_app(self.settings, client_provider), port=self._starter_port
        )
        self.simulator.webhook_url = self.starter_url
        self._github_context = scope_clients(self.settings)
        self._github = await self._github_context.__aenter__()
        if self._run_worker:
            await self.start_workers()

    async def start_workers(self) -> None:
        assert self.settings is not None and self._github is not None
        # One process, so a per-process key works here; a real worker must be given one.
        sealer = Sealer.from_secrets(self._secret_key) if self._secret_key else Sealer.ephemeral()
        self._workers = build_workers(
            self.client,
            self.settings,
            github=self._github,
            backends={self._pool.name: self._worker_backend},
            sealer=sealer,
            registration_poll_interval_s=self._registration_poll_s,
            graceful_shutdown_s=5.0,
            with_semaphores=self._run_semaphores,
        )
        self._worker_tasks = [asyncio.create_task(worker.run()) for worker in self._workers]
        await start_sweeper(self.client, self.settings)
        await sync_warm_pools(self.client, self.settings)

    async def set_min_idle(self, min_idle: int) -> None:
        """What a worker restart with a changed `min_idle` in the config does."""
        assert self.settings is not None
        self._pool = self._pool.model_copy(update={"min_idle": min_idle})
        self.settings = self.settings.model_copy(update={"pools": [self._pool]})
        await sync_warm_pools(self.client, self.settings)

    async def stop(self) -> None:
        if self._starter is not None:
            await self._starter.stop()
        await asyncio.gather(*(worker.shutdown() for worker in self._workers))
        await asyncio.gather(*self._worker_tasks)
        if self._github_context is not None:
            await self._github_context.__aexit__(None, None, None)
        await self.simulator.stop()
        # The demo must not leave runner processes behind, whatever state the workflows reached.
        for record in await self.backend.list():
            await self.backend.terminate(record.name)

    def queue_jobs(self, count: int, *, duration_s: float = 3.0) -> list[int]:
        return [self.simulator.queue_job(DEMO_LABELS, duration_s=duration_s) for _ in range(count)]

    async def wait_workflow_started(self, job_id: int, within_s: float = 30) -> None:
        """Until the starter has accepted the job's first delivery, i.e. its workflow exists."""
        await self.simulator.wait_for(
            lambda: any(
                d.job_id == job_id and d.action in ("queued", "waiting") and d.status_code == 200
                for d in self.simulator.deliveries()
            ),
            within_s,
            description=f"queued webhook of job {job_id} accepted",
        )

    async def wait_jobs_finished(self, job_ids: list[int], within_s: float) -> None:
        """Until each job's workflow has closed (GitHub side done and its runner torn down)."""
        remaining = set(job_ids)

        def all_completed() -> bool:
            # Called after every simulator change: drop finished jobs so each check stays cheap.
            remaining.difference_update(
                [job_id for job_id in remaining if self.simulator.job(job_id).status == "completed"]
            )
            return not remaining

        await self.simulator.wait_for(all_completed, within_s, description="all jobs completed")
        async with asyncio.timeout(within_s):
            for job_id in job_ids:
                await self.client.get_workflow_handle(job_workflow_id(job_id)).result()

    async def job_workflow_status(self, job_id: int) -> WorkflowExecutionStatus | None:
        description = await self.client.get_workflow_handle(job_workflow_id(job_id)).describe()
        return description.status

    async def semaphore_status_or_none(self) -> SemaphoreStatus | None:
        """None while no job has asked the pool for a slot yet."""
        try:
            return await self.semaphore_status()
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return None
            raise

    async def semaphore_status(self) -> SemaphoreStatus:
        handle = self.client.get_workflow_handle(semaphore_workflow_id(self._pool.name))
        status: SemaphoreStatus = await handle.query("status", result_type=SemaphoreStatus)
        return status
