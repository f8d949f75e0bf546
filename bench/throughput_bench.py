"""Throughput under a 502 burst: Mayfly against the seed's naive script, side by side.

    .venv/bin/python -m bench.throughput_bench [--jobs 500] [--cap 20] [--job-seconds 5] [--mint-502 0.3]

Both runs use the same GitHub simulator, the same simulated runner processes and the same
fault rate on runner registration. The baseline is the seed's script: each queued job gets a
container right away (up to the cap), the container mints its own registration once with no
retry, and a container whose mint failed keeps its slot until the container's own timeout.

Figures: makespan; slot occupancy (busy slot-seconds / (cap x makespan), with busy meaning
held for a job by Mayfly, or alive for the baseline); useful work (job-seconds run / (cap x
makespan)); GitHub calls per job. Targets from issue 4: occupancy >= 97% and at most 2 GitHub
calls per job on the happy path.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
from temporalio.client import Client

from bench.phases import job_timeline
from mayfly.app.embedded import DEMO_LABELS, SIMULATED_RUNNER, EmbeddedStack
from mayfly.backends.local import LocalProcessBackend
from mayfly.config import LocalBackendSettings
from mayfly.devserver import local_environment
from mayfly.models import RunnerJobResult, job_workflow_id
from mayfly.process import exit_now
from simulator import FaultConfig, GitHubSimulator


@dataclass
class Figures:
    name: str
    jobs: int
    completed: int
    makespan_s: float
    busy_slot_s: float
    job_s: float
    github_calls: int
    github_calls_ok: int
    cap: int

    def row(self) -> str:
        capacity = self.cap * self.makespan_s
        return (
            f"{self.name:<10} {self.completed:>4}/{self.jobs:<4} {self.makespan_s:>8.1f}s "
            f"{self.busy_slot_s / capacity:>9.1%} {self.job_s / capacity:>9.1%} "
            f"{self.github_calls / self.jobs:>10.2f} {self.github_calls_ok / self.jobs:>10.2f}"
        )


def api_calls(sim: GitHubSimulator) -> tuple[int, int]:
    total = sum(n for key, n in sim.calls.items() if not key[-3:].isdigit())
    ok = sum(n for key, n in sim.calls.items() if key[-3:].isdigit() and key[-3] == "2")
    return total, ok


async def run_mayfly(client: Client, args: argparse.Namespace, state_dir: Path) -> Figures:
    stack = EmbeddedStack(
        client,
        state_dir=state_dir,
        max_runners=args.cap,
        task_queue=f"bench-{uuid.uuid4().hex[:6]}",
        pool=f"b{uuid.uuid4().hex[:8]}",
        faults=FaultConfig(registration_502_rate=args.mint_502, seed=1),
        registration_timeout_s=60,
        sweep_interval_s=60,
        registration_poll_s=10.0,  # the product defaults
        reconcile_min_age_s=120.0,
    )
    await stack.start()
    try:
        started = time.monotonic()
        job_ids = stack.queue_jobs(args.jobs, duration_s=args.job_seconds)
        await stack.wait_jobs_finished(job_ids, within_s=args.timeout)
        makespan = time.monotonic() - started
        held = 0.0
        for job_id in job_ids:
            handle = client.get_workflow_handle(job_workflow_id(job_id), result_type=RunnerJobResult)
            held += (await handle.result()).slot_held_s
        total, ok = api_calls(stack.simulator)
        print("mayfly per-phase timeline (from job histories):")
        print((await job_timeline(client, job_ids)).report(cap=args.cap))
        print("mayfly GitHub calls by route and status:")
        for key, count in sorted(stack.simulator.calls.items()):
            if key[-3:].isdigit():
                print(f"  {count:>6}  {key}")
        completed = [j for j in stack.simulator.jobs() if j.status == "completed"]
        return Figures(
            "mayfly",
            args.jobs,
            len(completed),
            makespan,
            held,
            sum(j.duration_s for j in completed),
            total,
            ok,
            args.cap,
        )
    finally:
        await stack.stop()


async def run_naive(args: argparse.Namespace, state_dir: Path) -> Figures:
    """The seed's script, reproduced faithfully enough to show its failure mode."""
    token = secrets.token_urlsafe(8)
    sim = GitHubSimulator(
        token=token,
        faults=FaultConfig(registration_502_rate=args.mint_502, seed=1),
        first_job_id=int(time.time() * 1000) % 10**12 * 10,
    )
    await sim.start()
    backend = LocalProcessBackend(
        LocalBackendSettings(command=SIMULATED_RUNNER, state_dir=state_dir / "naive")
    )
    provider_slots = asyncio.Semaphore(args.cap)  # the provider's max_containers
    busy = 0.0
    http = httpx.AsyncClient(base_url=sim.url, headers={"Authorization": f"Bearer {token}"}, timeout=15)

    async def container(job_id: int) -> None:
        nonlocal busy
        async with provider_slots:
            alive_from = time.monotonic()
            try:
                name = f"naive-{job_id}"
                try:
                    response = await http.post(
                        f"/repos/{sim.owner}/{sim.repo}/actions/runners/generate-jitconfig",
                        json={"name": name, "runner_group_id": 1, "labels": DEMO_LABELS},
                    )
                    minted = response.status_code == 201
                except httpx.HTTPError:
                    minted = False
                if not minted:
                    # The script dies, but the provider counts the container until its timeout.
                    await asyncio.sleep(args.naive_container_timeout)
                    return
                await backend.spawn(
                    name=name,
                    owner_workflow_id="naive",
                    job_id=job_id,
                    jit_config=response.json()["encoded_jit_config"],
                    max_lifetime_s=3600,
                )
                # Polling, as such a script would; a process exit raises no event here.
                while (record := await backend.inspect(name)) is not None and record.state.value == "running":  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
            finally:
                busy += time.monotonic() - alive_from

    started = time.monotonic()
    job_ids = [sim.queue_job(DEMO_LABELS, duration_s=args.job_seconds) for _ in range(args.jobs)]
    await asyncio.gather(*(container(job_id) for job_id in job_ids))
    # Jobs whose container died are left queued, unless another job's runner took them.
    makespan = time.monotonic() - started
    completed = [j for j in sim.jobs() if j.status == "completed"]
    total, ok = api_calls(sim)
    await http.aclose()
    await sim.stop()
    for record in await backend.list():
        await backend.terminate(record.name)
    return Figures(
        "naive",
        args.jobs,
        len(completed),
        makespan,
        busy,
        sum(j.duration_s for j in completed),
        total,
        ok,
        args.cap,
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--cap", type=int, default=20)
    parser.add_argument("--job-seconds", type=float, default=5.0)
    parser.add_argument("--mint-502", type=float, default=0.3)
    parser.add_argument("--naive-container-timeout", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()

    env = await local_environment()
    with tempfile.TemporaryDirectory() as tmp:
        mayfly = await run_mayfly(env.client, args, Path(tmp) / "mayfly")
        naive = await run_naive(args, Path(tmp))
    await env.shutdown()

    ideal = args.jobs * args.job_seconds / args.cap
    occupancy = mayfly.busy_slot_s / (args.cap * mayfly.makespan_s)
    print(
        f"{args.jobs} jobs of {args.job_seconds:.0f}s, cap {args.cap}, {args.mint_502:.0%} 502s on mint; "
        f"ideal makespan {ideal:.0f}s; naive container timeout {args.naive_container_timeout:.0f}s"
    )
    header = ("", "completed", "makespan", "occupancy", "useful", "calls/job", "2xx/job")
    print(f"{header[0]:<10} " + " ".join(f"{h:>9}" for h in header[1:]))
    print(mayfly.row())
    print(naive.row())
    print(
        f"mayfly/naive makespan {mayfly.makespan_s / naive.makespan_s:.2f} (happy-path target <= 1.10), "
        f"{mayfly.completed - naive.completed} more jobs completed; "
        f"occupancy target 97%: measured/target {occupancy / 0.97:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    exit_now(0)
