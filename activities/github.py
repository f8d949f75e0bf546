"""GitHub runner registration activities."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.errors import github_failure
from mayfly.github import GitHubClient, JitConfig
from mayfly.github_errors import AlreadyExists, GitHubError, RunnerBusy
from mayfly.metrics import record_rate_limit
from mayfly.models import (
    DeregisterOutcome,
    GitHubJobStatus,
    JobRef,
    MintedRunner,
    MintRequest,
    RunnerRef,
    RunnerStatus,
)
from mayfly.sealing import Sealer


async def _sleep_heartbeating(seconds: float) -> None:
    """Sleep, heartbeating each second, so a cancellation is delivered while we wait."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (remaining := deadline - loop.time()) > 0:
        activity.heartbeat()
        await asyncio.sleep(min(1.0, remaining))


def client_for_scope(clients: Mapping[str, GitHubClient], scope: str) -> GitHubClient:
    client = clients.get(scope)
    if client is None:
        # A workflow started under a scope this worker's config no longer has: no retry helps.
        raise ApplicationError(
            f"scope {scope!r} is not configured on this worker", type="UnknownScope", non_retryable=True
        )
    return client


class GitHubActivities:
    """GitHub calls for every scope, each with the scope's own client (credential, API URL)."""

    def __init__(
        self,
        clients: Mapping[str, GitHubClient],
        sealer: Sealer,
        *,
        poll_interval_s: float = 10.0,
    ) -> None:
        self._clients = clients
        self._sealer = sealer
        self._poll_interval_s = poll_interval_s

    def _client(self, scope: str) -> GitHubClient:
        return client_for_scope(self._clients, scope)

    async def _mint(self, request: MintRequest) -> JitConfig:
        github = self._client(request.scope)
        try:
            return await github.generate_jit_config(
                request.runner_name, request.labels, request.runner_group_id
            )
        except AlreadyExists:
            pass
        # A 409 on our deterministic name means an earlier try registered it and its response
        # (with the only copy of the JIT config) was lost. A runner that never connected is
        # useless without that config, so delete it and mint again.
        existing = await github.find_runner(request.runner_name)
        if existing is None:
            raise ApplicationError(
                f"runner {request.runner_name} reported as existing but not listed yet",
                type="RunnerNotListed",
            )
        if existing.online or existing.busy:
            raise ApplicationError(
                f"runner name {request.runner_name} is already in use by a connected runner",
                type="RunnerNameInUse",
                non_retryable=True,
            )
        await github.delete_runner(existing.id)
        activity.logger.info("deleted never-connected runner %s after a 409, minting again", existing.name)
        return await github.generate_jit_config(request.runner_name, request.labels, request.runner_group_id)

    @activity.defn(name="github.mint_runner")
    async def mint_runner(self, request: MintRequest) -> MintedRunner:
        try:
            jit = await self._mint(request)
        except GitHubError as error:
            raise github_failure(error) from None
        finally:
            record_rate_limit(activity.metric_meter(), self._client(request.scope).rate_limit_remaining)
        return MintedRunner(
            runner_id=jit.runner.id,
            jit_config=self._sealer.seal(jit.encoded_jit_config, context=request.runner_name),
        )

    async def _status(self, ref: RunnerRef) -> RunnerStatus:
        try:
            runner = await self._client(ref.scope).find_runner(ref.runner_name)
        except GitHubError as error:
            raise github_failure(error) from None
        if runner is None:
            return RunnerStatus(exists=False)
        return RunnerStatus(exists=True, online=runner.online, busy=runner.busy)

    @activity.defn(name="github.wait_online")
    async def wait_online(self, ref: RunnerRef) -> RunnerStatus:
        """Poll now, then every interval, until the runner is online, busy or gone. Started only
        once the workflow has waited in vain for the webhook that would have said so."""
        try:
            while True:
                status = await self._status(ref)
                if status.online or status.busy or not status.exists:
                    return status
                await _sleep_heartbeating(self._poll_interval_s)
        except asyncio.CancelledError:
            # The webhook won and the workflow moved on, possibly to its end: expected, and not
            # worth the warning with a traceback the worker logs for an unrequested cancel.
            raise ApplicationError(
                "poll no longer needed", type="PollCancelled", category=ApplicationErrorCategory.BENIGN
            ) from None

    @activity.defn(name="github.runner_status")
    async def runner_status(self, ref: RunnerRef) -> RunnerStatus:
        """One look at a runner: a warm runner's pool asks whether it took a job whose webhook was lost."""
        return await self._status(ref)

    @activity.defn(name="github.deregister_runner")
    async def deregister_runner(self, ref: RunnerRef) -> DeregisterOutcome:
        github = self._client(ref.scope)
        try:
            runner_id = ref.runner_id
            if runner_id is None:
                runner = await github.find_runner(ref.runner_name)
                if runner is None:
                    return DeregisterOutcome.ABSENT
                runner_id = runner.id
            deleted = await github.delete_runner(runner_id)
        except RunnerBusy:
            return DeregisterOutcome.BUSY
        except GitHubError as error:
            raise github_failure(error) from None
        return DeregisterOutcome.DELETED if deleted else DeregisterOutcome.ABSENT

    @activity.defn(name="github.job_status")
    async def job_status(self, ref: JobRef) -> GitHubJobStatus:
        """Ask GitHub where a job stands, when webhooks leave its workflow unsure."""
        try:
            job = await self._client(ref.scope).get_job(ref.repository, ref.job_id)
        except GitHubError as error:
            raise github_failure(error) from None
        if job is None:
            return GitHubJobStatus(found=False)
        return GitHubJobStatus(
            found=True, status=job.status, conclusion=job.conclusion, runner_name=job.runner_name
        )
