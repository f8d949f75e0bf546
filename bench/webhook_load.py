"""Open-loop load generator for the webhook starter, run as its own process.

    python -m bench.webhook_load --url http://127.0.0.1:PORT/webhook --secret S --rps 100 --seconds 30

Sends signed `workflow_job` `queued` deliveries at a fixed rate (independent of responses, so a
slow starter shows up as latency, not as a lower offered load) and prints one JSON line of results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import httpx

from mayfly.signing import signature_256


def delivery(job_id: int, secret: bytes) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {
            "action": "queued",
            "workflow_job": {
                "id": job_id,
                "run_id": job_id // 10,
                "run_attempt": 1,
                "name": "bench",
                "labels": ["self-hosted", "linux"],
                "status": "queued",
                "runner_name": None,
                "conclusion": None,
            },
            "repository": {"full_name": "acme/widgets"},
        }
    ).encode()
    signature = signature_256(secret, body)
    headers = {
        "X-GitHub-Event": "workflow_job",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": signature,
        "Content-Type": "application/json",
    }
    return body, headers


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--rps", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--first-job-id", type=int, default=int(time.time() * 1000) * 10)
    args = parser.parse_args()
    secret = args.secret.encode()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=10, limits=limits) as http:

        async def send(job_id: int) -> None:
            body, headers = delivery(job_id, secret)
            started = time.perf_counter()
            try:
                response = await http.post(args.url, content=body, headers=headers)
                key = str(response.status_code)
            except httpx.HTTPError as error:
                key = type(error).__name__
            latencies.append(time.perf_counter() - started)
            statuses[key] = statuses.get(key, 0) + 1

        total = int(args.rps * args.seconds)
        begin = time.perf_counter()
        tasks = []
        for i in range(total):
            # Open loop: request i leaves at begin + i / rps whatever happened to the others.
            delay = begin + i / args.rps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(args.first_job_id + i)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    latencies.sort()
    print(
        json.dumps(
            {
                "sent": total,
                "elapsed_s": elapsed,
                "statuses": statuses,
                "p50_ms": latencies[len(latencies) // 2] * 1000,
                "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
                "max_ms": latencies[-1] * 1000,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
