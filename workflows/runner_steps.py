"""The steps of one runner's life, as activity calls any workflow that starts runners can make:
mint, spawn, watch, poll for registration, deregister, terminate.

The timeouts and retry policies live here once, so a warm runner and a job's runner are
started and stopped the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.containers import ContainerActivities
    from activities.errors import THROTTLED
    from activities.github import GitHubActivities
    from mayfly.models import (
        ContainerExit,
        ContainerRef,
        ContainerSpec,
        DeregisterOutcome,
        MintedRunner,
        RunnerRecipe,
        RunnerRef,
        RunnerStatus,
    )

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")

# GitHub calls: short per-call timeouts, backoff capped so a 502 burst costs seconds, not minutes.
GITHUB_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
# Cleanup must eventually succeed: a slot is only released once its container is gone.
CLEANUP_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))


def throttled_for(error: ActivityError) -> timedelta | None:
    """How long GitHub asked us to wait (a rate-limit reset minutes away), if that is the failure."""
    cause = error.cause
    if isinstance(cause, ApplicationError) and cause.type == THROTTLED and cause.details:
        return timedelta(seconds=float(cause.details[0]))
    return None


def on_github(
    call: Callable[[Any, A], Awaitable[R]],
    arg: A,
    *,
    summary: str,
    github_queue: str | None,
    retry: RetryPolicy = GITHUB_RETRY,
    give_up_after: timedelta | None = None,
) -> asyncio.Task[R]:
    """A GitHub activity on its scope's rate-limited queue (None: the workflow's own). Each try
    is short: a response lost in the network is retried in seconds."""
    return workflow.start_activity_method(
        call,
        arg,
        start_to_close_timeout=timedelta(seconds=30),
        schedule_to_close_timeout=give_up_after,
        retry_policy=retry,
        summary=summary,
        task_queue=github_queue,
    )


def start_mint(recipe: RunnerRecipe, runner_name: str) -> asyncio.Task[MintedRunner]:
    return on_github(
        GitHubActivities.mint_runner,
        recipe.mint_request(runner_name),
        summary=f"mint {runner_name}",
        github_queue=recipe.github_task_queue or None,
        give_up_after=timedelta(seconds=recipe.registration_timeout_s * 3),
    )


async def spawn(
    pool: str, runner: MintedRunner, name: str, job_id: int, max_lifetime_s: float
) -> ContainerRef:
    """Create the runner's container, named after the runner and owned by this workflow. A
    cancel meanwhile stops the spawn and waits for it, so teardown finds what it created."""
    spec = ContainerSpec(
        pool=pool,
        name=name,
        job_id=job_id,
        owner_workflow_id=workflow.info().workflow_id,
        runner_name=name,
        jit_config=runner.jit_config,
        max_lifetime_s=max_lifetime_s,
    )
    return await finish_despite_cancel(_start_spawn(spec), stop_it=True)


def _start_spawn(spec: ContainerSpec) -> asyncio.Task[ContainerRef]:
    return workflow.start_activity_method(
        ContainerActivities.spawn,
        spec,
        start_to_close_timeout=timedelta(minutes=25),
        schedule_to_close_timeout=timedelta(minutes=30),
        heartbeat_timeout=timedelta(minutes=2),
        retry_policy=GITHUB_RETRY,
        cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        summary=f"spawn {spec.name}",
    )


def watch(container: ContainerRef, max_lifetime_s: float) -> asyncio.Task[ContainerExit]:
    return workflow.start_activity_method(
        ContainerActivities.wait_exit,
        container,
        start_to_close_timeout=timedelta(seconds=max_lifetime_s + 600),
        heartbeat_timeout=timedelta(seconds=30),
        retry_policy=CLEANUP_RETRY,
        summary=f"watch {container.name}",
        task_queue=container.task_queue,
    )


async def _settled_within(settled: Callable[[], bool], within: timedelta, summary: str) -> bool:
    try:
        await workflow.wait_condition(settled, timeout=within, timeout_summary=summary)
    except TimeoutError:
        return settled()
    return True


async def poll_until_registered(
    recipe: RunnerRecipe,
    runner_name: str,
    runner: MintedRunner,
    settled: Callable[[], bool],
    settle_later: Callable[[asyncio.Task[Any]], None],
) -> RunnerStatus | None:
    """Wait until the runner is online, `settled()` (a webhook named it, its container exited,
    ...) or the registration timeout; GitHub's answer, if a poll got one.

    GitHub is polled only when no webhook has settled it within the first poll delay: on the
    happy path the webhook wins, and no activity runs. A poll still running when it is settled
    is cancelled and handed to `settle_later`, for the workflow to await before it ends: the
    cancel reaches the activity only with its next heartbeat, seconds later, and a surplus
    runner's slot must not wait for that."""
    timeout = timedelta(seconds=recipe.registration_timeout_s)
    until = workflow.now() + timeout
    if await _settled_within(
        settled, min(timedelta(seconds=recipe.registration_poll_s), timeout), "webhook says online"
    ):
        return None
    if until <= workflow.now():
        return None
    poll = workflow.start_activity_method(
        GitHubActivities.wait_online,
        RunnerRef(runner_name=runner_name, runner_id=runner.runner_id, scope=recipe.scope),
        start_to_close_timeout=timeout + timedelta(seconds=30),
        # Short, so the cancel sent when a late webhook wins reaches the activity within seconds
        # (cancellation travels on heartbeat responses).
        heartbeat_timeout=timedelta(seconds=4),
        retry_policy=GITHUB_RETRY,
        # Settled before the workflow ends (see below): a poll that answers a cancel after its
        # workflow closed makes the worker log a warning nobody can act on.
        cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        summary=f"poll {runner_name} online",
    )
    try:
        await _settled_within(
            lambda: settled() or poll.done(), until - workflow.now(), "registration timeout"
        )
    finally:
        answered = poll.done() and not poll.cancelled() and poll.exception() is None
        if not poll.done():
            poll.cancel()
            settle_later(poll)
    return poll.result() if answered else None


async def settle(tasks: list[asyncio.Task[Any]]) -> None:
    """Wait for activities cancelled earlier to be settled, their outcomes discarded."""
    if tasks:
        await workflow.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()
        tasks.clear()


async def deregister_letting_a_job_finish(
    deregister_once: Callable[[], Awaitable[DeregisterOutcome]],
    exit_task: asyncio.Task[ContainerExit] | None,
    watch_now: Callable[[], asyncio.Task[ContainerExit] | None],
    on_busy: Callable[[], Awaitable[None]],
    lifetime_end: datetime,
) -> tuple[asyncio.Task[ContainerExit] | None, str | None]:
    """Deregister before terminating: an idle runner then takes no job while it is stopped.

    GitHub refuses to delete a busy runner: it took a job after all, so that job is let finish
    (within the runner's lifetime) and deregistration tried again, unless the runner then
    exited cleanly. Returns the exit watcher
    (started here if the caller had none) and why deregistration failed, if it did: the caller
    terminates anyway, and a registration left behind goes offline and is swept."""
    while True:
        try:
            outcome = await deregister_once()
        except ActivityError as error:
            return exit_task, str(error.cause or error)
        if outcome is not DeregisterOutcome.BUSY:
            return exit_task, None
        await on_busy()
        if exit_task is None:
            # Its spawn was cancelled or failed after the runner started and took a job: watch
            # it now, so the job is not killed with its container.
            exit_task = watch_now()
        remaining = lifetime_end - workflow.now()
        if exit_task is None or exit_task.done() or remaining <= timedelta(0):
            return exit_task, None
        try:
            await workflow.wait_condition(
                exit_task.done, timeout=remaining, timeout_summary="busy runner to finish"
            )
        except TimeoutError:
            pass
        if exit_code(exit_task) == 0:
            # It finished the job it took and its listener exited cleanly: GitHub has removed the
            # ephemeral runner, and asking again would only spend an API call on a 404.
            return exit_task, None


async def deregister(ref: RunnerRef, github_queue: str | None) -> DeregisterOutcome:
    return await on_github(
        GitHubActivities.deregister_runner,
        ref,
        summary=f"deregister {ref.runner_name}",
        github_queue=github_queue,
        retry=CLEANUP_RETRY,
    )


async def terminate(ref: ContainerRef) -> ContainerExit:
    return await workflow.execute_activity_method(
        ContainerActivities.terminate,
        ref,
        start_to_close_timeout=timedelta(minutes=2),
        retry_policy=CLEANUP_RETRY,
        summary=f"terminate {ref.name}",
        task_queue=ref.task_queue,
    )


async def finish_despite_cancel(activity: asyncio.Task[T], *, stop_it: bool) -> T:
    """Await an activity that may create something (a registration, a container), so that a
    workflow cancel is never lost: the activity is let finish (or asked to stop and awaited)
    before the cancel goes on to teardown, which then finds whatever it made."""
    try:
        return await asyncio.shield(activity)
    except asyncio.CancelledError:
        if stop_it:
            activity.cancel()
        await workflow.wait([activity])
        if not activity.cancelled():
            activity.exception()  # retrieved: teardown looks for what it made by name
        raise


def exited(task: asyncio.Task[ContainerExit]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def exit_code(task: asyncio.Task[ContainerExit]) -> int | None:
    return task.result().exit_code if exited(task) else None


def confirmed_gone(task: asyncio.Task[ContainerExit] | None) -> bool:
    """The watcher saw the container exit and removed it: no terminate is needed."""
    return task is not None and exited(task) and task.result().gone


async def cancel_quietly(task: asyncio.Task[Any]) -> None:
    """Cancel an activity we no longer need and wait until it is settled. A workflow cancel that
    arrives meanwhile still propagates: only the task's own outcome is discarded."""
    if not task.done():
        task.cancel()
    await workflow.wait([task])
    if not task.cancelled():
        task.exception()
