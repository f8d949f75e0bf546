"""The holder's side of the slot semaphore, for use inside any workflow.

The owning workflow forwards its `slot_granted` signal to `on_grant` and must call `release`
in a `finally`, so the slot goes back on success, failure and cancellation alike.

The semaphore can lose its state (an operator terminates or resets it). So a lease never
trusts it blindly: while waiting it rechecks now and then that it is still queued (rarely:
thousands may wait), and once granted a background task rechecks every
`holder_recheck_s` that the semaphore still counts the slot, re-asserting it if not. A fresh
semaphore run grants nothing until holders have had time to do so (`recovery_grace_s`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.slots import SlotActivities
    from mayfly.models import (
        AcquireRequest,
        ReleaseRequest,
        SlotGrant,
        SlotRecheck,
        SlotRelease,
        SlotRequest,
        holder_recheck_s,
        waiter_recheck_s,
    )

SLOT_CALL_TIMEOUT = timedelta(seconds=10)


class SlotLease:
    def __init__(self, pool: str, capacity: int, reap_interval_s: float, *, key: str = "") -> None:
        info = workflow.info()
        # Unique per run (a continued-as-new or reset holder asks for a new slot), and per key
        # for a workflow that takes several slots in turn.
        self.request_id = f"{info.workflow_id}/{info.run_id}" + (f"/{key}" if key else "")
        self._pool = pool
        self._capacity = capacity
        self._reap_interval_s = reap_interval_s
        self._request: SlotRequest | None = None
        self._watch: asyncio.Task[None] | None = None
        self.granted = False
        self.granted_at: datetime | None = None

    def on_grant(self, grant: SlotGrant) -> None:
        if grant.request_id == self.request_id and not self.granted:
            self.granted = True
            self.granted_at = workflow.now()

    def held_s(self) -> float:
        return (workflow.now() - self.granted_at).total_seconds() if self.granted_at else 0.0

    async def acquire(
        self, give_up: Callable[[], bool] = lambda: False, wait_at_most: timedelta | None = None
    ) -> bool:
        """Wait for a slot; returns False if `give_up()` became true or `wait_at_most` passed first.

        Asking again after that is harmless (the request id makes it idempotent)."""
        info = workflow.info()
        self._request = SlotRequest(
            pool=self._pool,
            capacity=self._capacity,
            reap_interval_s=self._reap_interval_s,
            task_queue=info.task_queue,
            acquire=AcquireRequest(
                request_id=self.request_id,
                holder_workflow_id=info.workflow_id,
                holder_run_id=info.run_id,
                requested_at=workflow.now(),
            ),
        )
        await workflow.execute_local_activity_method(
            SlotActivities.request, self._request, start_to_close_timeout=SLOT_CALL_TIMEOUT
        )
        until = workflow.now() + wait_at_most if wait_at_most is not None else None
        while not (self.granted or give_up()):
            timeout = self._jittered(waiter_recheck_s(self._reap_interval_s))
            if until is not None:
                if until <= workflow.now():
                    break
                timeout = min(timeout, until - workflow.now())
            try:
                await workflow.wait_condition(
                    lambda: self.granted or give_up(), timeout=timeout, timeout_summary="wait for a slot"
                )
            except TimeoutError:
                if until is None or workflow.now() < until:
                    await self._recheck()
        if self.granted:
            self._watch = asyncio.create_task(self._watch_slot())
        return self.granted

    async def release(self) -> None:
        """Safe to call whether the slot was granted, is still queued, or was never requested."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        # A local activity, not a signal command: the command's completion event would cost
        # this workflow one more task before it can finish.
        await workflow.execute_local_activity_method(
            SlotActivities.release,
            SlotRelease(pool=self._pool, release=ReleaseRequest(request_id=self.request_id)),
            start_to_close_timeout=SLOT_CALL_TIMEOUT,
        )
        self.granted = False

    async def _watch_slot(self) -> None:
        """Runs while the slot is held, until `release` cancels it."""
        while True:
            await workflow.sleep(
                self._jittered(holder_recheck_s(self._reap_interval_s)), summary="recheck slot"
            )
            await self._recheck()

    async def _recheck(self) -> None:
        assert self._request is not None
        try:
            await workflow.execute_local_activity_method(
                SlotActivities.recheck,
                SlotRecheck(slot=self._request, granted_at=self.granted_at),
                start_to_close_timeout=SLOT_CALL_TIMEOUT,
                # Bounded: a waiter must not sit in retries while its grant arrives.
                retry_policy=RetryPolicy(maximum_attempts=3),
            )
        except ActivityError as error:
            # The next recheck tries again; a lease must not fail its workflow over this.
            workflow.logger.warning("slot recheck failed: %s", error)

    def _jittered(self, seconds: float) -> timedelta:
        # Spread the rechecks of a burst of leases over time rather than in one wave; never
        # later than `seconds`, which the semaphore's recovery grace relies on.
        return timedelta(seconds=seconds * (0.8 + 0.2 * workflow.random().random()))
