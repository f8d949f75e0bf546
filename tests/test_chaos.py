"""Chaos: 100 jobs through a pool of 10 while GitHub, the backend and the runners misbehave.

Faults: a window of 50% 502s on the registration endpoints, 5% lost responses (the server
acts, the client sees a 502) on every mutating GitHub call, 5% failed and 5% lost-response
container spawns, 10% of runners that never connect, duplicated and reordered webhooks.
The invariants are checked with numbers at the end.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError

from mayfly.backends import BackendError, ContainerBackend, ContainerRecord, ContainerState
from mayfly.embedded import EmbeddedStack
from mayfly.models import RunnerJobResult, job_workflow_id
from simulator import FaultConfig
from tests.backends import DelegatingBackend
from tests.probe import ConcurrencyProbe

JOBS, CAP = 100, 10


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
        semaphore_reap_interval_s=5.0,
        sweep_interval_s=5.0,
        faults=faults,
        wrap_backend=wrap,
    )
    await stack.start()
    started = time.monotonic()
    try:
        job_ids = stack.queue_jobs(JOBS, duration_s=1.0)
        sim = stack.simulator
        # The 502 burst lasts until a third of the jobs are done, then GitHub recovers.
        await sim.wait_for(lambda: sum(j.status == "completed" for j in sim.jobs()) >= JOBS // 3, 300)
        burst_502s = sim.status_codes[502]
        sim.set_faults(faults.model_copy(update={"registration_502_rate": 0.0}))
        await sim.wait_for(lambda: all(sim.job(j).status == "completed" for j in job_ids), 600)

        results: list[RunnerJobResult] = []
        failed: list[str] = []
        for job_id in job_ids:
            handle = client.get_workflow_handle(job_workflow_id(job_id), result_type=RunnerJobResult)
            try:
                results.append(await handle.result())
            except WorkflowFailureError as error:
                failed.append(f"{job_id}: {error.cause}")
        makespan = time.monotonic() - started

        async def all_closed() -> bool:
            statuses = [await stack.job_workflow_status(j) for j in job_ids]
            return all(s != WorkflowExecutionStatus.RUNNING for s in statuses)

        assert await all_closed()
        semaphore = await stack.semaphore_status()
        running = [r.name for r in await stack.backend.list() if r.state is ContainerState.RUNNING]
        jobs = {job.id: job for job in sim.jobs()}
        calls = sum(count for key, count in sim.calls.items() if not key[-3:].isdigit())
        spawned = sum(r.runners_spawned for r in results)
        registration_failures = sum(r.registration_failures for r in results)
        succeeded = sum(j.conclusion == "success" for j in jobs.values())
        print(
            f"\nchaos: {JOBS} jobs, cap {CAP}, makespan {makespan:.0f}s\n"
            f"  jobs succeeded on some runner: {succeeded}/{JOBS}\n"
            f"  job workflows failed: {len(failed)} {failed[:3]}\n"
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
        assert all(jobs[j].conclusion == "success" and jobs[j].runner_name for j in job_ids)
        assert failed == [], "no job workflow is designed to fail in this scenario"
        assert probe.violations() == []
        assert burst_502s > 0 and flaky[0].injected["spawn_failed"] > 0 and len(probe.hangs()) > 0
        assert semaphore.holders == [] and semaphore.waiters == []
        assert running == [] and probe.held_now() == 0
        assert sim.runners() == []
    finally:
        await stack.stop()
