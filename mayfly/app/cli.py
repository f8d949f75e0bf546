"""`mayfly`: the command line.

mayfly dev [--jobs N]     the embedded default: dev server, simulator, starter, worker, local runners
mayfly worker             run a worker against a Temporal cluster
mayfly starter            run the webhook starter (the URL GitHub calls)
mayfly status             show each pool's slots (and its warm pool)
mayfly setup              register Mayfly's search attributes on an existing Temporal namespace
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client, RPCTimeoutOrCancelledError, WorkflowQueryRejectedError
from temporalio.common import QueryRejectCondition
from temporalio.service import RPCError, RPCStatusCode

from mayfly.app.roles import add_role_argument
from mayfly.config import ConfigError, MayflySettings, load_settings_or_report
from mayfly.logs import configure_logging
from mayfly.models import SemaphoreStatus, semaphore_workflow_id
from mayfly.process import exit_now, stop_on_signals
from mayfly.temporal import connect
from mayfly.warm import WarmPoolStatus, warm_pool_workflow_id

log = logging.getLogger("mayfly")


async def _dev(args: argparse.Namespace) -> int:
    try:
        from mayfly.app.embedded import EmbeddedStack
    except ModuleNotFoundError as error:
        if error.name != "simulator":
            raise
        # The runtime wheel and image leave the GitHub simulator out on purpose.
        print("mayfly dev needs a repository checkout: run `./run demo` there", file=sys.stderr)
        return 2
    from mayfly.devserver import DevServer

    state_dir: Path = args.state_dir
    stop = stop_on_signals()
    server = DevServer(
        db_file=state_dir / "temporal.db",
        port=args.temporal_port,
        ui_port=args.ui_port,
        log_file=state_dir / "temporal.log",
    )
    print(f"starting Temporal dev server on {server.address} (log: {state_dir / 'temporal.log'})", flush=True)
    client = await server.start()
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        max_runners=args.max_runners,
        simulator_port=args.simulator_port,
        starter_port=args.starter_port,
    )
    try:
        await stack.start()
        print(f"GitHub simulator : {stack.simulator.url}")
        print(f"webhook starter  : {stack.starter_url}")
        print(f"Temporal UI      : {server.ui_url}/namespaces/default/workflows")
        job_ids = stack.queue_jobs(args.jobs, duration_s=args.job_seconds)
        print(f"queued {len(job_ids)} demo jobs (pool cap {args.max_runners}): {job_ids}", flush=True)
        waiter = asyncio.create_task(stack.wait_jobs_finished(job_ids, within_s=args.timeout))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            waiter.result()
            for job_id in job_ids:
                job = stack.simulator.job(job_id)
                print(f"  job {job_id}: {job.conclusion} on {job.runner_name}")
            print(f"all {len(job_ids)} jobs done; their workflows are Completed in the UI", flush=True)
            if not args.exit_when_done:
                print("Ctrl-C to stop", flush=True)
                await stopper
        else:
            waiter.cancel()
        stopper.cancel()
        return 0
    finally:
        print("stopping...", flush=True)
        await stack.stop()
        server.stop()


async def _status(settings: MayflySettings, query_timeout_s: float = 10.0) -> int:
    client: Client = await connect(settings.temporal)
    for pool in settings.pools:
        handle = client.get_workflow_handle(semaphore_workflow_id(pool.name))
        try:
            status = await handle.query(
                "status",
                result_type=SemaphoreStatus,
                reject_condition=QueryRejectCondition.NOT_OPEN,
                rpc_timeout=timedelta(seconds=query_timeout_s),
            )
        except Exception as error:
            print(f"{pool.name}: {_semaphore_unavailable(error)}")
            continue
        recovering = " (recovering: waiting for holders to re-assert)" if status.recovering else ""
        print(
            f"{pool.name}: {len(status.holders)}/{status.capacity} held, {status.waiting} waiting{recovering}"
        )
        for holder in status.holders:
            print(f"  {holder.workflow_id}  held {holder.held_for_s:.0f}s")
        if pool.min_idle > 0:
            print(f"  {await _warm_pool_line(client, pool.name, query_timeout_s)}")
    return 0


async def _warm_pool_line(client: Client, pool: str, query_timeout_s: float) -> str:
    try:
        warm = await client.get_workflow_handle(warm_pool_workflow_id(pool)).query(
            "status", result_type=WarmPoolStatus, rpc_timeout=timedelta(seconds=query_timeout_s)
        )
    except Exception as error:
        return f"warm pool: not answering ({type(error).__name__}); it starts with the worker"
    return (
        f"warm pool: min_idle {warm.min_idle}, {len(warm.idle)} idle, {len(warm.starting)} starting, "
        f"{len(warm.busy)} busy, {len(warm.draining)} draining; {warm.served_total} jobs served"
    )


def _semaphore_unavailable(error: Exception) -> str:
    """Why a pool shows no slots: absent, closed and busy semaphores need different actions."""
    if isinstance(error, RPCError) and error.status == RPCStatusCode.NOT_FOUND:
        return "no semaphore yet"
    if isinstance(error, WorkflowQueryRejectedError):
        state = error.status.name if error.status is not None else "closed"
        return f"semaphore not running ({state}); the next job's request starts a new one"
    # The client's own deadline surfaces as CANCELLED ("Timeout expired"), the server's as
    # DEADLINE_EXCEEDED: both mean no worker answered the query in time.
    timed_out = isinstance(error, RPCTimeoutOrCancelledError) or (
        isinstance(error, RPCError)
        and error.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED)
    )
    if timed_out:
        return "semaphore not answering (query timed out); is a worker running for its task queue?"
    return f"semaphore query failed ({type(error).__name__}: {error})"


async def _explain(settings: MayflySettings, job_id: int, scope: str | None) -> int:
    from mayfly.app.explain import explain
    from mayfly.github_factory import scope_clients

    client = await connect(settings.temporal)
    async with scope_clients(settings) as github:
        for line in await explain(client, settings, job_id, github, scope):
            print(line)
    return 0


async def _jobs(
    settings: MayflySettings, pool: str | None, state: str | None, scope: str | None, limit: int
) -> int:
    from mayfly.app.explain import list_jobs

    client = await connect(settings.temporal)
    for line in await list_jobs(client, pool=pool, state=state, scope=scope, limit=limit):
        print(line)
    return 0


async def _usage(settings: MayflySettings, since: str, by: str) -> int:
    from mayfly.app.usage import parse_span, usage, usage_lines

    try:
        span = parse_span(since)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    client = await connect(settings.temporal)
    for line in usage_lines(await usage(client, span, by), by):
        print(line)
    return 0


async def _setup(settings: MayflySettings) -> int:
    from mayfly import search_attributes

    client = await connect(settings.temporal)
    added = await search_attributes.register(client, settings.temporal.namespace)
    print(
        f"registered search attributes: {', '.join(added)}"
        if added
        else "search attributes already registered"
    )
    return 0


async def _starter(settings: MayflySettings) -> int:
    from mayfly.app.starter import create_starter_app
    from mayfly.serving import ServerLimits, serve

    client: Client | None = None

    async def client_provider() -> Client:
        assert client is not None
        return client

    app = create_starter_app(settings, client_provider)  # refuses to run without a webhook secret
    # Connect before listening: a wrong address, certificate or API key stops the starter here,
    # by name, instead of turning every delivery into a 503. Once connected, the client
    # reconnects by itself and a Temporal outage is a 503 that GitHub can redeliver.
    client = await connect(settings.temporal)
    stop = stop_on_signals()
    server = await serve(
        app,
        host=settings.starter.host,
        port=settings.starter.port,
        limits=ServerLimits(
            max_concurrency=settings.starter.max_concurrency,
            head_timeout_s=settings.starter.read_timeout_s,
            keep_alive_s=settings.starter.keep_alive_s,
            max_header_bytes=settings.starter.max_header_bytes,
        ),
    )
    print(f"webhook starter listening on {server.url}/webhook", flush=True)
    await stop.wait()
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mayfly", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="run the embedded demo stack")
    dev.add_argument("--jobs", type=int, default=5)
    dev.add_argument("--max-runners", type=int, default=3)
    dev.add_argument("--job-seconds", type=float, default=3.0)
    dev.add_argument("--state-dir", type=Path, default=Path(".mayfly"))
    dev.add_argument("--temporal-port", type=int, default=7233)
    dev.add_argument("--ui-port", type=int, default=8233)
    dev.add_argument("--simulator-port", type=int, default=9100)
    dev.add_argument("--starter-port", type=int, default=8080)
    dev.add_argument("--timeout", type=float, default=600.0)
    dev.add_argument("--exit-when-done", action="store_true", help="stop once the demo jobs finish")
    explain = sub.add_parser("explain", help="what a job's workflow, its pool and GitHub say about it")
    explain.add_argument("job_id", type=int)
    explain.add_argument("--scope", help="the job's scope (default: the first that has a workflow for it)")
    jobs = sub.add_parser("jobs", help="list job workflows by pool and phase")
    jobs.add_argument("--pool")
    jobs.add_argument("--state", help="a phase, e.g. waiting-for-slot, running, failed")
    jobs.add_argument("--scope")
    jobs.add_argument("--limit", type=int, default=50)
    usage = sub.add_parser("usage", help="slot- and runner-hours of closed job workflows")
    usage.add_argument("--since", default="24h", help="e.g. 90m, 24h, 7d")
    usage.add_argument("--by", choices=["pool", "repository", "scope"], default="pool")
    for name in ("worker", "starter", "status", "setup"):
        sub.add_parser(name)
    add_role_argument(sub.choices["worker"])
    for command in sub.choices.values():
        if command.prog.split()[-1] != "dev":
            command.add_argument("--config", type=Path, help="TOML config file (or set MAYFLY_CONFIG)")
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "dev":
        return asyncio.run(_dev(args))
    if args.command == "worker":
        from mayfly.app import wiring

        config = ["--config", str(args.config)] if args.config else []
        exit_now(wiring.main([*config, "--role", args.role]))
    settings = load_settings_or_report(args.config)
    if settings is None:
        return 2
    configure_logging(settings.log_format)
    code = _run_client_command(args, settings)
    # These commands have used the SDK's native runtime, which can abort at interpreter
    # shutdown (sdk-python#300) and replace the exit status: leave without finalising.
    exit_now(code)
    return code


def _run_client_command(args: argparse.Namespace, settings: MayflySettings) -> int:
    command = args.command
    try:
        if command == "explain":
            return asyncio.run(_explain(settings, args.job_id, args.scope))
        if command == "usage":
            return asyncio.run(_usage(settings, args.since, args.by))
        if command == "jobs":
            return asyncio.run(_jobs(settings, args.pool, args.state, args.scope, args.limit))
        if command == "starter":
            return asyncio.run(_starter(settings))
        if command == "setup":
            return asyncio.run(_setup(settings))
        return asyncio.run(_status(settings))
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
