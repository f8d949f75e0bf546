"""`mayfly usage` totals what the job workflows recorded, and that matches what GitHub saw."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

from mayfly.app.embedded import EmbeddedStack
from mayfly.app.usage import parse_span, usage, usage_lines
from tests.jobs import job_handle, nothing_left, until

StackFactory = Callable[..., Awaitable[EmbeddedStack]]


async def test_usage_totals_match_the_runner_lifetimes_github_saw(stack_factory: StackFactory) -> None:
    stack = await stack_factory(max_runners=3)
    sim = stack.simulator
    job_ids = stack.queue_jobs(3, duration_s=20.0)
    for job_id in job_ids:
        await stack.wait_workflow_started(job_id)
        await job_handle(stack, job_id).result()
    await until(lambda: nothing_left(stack))

    assert stack.settings is not None
    pool = stack.settings.pools[0].name  # unique to this test: other tests share the server

    # Visibility indexes a closed workflow's attributes a moment after it closes.
    async def all_counted() -> bool:
        totals = await usage(stack.client, timedelta(hours=1), "pool")
        return pool in totals and totals[pool].jobs == 3

    await until(all_counted, within_s=60)
    totals = await usage(stack.client, timedelta(hours=1), "pool")
    pool_totals = totals[pool]
    lifetimes = sim.runner_lifetimes()
    # Runners are not bound to jobs: when one takes another job's place, a job may register a
    # second runner, and the surplus one is reaped at once. Each registration still counts.
    assert len(lifetimes) >= 3
    seen_by_github = sum(lifetimes.values())
    assert abs(pool_totals.runner_s - seen_by_github) <= 0.05 * seen_by_github, (
        pool_totals.runner_s,
        lifetimes,
    )
    # A slot is held at least as long as the runner under it lives after its spawn.
    assert pool_totals.slot_s >= 0.9 * pool_totals.runner_s
    assert any(line.split()[:2] == [pool, "3"] for line in usage_lines(totals, "pool"))


def test_span_parsing_names_the_bad_value() -> None:
    assert parse_span("24h") == timedelta(hours=24) and parse_span("90m") == timedelta(minutes=90)
    try:
        parse_span("yesterday")
    except ValueError as error:
        assert "--since 'yesterday'" in str(error)
    else:
        raise AssertionError("accepted a bad span")
