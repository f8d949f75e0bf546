"""Signed webhook delivery from a background sender, several at a time as GitHub does, with delivery faults.

API handlers only enqueue; the HTTP POST happens in the sender task so a slow or dead
receiver can never stall the simulated GitHub API (GitHub behaves the same way).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from pydantic import BaseModel

from mayfly.signing import signature_256
from simulator.faults import FaultConfig

DeliveryState = Literal["pending", "delivered", "failed", "dropped", "undelivered"]

WEBHOOK_TIMEOUT_S = 10.0
# Deliveries posted at once. GitHub sends each delivery on its own, so a slow receiver delays
# some of them, not every later one.
MAX_IN_FLIGHT = 8


class DeliveryRecord(BaseModel):
    """What happened to one webhook delivery (one ``X-GitHub-Delivery`` id)."""

    delivery_id: str
    event: str
    action: str | None
    job_id: int | None
    state: DeliveryState = "pending"
    status_code: int | None = None
    error: str | None = None
    dropped: bool = False
    attempts: int = 0


@dataclass
class _Outgoing:
    record: DeliveryRecord
    body: bytes
    # Manual redeliveries bypass delivery faults: they model an operator pressing "Redeliver".
    manual: bool = False


class WebhookSender:
    def __init__(
        self,
        *,
        secret: str,
        hook_id: int,
        target_id: int,
        on_change: Callable[[], None],
        target_type: Literal["repository", "organization"] = "repository",
    ) -> None:
        self.url: str | None = None
        self.secret = secret
        self.hook_id = hook_id
        self.target_type = target_type
        self.target_id = target_id
        # A reordered delivery is held until the next one is sent, but never longer than this,
        # so a held delivery at the end of a burst still arrives (late, like GitHub's).
        self.max_hold_s = 1.0
        self._on_change = on_change
        self._faults = FaultConfig()
        self._rng = self._faults.webhook_rng()
        self._queue: asyncio.Queue[_Outgoing | None] = asyncio.Queue()
        self._deliveries: dict[str, _Outgoing] = {}
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._posting: set[asyncio.Task[None]] = set()

    def set_faults(self, faults: FaultConfig) -> None:
        self._faults = faults
        self._rng = faults.webhook_rng()

    def records(self) -> list[DeliveryRecord]:
        return [item.record.model_copy() for item in self._deliveries.values()]

    def enqueue(self, event: str, payload: dict[str, Any], *, action: str | None, job_id: int | None) -> str:
        record = DeliveryRecord(delivery_id=str(uuid.uuid4()), event=event, action=action, job_id=job_id)
        # Serialise once so duplicates and redeliveries carry byte-identical bodies and signatures.
        item = _Outgoing(record=record, body=json.dumps(payload, separators=(",", ":")).encode())
        self._deliveries[record.delivery_id] = item
        self._queue.put_nowait(item)
        self._on_change()
        return record.delivery_id

    def redeliver(self, delivery_id: str) -> None:
        item = self._deliveries.get(delivery_id)
        if item is None:
            raise KeyError(delivery_id)
        self._queue.put_nowait(_Outgoing(record=item.record, body=item.body, manual=True))

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S)
        self._task = asyncio.create_task(self._run(), name="sim-webhook-sender")

    async def stop(self, drain_timeout: float = 2.0) -> None:
        if self._task is not None:
            self._queue.put_nowait(None)
            try:
                await asyncio.wait_for(self._task, drain_timeout)
            except TimeoutError:
                pass  # wait_for already cancelled the sender; undelivered items stay "pending".
            self._task = None
        if self._posting:
            _, late = await asyncio.wait(self._posting, timeout=drain_timeout)
            for task in late:
                task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        held: _Outgoing | None = None
        while True:
            if held is None:
                item = await self._queue.get()
            else:
                try:
                    item = await asyncio.wait_for(self._queue.get(), self.max_hold_s)
                except TimeoutError:
                    await self._deliver(held)
                    held = None
                    continue
            if item is None:
                if held is not None:
                    await self._deliver(held)
                return
            if held is None and not item.manual and self._rng.random() < self._faults.webhook_reorder_rate:
                held = item
                continue
            await self._deliver(item)
            if held is not None:
                await self._deliver(held)
                held = None

    async def _deliver(self, item: _Outgoing) -> None:
        """Decide the delivery's faults here, in queue order (so a seed replays the same faults),
        then POST it in the background: GitHub sends deliveries independently, not one by one."""
        record = item.record
        only = self._faults.webhook_drop_actions
        droppable = not only or record.action in only
        if not item.manual and droppable and self._rng.random() < self._faults.webhook_drop_rate:
            record.dropped = True
            record.state = "dropped"
            record.error = "dropped by fault injection"
            self._on_change()
            return
        copies = 2 if not item.manual and self._rng.random() < self._faults.webhook_duplicate_rate else 1
        await self._in_flight.acquire()
        task = asyncio.create_task(self._post_copies(item, copies))
        self._posting.add(task)
        task.add_done_callback(self._posting.discard)

    async def _post_copies(self, item: _Outgoing, copies: int) -> None:
        try:
            for copy in range(copies):
                await self._post(item, last=copy == copies - 1)
        finally:
            self._in_flight.release()

    async def _post(self, item: _Outgoing, *, last: bool = True) -> None:
        record = item.record
        record.attempts += 1
        url = self.url
        if url is None or self._client is None:
            record.state = "undelivered"
            record.error = "no webhook_url configured"
            self._on_change()
            return
        headers = {
            "X-GitHub-Event": record.event,
            "X-GitHub-Delivery": record.delivery_id,
            "X-GitHub-Hook-ID": str(self.hook_id),
            "X-GitHub-Hook-Installation-Target-Type": self.target_type,
            "X-GitHub-Hook-Installation-Target-ID": str(self.target_id),
            "X-Hub-Signature-256": signature_256(self.secret.encode(), item.body),
            "User-Agent": "GitHub-Hookshot/sim",
            "Content-Type": "application/json",
        }
        try:
            response = await self._client.post(url, content=item.body, headers=headers)
        except httpx.HTTPError as exc:
            record.status_code = None
            record.state = "failed"
            record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            record.status_code = response.status_code
            ok = response.is_success
            record.state = "delivered" if ok else "failed"
            record.error = None if ok else f"receiver answered {response.status_code}"
        if not last:
            # A duplicate is still to come; "pending" keeps waiters from seeing a settled record.
            record.state = "pending"
        self._on_change()
