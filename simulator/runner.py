"""Simulated ephemeral runner program: ``python -m simulator.runner``.

Behaves like ``run.sh`` with ``ACTIONS_RUNNER_INPUT_JITCONFIG``: connect, wait for one job,
run it, report it, exit 0. A deleted registration also exits 0 (as the real runner does),
so callers cannot use the exit code alone to tell "ran a job" from "was removed".

Exit codes: 0 job done / registration gone / job cancelled; 1 connection or protocol failure;
2 bad or missing JIT config.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from simulator import jitconfig

JIT_ENV = "ACTIONS_RUNNER_INPUT_JITCONFIG"
CONNECT_FAIL_ENV = "MAYFLY_SIM_RUNNER_CONNECT_FAIL"
# Seconds to wait before connecting: a container that is slow to start (a GPU sandbox's image pull).
START_DELAY_ENV = "MAYFLY_SIM_RUNNER_START_DELAY_S"
SESSION_HEADER = "X-Sim-Runner-Session"
CONNECT_ATTEMPTS = 5
POLL_ERROR_ATTEMPTS = 5
# Statuses meaning "this registration no longer exists": the real runner exits 0 on them.
_GONE = (404, 409, 410)


class _Exit(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def log(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    print(f"{stamp}: {message}", flush=True)


def _backoff(attempt: int) -> None:
    time.sleep(min(2.0, 0.1 * 2**attempt))


class Agent:
    def __init__(self, config: jitconfig.JitConfig, client: httpx.Client) -> None:
        self.config = config
        self.client = client
        self.base = config.server_url.rstrip("/") + "/_sim/agent"
        self.runner_id = config.agent_id
        self.session = ""
        self.poll_wait_s = 10.0
        self.heartbeat_interval_s = 3.0

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {SESSION_HEADER: self.session}
        return self.client.request(method, f"{self.base}{path}", headers=headers, **kwargs)

    def connect(self) -> None:
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                response = self._request(
                    "POST", "/connect", json={"jitconfig": jitconfig.encode(self.config)}
                )
            except httpx.TransportError as exc:
                log(f"connect attempt {attempt + 1} failed: {exc!r}")
                if attempt + 1 < CONNECT_ATTEMPTS:
                    _backoff(attempt)
                continue
            if response.status_code in _GONE:
                raise _Exit(0, f"Registration not usable ({response.status_code}): {_message(response)}")
            if response.status_code != 200:
                raise _Exit(1, f"connect refused ({response.status_code}): {_message(response)}")
            body = response.json()
            self.session = str(body["session_id"])
            self.poll_wait_s = float(body["poll_wait_s"])
            self.heartbeat_interval_s = float(body["heartbeat_interval_s"])
            log("√ Connected to GitHub")
            return
        raise _Exit(1, "could not connect to the server")

    def wait_for_job(self) -> tuple[int, float]:
        log("Listening for Jobs")
        failures = 0
        while True:
            try:
                response = self._request("GET", f"/{self.runner_id}/job", params={"wait": self.poll_wait_s})
            except httpx.TransportError as exc:
                failures += 1
                if failures >= POLL_ERROR_ATTEMPTS:
                    raise _Exit(1, f"lost the server: {exc!r}") from exc
                _backoff(failures)
                continue
            failures = 0
            if response.status_code == 200:
                body = response.json()
                return int(body["job_id"]), float(body["duration_s"])
            if response.status_code == 204:
                continue
            if response.status_code in _GONE:
                raise _Exit(0, "The runner registration has been deleted from the server.")
            raise _Exit(1, f"poll failed ({response.status_code}): {_message(response)}")

    def run_job(self, job_id: int, duration_s: float) -> None:
        log(f"Running job: {job_id}")
        deadline = time.monotonic() + duration_s
        # Heartbeats keep the runner "online" during a long job and tell us if it was cancelled.
        while (remaining := deadline - time.monotonic()) > 0:
            time.sleep(min(remaining, self.heartbeat_interval_s))
            if time.monotonic() < deadline:
                self._heartbeat()
        response = self._complete(job_id)
        if response.status_code in _GONE:
            raise _Exit(0, f"job {job_id} was cancelled or the runner was removed")
        if response.status_code != 204:
            raise _Exit(1, f"completion failed ({response.status_code}): {_message(response)}")
        log(f"Job {job_id} completed with result: Succeeded")

    def _complete(self, job_id: int) -> httpx.Response:
        for attempt in range(POLL_ERROR_ATTEMPTS):
            try:
                return self._request("POST", f"/{self.runner_id}/complete", json={"job_id": job_id})
            except httpx.TransportError as exc:
                log(f"reporting completion failed: {exc!r}")
                _backoff(attempt)
        raise _Exit(1, f"could not report completion of job {job_id}")

    def _heartbeat(self) -> None:
        try:
            response = self._request("POST", f"/{self.runner_id}/heartbeat")
        except httpx.TransportError:
            return  # a missed heartbeat is tolerated; the server allows several
        if response.status_code in _GONE:
            raise _Exit(0, "job cancelled: the runner registration was deleted")


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("message", response.text))
    except ValueError:
        return response.text


def main() -> int:
    # Pop first: the secret must not leak to anything this process might spawn.
    blob = os.environ.pop(JIT_ENV, None)
    if os.environ.get(CONNECT_FAIL_ENV) == "1":
        log(f"{CONNECT_FAIL_ENV}=1: failing before connecting")
        return 1
    if not blob:
        log(f"{JIT_ENV} is not set")
        return 2
    try:
        config = jitconfig.decode(blob)
    except jitconfig.JitConfigError as exc:
        log(f"invalid JIT config: {exc}")
        return 2
    log(f"Runner {config.agent_name} (id {config.agent_id}) starting against {config.server_url}")
    time.sleep(float(os.environ.get(START_DELAY_ENV, "0")))
    with httpx.Client(timeout=httpx.Timeout(10.0, read=40.0)) as client:
        agent = Agent(config, client)
        try:
            agent.connect()
            job_id, duration_s = agent.wait_for_job()
            agent.run_job(job_id, duration_s)
        except _Exit as done:
            log(done.reason)
            return done.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
