"""The holder's side of the slot semaphore, for use inside any workflow.

The owning workflow forwards its `slot_granted` signal to `on_grant` and must call `release`
in a `finally`, so the slot goes back on success, failure and cancellation alike.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.slots import SlotActivities
    from mayfly.models import AcquireRequest, ReleaseRequest, SlotGrant, SlotRequest, semaphore_workflow_id


class SlotLease:
    def __init__(self, pool: str, capacity: int, reap_interval_s: float, *, key: str = "") -> None:
        info = workflow.info()
        # Unique per run (a continued-as-new or reset holder asks for a new slot), and per key
        # for a workflow that takes several slots in turn.
        self.request_id = f"{info.workflow_id}/{info.run_id}" + (f"/{key}" if key else "")
        self._pool = pool
        self._capacity = capacity
        self._reap_interval_s = reap_interval_s
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

        Asking again after that is harmless (the request id makes it idempotent), and it
        re-asserts the request should the semaphore have lost it."""
        info = workflow.info()
        await workflow.execute_local_activity_method(
            SlotActivities.request,
            SlotRequest(
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
            ),
            start_to_close_timeout=timedelta(seconds=10),
        )
        try:
            await workflow.wait_condition(
                lambda: self.granted or give_up(), timeout=wait_at_most, timeout_summary="wait for a slot"
            )
        except TimeoutError:
            pass
        return self.granted

    async def release(self) -> None:
        """Safe to call whether the slot was granted, is still queued, or was never requested."""
        handle = workflow.get_external_workflow_handle(semaphore_workflow_id(self._pool))
        try:
            await handle.signal("release", ReleaseRequest(request_id=self.request_id))
        except ApplicationError as error:
            if error.type != "ExternalWorkflowExecutionNotFound":
                raise
        self.granted = False
