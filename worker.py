"""The Mayfly worker: runs the workflows and activities on one task queue.

Run it as `python worker.py --config mayfly.toml` or `mayfly worker --config mayfly.toml`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.worker import Worker

from activities.containers import ContainerActivities
from activities.github import GitHubActivities
from activities.slots import SlotActivities
from activities.sweep import SweepActivities
from mayfly import search_attributes
from mayfly.backends import ContainerBackend
from mayfly.backends.factory import build_backends
from mayfly.config import ConfigError, MayflySettings, load_settings_or_report
from mayfly.github import GitHubClient
from mayfly.github_factory import github_client
from mayfly.health import health_app
from mayfly.logs import configure_logging
from mayfly.metrics import prometheus_runtime
from mayfly.models import SemaphoreInput, semaphore_workflow_id
from mayfly.sealing import Sealer
from mayfly.serving import serve
from mayfly.temporal import connect
from workflows.runner_job import RunnerJobWorkflow
from workflows.slot_semaphore import SlotSemaphoreWorkflow
from workflows.sweeper import SweeperInput, SweeperWorkflow, sweeper_workflow_id

log = logging.getLogger("mayfly.worker")


def sealer_for(settings: MayflySettings) -> Sealer:
    if settings.secret_key is None:
        log.warning("secret_key is not set: using a per-process key; run one worker or set MAYFLY_SECRET_KEY")
        return Sealer.ephemeral()
    return Sealer.from_secret(settings.secret_key.get_secret_value())


def build_workers(
    client: Client,
    settings: MayflySettings,
    *,
    github: GitHubClient,
    backends: Mapping[str, ContainerBackend],
    sealer: Sealer,
    registration_poll_s: float = 10.0,
    graceful_shutdown_s: float = 30.0,
) -> list[Worker]:
    """The main worker (workflows, containers, slots) and the rate-limited GitHub worker."""
    github_activities = GitHubActivities(
        github, sealer, first_poll_delay_s=registration_poll_s, poll_interval_s=registration_poll_s
    )
    container_activities = ContainerActivities(backends, sealer)
    slot_activities = SlotActivities(backends)
    sweep_activities = SweepActivities(github, backends, settings)
    shutdown = timedelta(seconds=graceful_shutdown_s)
    main = Worker(
        client,
        task_queue=settings.temporal.task_queue,
        workflows=[RunnerJobWorkflow, SlotSemaphoreWorkflow, SweeperWorkflow],
        activities=[
            container_activities.spawn,
            container_activities.wait_exit,
            container_activities.terminate,
            *slot_activities.all(),
            sweep_activities.containers,
        ],
        graceful_shutdown_timeout=shutdown,
    )
    github_worker = Worker(
        client,
        task_queue=settings.temporal.github_task_queue,
        activities=[
            github_activities.mint_runner,
            github_activities.wait_online,
            github_activities.deregister_runner,
            sweep_activities.registrations,
            sweep_activities.queued_jobs,
        ],
        max_task_queue_activities_per_second=settings.github.max_calls_per_second,
        graceful_shutdown_timeout=shutdown,
    )
    return [main, github_worker]


async def start_sweeper(client: Client, settings: MayflySettings) -> None:
    await client.start_workflow(
        SweeperWorkflow.run,
        SweeperInput(
            pools=[pool.name for pool in settings.pools],
            interval_s=settings.sweep_interval_s,
            github_task_queue=settings.temporal.github_task_queue,
        ),
        id=sweeper_workflow_id(settings.temporal.task_queue),
        task_queue=settings.temporal.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary="Removes containers and runner registrations that outlived their workflow",
    )


async def sync_capacities(client: Client, settings: MayflySettings) -> None:
    """Push each pool's configured cap to its semaphore, so a config change needs no restart of it."""
    for pool in settings.pools:
        await client.start_workflow(
            SlotSemaphoreWorkflow.run,
            SemaphoreInput(
                pool=pool.name, capacity=pool.max_runners, reap_interval_s=settings.semaphore_reap_interval_s
            ),
            id=semaphore_workflow_id(pool.name),
            task_queue=settings.temporal.task_queue,
            start_signal="set_capacity",
            start_signal_args=[pool.max_runners],
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )


async def run_worker(settings: MayflySettings, stop: asyncio.Event) -> None:
    runtime = prometheus_runtime(settings.metrics_bind_address) if settings.metrics_bind_address else None
    client = await connect(settings.temporal, runtime)
    absent = await search_attributes.missing(client, settings.temporal.namespace)
    if absent:
        # Starting without them would leave every job workflow stuck on its first task.
        raise ConfigError(
            f"namespace {settings.temporal.namespace!r} lacks search attributes {', '.join(absent)}; "
            "run `mayfly setup` once"
        )
    async with github_client(settings.github) as github:
        workers = build_workers(
            client,
            settings,
            github=github,
            backends=build_backends(settings),
            sealer=sealer_for(settings),
            graceful_shutdown_s=settings.worker_graceful_shutdown_s,
        )
        async with contextlib.AsyncExitStack() as running:
            for worker in workers:
                await running.enter_async_context(worker)
            await sync_capacities(client, settings)
            await start_sweeper(client, settings)
            if settings.health_bind_address:
                host, port = settings.health_bind_address.rsplit(":", 1)
                health = await serve(health_app(client), host=host, port=int(port))
                running.push_async_callback(health.stop)
            log.info("worker polling task queue %s", settings.temporal.task_queue)
            await stop.wait()
            log.info("shutting down: finishing activities in flight")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mayfly worker", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML config file (or set MAYFLY_CONFIG)")
    args = parser.parse_args(argv)
    configure_logging()
    settings = load_settings_or_report(args.config)
    if settings is None:
        return 2
    configure_logging(settings.log_format)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop)

    try:
        asyncio.run(_main())
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    log.info("worker stopped")
    return 0


def exit_now(code: int) -> None:
    """Exit without interpreter finalisation, where the SDK's native runtime can abort (sdk-python#300)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
