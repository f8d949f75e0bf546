"""The worker's wiring: which workflows and activities run on which task queue, and the
background workflows (sweepers, semaphores) a worker start brings up to date.

`worker.py` and `mayfly worker` run `main`; the dev stack builds the same workers in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker
from temporalio.workflow import NondeterminismError

from activities.containers import ContainerActivities
from activities.github import GitHubActivities
from activities.host_sweep import HOST_SWEEPER_WORKFLOW, HostSweepActivities, host_sweeper_workflow_id
from activities.slots import SlotActivities
from activities.sweep import SweepActivities
from activities.warm import WarmPoolActivities
from mayfly import search_attributes
from mayfly.app.roles import WorkerRole, add_role_argument
from mayfly.backends import ContainerBackend
from mayfly.backends.factory import build_backends
from mayfly.config import (
    ConfigError,
    LocalBackendSettings,
    MayflySettings,
    PoolSettings,
    load_settings_or_report,
)
from mayfly.github import GitHubClient
from mayfly.github_factory import scope_clients
from mayfly.hardening import make_non_dumpable
from mayfly.health import health_app
from mayfly.logs import RunnerLogContext, configure_logging
from mayfly.metrics import prometheus_runtime
from mayfly.models import (
    DEFAULT_SCOPE,
    SemaphoreInput,
    SemaphoreTerms,
    host_task_queue,
    semaphore_task_queue,
    semaphore_workflow_id,
    watch_task_queue,
)
from mayfly.process import stop_on_signals
from mayfly.sealing import Sealer
from mayfly.serving import serve
from mayfly.temporal import SEMAPHORE_WORKFLOW_RUNNER, WORKFLOW_RUNNER, connect
from mayfly.warm import CONFIGURE_SIGNAL as WARM_CONFIGURE_SIGNAL
from mayfly.warm import WarmPoolConfig, WarmPoolInput, warm_pool_workflow_id
from workflows.host_sweeper import HostSweeperInput, HostSweeperWorkflow
from workflows.runner_job import RunnerJobWorkflow
from workflows.slot_semaphore import SlotSemaphoreWorkflow
from workflows.sweeper import (
    CONFIGURE_SIGNAL,
    SweeperConfig,
    SweeperInput,
    SweeperWorkflow,
    sweeper_workflow_id,
)
from workflows.warm_pool import WarmPoolWorkflow
from workflows.warm_runner import WarmRunnerWorkflow

log = logging.getLogger("mayfly.worker")


def sealer_for(settings: MayflySettings) -> Sealer:
    """The sealer every worker shares. Only the single-process dev stack may do without a
    configured key: a key each worker made up would let one worker's sealed JIT config fail
    to open on the next."""
    if settings.secret_key is None:
        raise ConfigError(
            "secret_key: required for a worker (MAYFLY_SECRET_KEY, at least 32 bytes, the same on every "
            "worker); generate one with `openssl rand -hex 32`"
        )
    return Sealer.from_secrets(
        settings.secret_key.get_secret_value(),
        [key.get_secret_value() for key in settings.previous_secret_keys],
    )


def build_workers(
    client: Client,
    settings: MayflySettings,
    *,
    github: Mapping[str, GitHubClient],
    backends: Mapping[str, ContainerBackend],
    sealer: Sealer,
    registration_poll_interval_s: float = 10.0,
    graceful_shutdown_s: float = 30.0,
    with_semaphores: bool = True,
) -> list[Worker]:
    """The main worker (workflows, spawns, slots), one rate-limited GitHub worker per scope, the
    container watchers (this host's queue for local processes, the shared watch queue for the
    rest) and, `with_semaphores`, the semaphores' worker. `github` holds each scope's client."""
    github_activities = GitHubActivities(github, sealer, poll_interval_s=registration_poll_interval_s)
    task_queue = settings.temporal.task_queue
    host_queue = host_task_queue(task_queue, settings.host_id)
    watch_queue = watch_task_queue(task_queue)
    container_activities = ContainerActivities(
        backends, sealer, host_task_queue=host_queue, watch_task_queue=watch_queue
    )
    slot_activities = SlotActivities(backends, semaphore_terms(settings), task_queue)
    sweep_activities = SweepActivities(github, backends, settings)
    host_sweep_activities = HostSweepActivities(backends)
    shutdown = timedelta(seconds=graceful_shutdown_s)
    log_context = [RunnerLogContext()]
    main = Worker(
        client,
        task_queue=task_queue,
        workflows=[
            RunnerJobWorkflow,
            SweeperWorkflow,
            HostSweeperWorkflow,
            WarmPoolWorkflow,
            WarmRunnerWorkflow,
        ],
        # A deploy whose workflow code no longer replays an open history fails that workflow
        # rather than leaving it stuck retrying its task forever: a failed semaphore is rebuilt
        # from its holders' re-assertions, a failed job workflow's slot is reclaimed and its
        # job restarted by the reconciler. There is no release yet to version against.
        workflow_failure_exception_types=[NondeterminismError],
        workflow_runner=WORKFLOW_RUNNER,
        max_concurrent_workflow_tasks=settings.workflow_task_slots,
        # wait_exit and terminate stay here for refs that name no queue (made before host queues).
        activities=[
            container_activities.spawn,
            container_activities.wait_exit,
            container_activities.terminate,
            *slot_activities.for_leases(),
            sweep_activities.containers,
            WarmPoolActivities().closed_runners,
            # Waits ten seconds before its first call and is usually cancelled by then; on the
            # rate-limited queue each start would spend a mint's share of the budget.
            github_activities.wait_online,
        ],
        graceful_shutdown_timeout=shutdown,
        interceptors=log_context,
    )
    # One queue per scope: its rate limit is that scope's throttle, so one busy organization
    # cannot spend another's API budget.
    github_workers = [
        Worker(
            client,
            task_queue=settings.temporal.github_queue(scope),
            activities=[
                github_activities.mint_runner,
                github_activities.deregister_runner,
                github_activities.job_status,
                github_activities.runner_status,
                sweep_activities.registrations,
                sweep_activities.queued_jobs,
            ],
            max_task_queue_activities_per_second=scope_github.max_calls_per_second,
            graceful_shutdown_timeout=shutdown,
            interceptors=log_context,
        )
        for scope, scope_github in settings.github_scopes.items()
    ]
    workers = [main, *github_workers]
    if with_semaphores:
        workers.append(semaphore_worker(client, slot_activities, task_queue, graceful_shutdown_s))
    watchers = [container_activities.wait_exit, container_activities.terminate]
    # A watcher is a poll and a heartbeat per second, but holds its slot for the runner's life.
    if any(backend.host_bound for backend in backends.values()):
        workers.append(
            Worker(
                client,
                task_queue=host_queue,
                activities=[*watchers, host_sweep_activities.host_containers],
                max_concurrent_activities=settings.max_watched_containers,
                graceful_shutdown_timeout=shutdown,
                interceptors=log_context,
            )
        )
    if not all(backend.host_bound for backend in backends.values()):
        workers.append(
            Worker(
                client,
                task_queue=watch_queue,
                activities=watchers,
                max_concurrent_activities=settings.max_watched_containers,
                graceful_shutdown_timeout=shutdown,
                interceptors=log_context,
            )
        )
    return workers


def semaphore_worker(
    client: Client, slot_activities: SlotActivities, task_queue: str, graceful_shutdown_s: float = 30.0
) -> Worker:
    """The pools' semaphores, on a queue of their own: under a backlog their tasks come first,
    not after thousands of job workflows' tasks (their holders, on the main queue `task_queue`)."""
    return Worker(
        client,
        task_queue=semaphore_task_queue(task_queue),
        workflows=[SlotSemaphoreWorkflow],
        workflow_failure_exception_types=[NondeterminismError],
        workflow_runner=SEMAPHORE_WORKFLOW_RUNNER,
        activities=slot_activities.for_semaphores(),
        graceful_shutdown_timeout=timedelta(seconds=graceful_shutdown_s),
        interceptors=[RunnerLogContext()],
    )


async def start_sweeper(client: Client, settings: MayflySettings) -> None:
    """The shared sweeper (registrations, missed jobs, provider containers) and this host's.

    Every worker start hands the running sweeper its pool list and interval."""
    local_pools = [pool.name for pool in settings.pools if isinstance(pool.backend, LocalBackendSettings)]
    config = SweeperConfig(
        pools=[pool.name for pool in settings.pools if pool.name not in local_pools],
        interval_s=settings.sweep_interval_s,
        scopes={scope: settings.temporal.github_queue(scope) for scope in settings.github_scopes},
    )
    await client.start_workflow(
        SweeperWorkflow.run,
        SweeperInput(config=config),
        id=sweeper_workflow_id(settings.temporal.task_queue),
        task_queue=settings.temporal.task_queue,
        start_signal=CONFIGURE_SIGNAL,
        start_signal_args=[config],
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary="Removes containers and runner registrations that outlived their workflow",
    )
    if local_pools:
        await start_host_sweeper(client, settings, local_pools)


async def start_host_sweeper(
    client: Client, settings: MayflySettings, pools: list[str], *, visible_within_s: float = 30.0
) -> None:
    task_queue = settings.temporal.task_queue
    workflow_id = host_sweeper_workflow_id(task_queue, settings.host_id)
    await client.start_workflow(
        HostSweeperWorkflow.run,
        HostSweeperInput(
            host_id=settings.host_id,
            host_task_queue=host_task_queue(task_queue, settings.host_id),
            pools=pools,
            interval_s=settings.sweep_interval_s,
        ),
        id=workflow_id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary=f"Sweeps the local runner processes of host {settings.host_id}",
    )
    # Slot reclaim finds hosts through visibility, which may lag a start: a host it cannot see
    # yet would be left out of its check, so wait until this one is listed.
    query = f"WorkflowType = '{HOST_SWEEPER_WORKFLOW}' AND WorkflowId = '{workflow_id}'"
    deadline = asyncio.get_running_loop().time() + visible_within_s
    while (await client.count_workflows(query)).count == 0:
        if asyncio.get_running_loop().time() > deadline:
            log.warning("host sweeper %s is not yet listed by visibility", workflow_id)
            return
        await asyncio.sleep(0.2)


def semaphore_terms(settings: MayflySettings) -> dict[str, SemaphoreTerms]:
    """Each pool's cap and semaphore tuning, as this worker's configuration sets them."""
    return {
        pool.name: SemaphoreTerms(
            capacity=pool.max_runners, reap_interval_s=settings.semaphore_reap_interval_s
        )
        for pool in settings.pools
    }


async def sync_capacities(client: Client, settings: MayflySettings) -> None:
    """Push each pool's configured cap to its semaphore, so a config change needs no restart of it."""
    for pool in settings.pools:
        terms = semaphore_terms(settings)[pool.name]
        await client.start_workflow(
            SlotSemaphoreWorkflow.run,
            SemaphoreInput(pool=pool.name, capacity=terms.capacity, reap_interval_s=terms.reap_interval_s),
            id=semaphore_workflow_id(pool.name),
            task_queue=semaphore_task_queue(settings.temporal.task_queue),
            start_signal="set_capacity",
            start_signal_args=[pool.max_runners],
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )


def warm_pool_config(settings: MayflySettings, pool: PoolSettings) -> WarmPoolConfig:
    """What a pool's warm pool and its runners need of the worker's config."""
    (scope,) = settings.pool_scopes(pool)[:1] or [DEFAULT_SCOPE]
    return WarmPoolConfig(recipe=settings.runner_recipe(pool, scope), min_idle=pool.min_idle)


async def sync_warm_pools(client: Client, settings: MayflySettings) -> None:
    """Hand each pool's warm pool its settings: a pool with `min_idle > 0` gets one started, and
    a running one whose `min_idle` went to 0 drains and ends. Pools that never had one get none."""
    for pool in settings.pools:
        config = warm_pool_config(settings, pool)
        workflow_id = warm_pool_workflow_id(pool.name)
        if pool.min_idle > 0:
            await client.start_workflow(
                WarmPoolWorkflow.run,
                WarmPoolInput(config=config),
                id=workflow_id,
                task_queue=settings.temporal.task_queue,
                start_signal=WARM_CONFIGURE_SIGNAL,
                start_signal_args=[config],
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                static_summary=f"Keeps {pool.min_idle} idle runners ready in pool {pool.name}",
            )
            continue
        try:
            await client.get_workflow_handle(workflow_id).signal(WARM_CONFIGURE_SIGNAL, config)
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise


async def run_worker(
    settings: MayflySettings, stop: asyncio.Event, role: WorkerRole = WorkerRole.ALL
) -> None:
    # A semaphores-only process never opens a JIT config, so it needs no key; any other checks
    # its key before it connects.
    sealer = None if role is WorkerRole.SEMAPHORES else sealer_for(settings)
    runtime = prometheus_runtime(settings.metrics_bind_address) if settings.metrics_bind_address else None
    client = await connect(settings.temporal, runtime)
    absent = await search_attributes.missing(client, settings.temporal.namespace)
    if absent:
        # Starting without them would leave every job workflow stuck on its first task.
        raise ConfigError(
            f"namespace {settings.temporal.namespace!r} lacks search attributes {', '.join(absent)}; "
            "run `mayfly setup` once"
        )
    async with contextlib.AsyncExitStack() as running:
        backends = build_backends(settings)
        task_queue = settings.temporal.task_queue
        if sealer is None:  # semaphores only
            slot_activities = SlotActivities(backends, semaphore_terms(settings), task_queue)
            shutdown_s = settings.worker_graceful_shutdown_s
            workers = [semaphore_worker(client, slot_activities, task_queue, shutdown_s)]
        else:
            workers = build_workers(
                client,
                settings,
                github=await running.enter_async_context(scope_clients(settings)),
                backends=backends,
                sealer=sealer,
                graceful_shutdown_s=settings.worker_graceful_shutdown_s,
                with_semaphores=role is WorkerRole.ALL,
            )
            # Before this host takes any spawn: slot reclaim must already know the host exists.
            await start_sweeper(client, settings)
        for worker in workers:
            await running.enter_async_context(worker)
        await sync_capacities(client, settings)
        if sealer is not None:
            await sync_warm_pools(client, settings)
        if settings.health_bind_address:
            host, port = settings.health_bind_address.rsplit(":", 1)
            health = await serve(health_app(client), host=host, port=int(port))
            running.push_async_callback(health.stop)
        log.info("%s worker polling task queue %s", role, ", ".join(w.task_queue for w in workers))
        await stop.wait()
        log.info("shutting down: finishing activities in flight")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mayfly worker", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML config file (or set MAYFLY_CONFIG)")
    add_role_argument(parser)
    args = parser.parse_args(argv)
    configure_logging()
    settings = load_settings_or_report(args.config)
    if settings is None:
        return 2
    configure_logging(settings.log_format)
    # Runners may share this host (and, without run_as_user, this uid): keep them out of the
    # worker's environment and memory, which hold every credential.
    if not make_non_dumpable():
        log.warning("could not mark the worker non-dumpable; set run_as_user and keep runners off this uid")

    async def _main() -> None:
        await run_worker(settings, stop_on_signals(), WorkerRole(args.role))

    try:
        asyncio.run(_main())
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    log.info("worker stopped")
    return 0
