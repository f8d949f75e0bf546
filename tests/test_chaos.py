"""Chaos: 100 jobs through a pool of 10 while GitHub, the backend, the runners and operators misbehave.

Faults: a window of 50% 502s on the registration endpoints, 5% lost responses (the server
acts, the client sees a 502) on every mutating GitHub call, 5% failed and 5% lost-response
container spawns, 10% of runners that never connect, duplicated and reordered webhooks, 5% of
in_progress/completed deliveries lost. Jobs come as single runs, matrix runs and runs held for
approval; job workflows are cancelled in every phase, and some jobs are cancelled on GitHub.
The invariants are checked with numbers at the end.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import CancelledError

from mayfly.app.embedded import DEMO_LABELS, EmbeddedStack
from mayfly.backends import BackendError, ContainerBackend, ContainerRecord, ContainerState
from mayfly.models import JobPhase, RunnerJobResult, job_workflow_id
from simulator import ApiError, FaultConfig
from simulator.probe import ConcurrencyProbe
from tests.backends import DelegatingBackend
from tests.jobs import phase

CAP = 10
SINGLE_JOBS, MATRIX_RUNS, MATRIX_SIZE, APPROVAL_JOBS = 70, 4, 5, 10
JOBS = SINGLE_JOBS + MATRIX_RUNS * MATRIX_SIZE + APPROVAL_JOBS
GITHUB_CANCELLATIONS = 4
# Spawning and teardown of a local process take milliseconds; a little latency gives the
# operator in this test a chance to cancel a workflow in those phases too.
BACKEND_LATENCY_S = 0.4
CANCEL_PHASES = [
    JobPhase.WAITING_FOR_SLOT,
    JobPhase.MINTING,
    JobPhase.SPAWNING,
    JobPhase.REGISTERING,
    JobPhase.RUNNING,
    JobPhase.TEARING_DOWN,
]


class FlakyBackend(DelegatingBackend):
    """The real backend behind a layer that fails some spawns, before or after acting."""

    def __init__(self, inner: ContainerBackend, *, fail_rate: float, lost_rate: float, seed: int) -> None:
        super().__init__(inner)
        self._fail_rate = fail_rate
        self._lost_rate = lost_rate
        self._rng = random.Random(seed)
        self.injected: Counter[str] = Counter()

    async def spawn(
        self, *, name: str, owner_workflow_id: str, job_id: int, jit_config: str, max_lifetime_s: float
    ) -> ContainerRecord:
        roll = self._rng.random()
        await asyncio.sleep(BACKEND_LATENCY_S)
        if roll < self._fail_rate:
            self.injected["spawn_failed"] += 1
            raise BackendError("injected: provider refused to create the container")
        record = await super().spawn(
            name=name,
            owner_workflow_id=owner_workflow_id,
            job_id=job_id,
            jit_config=jit_config,
            max_lifetime_s=max_lifetime_s,
        )
        if roll < self._fail_rate + self._lost_rate:
            self.injected["spawn_response_lost"] += 1
            raise BackendError("injected: container created but the response was lost")
        return record

    async def terminate(self, name: str) -> ContainerRecord | None:
        await asyncio.sleep(BACKEND_LATENCY_S)
        return await super().terminate(name)


async def cancel_in_every_phase(stack: EmbeddedStack, job_ids: list[int], rng: random.Random) -> Counter[str]:
    """An operator cancelling job workflows: twice in each phase, where the timing allows."""
    cancelled: Counter[str] = Counter()
    done: set[int] = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and any(cancelled[p.value] < 2 for p in CANCEL_PHASES):
        for job_id in rng.sample(job_ids, len(job_ids)):
            if job_id in done:
                continue
            current = await phase(stack, job_id)
            if current in CANCEL_PHASES and cancelled[current.value] < 2:
                await stack.client.get_workflow_handle(job_workflow_id(job_id)).cancel()
                cancelled[current.value] += 1
                done.add(job_id)
        await asyncio.sleep(0.2)
    return cancelled


async def test_chaos_invariants_hold(
    client: Client, task_queue: str, pool_name: str, state_dir: Path
) -> None:
    probe = ConcurrencyProbe(ledger=state_dir / "probe", cap=CAP)
    flaky: list[FlakyBackend] = []

    def wrap(inner: ContainerBackend) -> ContainerBackend:
        flaky.append(FlakyBackend(inner, fail_rate=0.05, lost_rate=0.05, seed=11))
        return flaky[0]

    faults = FaultConfig(
        registration_502_rate=0.5,
        lost_response_rate=0.05,
        webhook_duplicate_rate=0.1,
        webhook_reorder_rate=0.1,
        webhook_drop_rate=0.05,
        webhook_drop_actions=["in_progress", "completed"],
        seed=20261123,
    )
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        max_runners=CAP,
        task_queue=task_queue,
        pool=pool_name,
        runner_command=probe.command,
        runner_env={**probe.env, "MAYFLY_PROBE_HANG_RATE": "0.1"},
        registration_timeout_s=8.0,
        max_registration_attempts=6,
        idle_ttl_s=10.0,
        job_status_check_interval_s=5.0,
        semaphore_reap_interval_s=5.0,
        sweep_interval_s=5.0,
        faults=faults,
        wrap_backend=wrap,
    )
    await stack.start()
    started = time.monotonic()
    rng = random.Random(7)
    try:
        sim = stack.simulator
        job_ids = stack.queue_jobs(SINGLE_JOBS, duration_s=1.0)
        for _ in range(MATRIX_RUNS):
            job_ids += sim.queue_run(DEMO_LABELS, MATRIX_SIZE, duration_s=1.0)
        held = [sim.queue_job(DEMO_LABELS, 1.0, needs_approval=True) for _ in range(APPROVAL_JOBS)]
        job_ids += held
        operator = asyncio.create_task(cancel_in_every_phase(stack, job_ids, rng))
        github_cancelled: list[int] = []
        # The 502 burst lasts until a third of the jobs are done, then GitHub recovers.
        await sim.wait_for(lambda: sum(j.status == "completed" for j in sim.jobs()) >= JOBS // 3, 300)
        burst_502s = sim.status_codes[502]
        sim.set_faults(faults.model_copy(update={"registration_502_rate": 0.0}))
        for job_id in held:
            sim.approve_job(job_id)
        for job_id in rng.sample(job_ids, GITHUB_CANCELLATIONS):
            try:
                sim.cancel_job(job_id)
                github_cancelled.append(job_id)
            except ApiError:
                pass  # already completed
        await sim.wait_for(lambda: all(sim.job(j).status == "completed" for j in job_ids), 600)
        operator_cancels = await operator

        async def all_closed() -> bool:
            statuses = [await stack.job_workflow_status(j) for j in job_ids]
            return all(s != WorkflowExecutionStatus.RUNNING for s in statuses)

        # Once GitHub has concluded every job, no job workflow may linger (it asks GitHub).
        async with asyncio.timeout(120):
            while not await all_closed():  # noqa: ASYNC110 (workflow status raises no event here)
                await asyncio.sleep(0.5)

        results: list[RunnerJobResult] = []
        failed: list[str] = []
        cancelled_last = 0
        for job_id in job_ids:
            handle = client.get_workflow_handle(job_workflow_id(job_id), result_type=RunnerJobResult)
            try:
                results.append(await handle.result())
            except WorkflowFailureError as error:
                if isinstance(error.cause, CancelledError):
                    cancelled_last += 1  # the operator's cancel, and GitHub had nothing left to serve
                else:
                    failed.append(f"{job_id}: {error.cause}")
        makespan = time.monotonic() - started

        semaphore = await stack.semaphore_status()
        running = [r.name for r in await stack.backend.list() if r.state is ContainerState.RUNNING]
        jobs = {job.id: job for job in sim.jobs()}
        calls = sum(count for key, count in sim.calls.items() if not key[-3:].isdigit())
        spawned = sum(r.runners_spawned for r in results)
        registration_failures = sum(r.registration_failures for r in results)
        succeeded = sum(j.conclusion == "success" for j in jobs.values())
        restarted = [
            j
            for j in job_ids
            if (await client.count_workflows(f'WorkflowId = "{job_workflow_id(j)}"')).count > 1
        ]
        print(
            f"\nchaos: {JOBS} jobs, cap {CAP}, makespan {makespan:.0f}s\n"
            f"  jobs succeeded on some runner: {succeeded}/{JOBS}\n"
            f"  job workflows failed: {len(failed)} {failed[:3]}\n"
            f"  operator cancels by phase {dict(operator_cancels)}; "
            f"jobs given a new workflow {len(restarted)}; last run cancelled {cancelled_last}; "
            f"cancelled on GitHub {len(github_cancelled)}\n"
            f"  in_progress/completed deliveries lost {sum(d.dropped for d in sim.deliveries())}, "
            f"job lookups {sim.calls['GET /repos/{owner}/{repo}/actions/jobs/{job_id}']}\n"
            f"  runners spawned {spawned}, registration failures {registration_failures}, "
            f"never-connecting runners {len(probe.hangs())}\n"
            f"  502s served {sim.status_codes[502]} ({burst_502s} during the burst window), "
            f"429s {sim.status_codes[429]}, 409s {sim.status_codes[409]}\n"
            f"  injected backend faults {dict(flaky[0].injected)}\n"
            f"  GitHub API calls {calls} ({calls / JOBS:.1f} per job)\n"
            f"  runner processes started {len(probe.starts())}, cap violations {len(probe.violations())}\n"
            f"  end: slots held {len(semaphore.holders)}, waiting {len(semaphore.waiters)}, "
            f"containers running {len(running)}, registrations {len(sim.runners())}"
        )
        served = [j for j in job_ids if j not in github_cancelled]
        assert all(jobs[j].conclusion == "success" and jobs[j].runner_name for j in served)
        assert all(jobs[j].conclusion == "cancelled" for j in github_cancelled)
        assert failed == [], "no job workflow is designed to fail in this scenario"
        assert sum(operator_cancels.values()) >= 8 and len(operator_cancels) >= 5, operator_cancels
        assert sum(d.dropped for d in sim.deliveries()) > 0
        assert probe.violations() == []
        assert burst_502s > 0 and flaky[0].injected["spawn_failed"] > 0 and len(probe.hangs()) > 0
        assert semaphore.holders == [] and semaphore.waiters == []
        assert running == [] and probe.held_now() == 0
        assert sim.runners() == []
    finally:
        await stack.stop()
