"""Webhook starter benchmark: delivery -> workflow started, at 100 requests/s for 30 s.

    .venv/bin/python -m bench.webhook_bench [--rps 100] [--seconds 30]

Starts a Temporal dev server and the starter in this process; the load comes from
bench/webhook_load.py in a separate process on loopback. The starter answers 200 only after
Temporal has accepted the workflow start, so the HTTP latency is the webhook -> started latency.
Targets from issue 6: p99 <= 300 ms and 0 errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import uuid

from temporalio.client import Client

from bench.cpu import children_cpu_s, dev_server_cpu_s, own_cpu_s
from mayfly.app.starter import create_starter_app
from mayfly.config import GitHubSettings, MayflySettings, PoolSettings, TemporalSettings
from mayfly.devserver import local_environment
from mayfly.process import exit_now
from mayfly.serving import serve


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rps", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    env = await local_environment()
    secret = secrets.token_hex(16)
    settings = MayflySettings(
        github=GitHubSettings(repository="acme/widgets", token="unused", webhook_secret=secret),
        # No worker polls this queue: the benchmark measures the starter and Temporal's start.
        temporal=TemporalSettings(task_queue=f"webhook-bench-{uuid.uuid4().hex[:6]}"),
        pools=[PoolSettings(name="bench", labels=["self-hosted", "linux"], max_runners=10)],
    )
    client = env.client

    async def provider() -> Client:
        return client

    server = await serve(create_starter_app(settings, provider))
    cpu_before = (own_cpu_s(), dev_server_cpu_s(), children_cpu_s())
    load = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.webhook_load",
        "--url",
        f"{server.url}/webhook",
        "--secret",
        secret,
        "--rps",
        str(args.rps),
        "--seconds",
        str(args.seconds),
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await load.communicate()
    starter_cpu = own_cpu_s() - cpu_before[0]
    server_cpu = dev_server_cpu_s() - cpu_before[1]
    load_cpu = children_cpu_s() - cpu_before[2]
    await server.stop()
    await env.shutdown()
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    errors = sum(n for status, n in result["statuses"].items() if status != "200")
    print(
        f"offered {args.rps:.0f} req/s for {args.seconds:.0f}s: {result['sent']} sent "
        f"in {result['elapsed_s']:.1f}s, statuses {result['statuses']}"
    )
    print(
        f"webhook -> workflow started: p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, "
        f"max {result['max_ms']:.0f} ms (target p99 <= 300 ms; "
        f"measured/target {result['p99_ms'] / 300:.2f}); errors {errors} (target 0)"
    )
    print(
        f"CPU: starter {starter_cpu:.1f}s, dev server {server_cpu:.1f}s, load generator {load_cpu:.1f}s "
        f"of {result['elapsed_s'] * 2:.1f}s available on 2 cores"
    )


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    exit_now(0)
