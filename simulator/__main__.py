"""Run the simulator standalone: ``python -m simulator --port 8787 --webhook-url URL``."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from simulator.faults import FaultConfig
from simulator.server import GitHubSimulator


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--owner", default="acme")
    parser.add_argument("--repo", default="widgets", help="the default repository")
    parser.add_argument(
        "--repos", default=None, help="comma-separated: all the owner's repositories (default: --repo)"
    )
    parser.add_argument("--token", default="sim-token")
    parser.add_argument("--webhook-url", default=None)
    parser.add_argument("--webhook-secret", default="sim-secret")
    parser.add_argument("--agent-timeout", type=float, default=10.0)
    parser.add_argument("--faults", default=None, help="FaultConfig as JSON")
    return parser.parse_args()


async def _serve(args: argparse.Namespace) -> None:
    faults = FaultConfig.model_validate(json.loads(args.faults)) if args.faults else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sim = GitHubSimulator(
        owner=args.owner,
        repo=args.repo,
        repos=args.repos.split(",") if args.repos else None,
        token=args.token,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        faults=faults,
        agent_timeout_s=args.agent_timeout,
    )
    await sim.start(args.host, args.port)
    try:
        repos = ", ".join(f"{args.owner}/{name}" for name in sim.repos)
        print(f"GitHub simulator listening on {sim.url} ({repos})", flush=True)
        await stop.wait()
    finally:
        await sim.stop()


def main() -> None:
    asyncio.run(_serve(_parse_args()))


if __name__ == "__main__":
    main()
