"""Serve an ASGI app with uvicorn inside the current event loop (the starter, health endpoints,
the dev stack and tests)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ServerLimits:
    """What an endpoint exposed to the network needs: uvicorn answers 503 past max_concurrency
    connections and tasks, refuses request heads over max_header_bytes, closes a connection
    whose first request head has not arrived within head_timeout_s (a slow-header client
    would otherwise hold its connection for ever) and an idle keep-alive one after keep_alive_s.
    The body's own deadline is the app's business: it knows what to answer."""

    max_concurrency: int | None = None
    head_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_header_bytes: int = 16 * 1024


class _HeadDeadlineH11Protocol(H11Protocol):
    head_timeout_s = 10.0
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_overdue)

    def _head_overdue(self) -> None:
        # No request cycle yet: not even one complete request head in head_timeout_s.
        if self.cycle is None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)


@dataclass
class RunningServer:
    server: uvicorn.Server
    task: asyncio.Task[None]
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


async def serve(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 0, limits: ServerLimits | None = None
) -> RunningServer:
    limits = limits or ServerLimits()
    # Binding the socket ourselves makes port 0 usable: we know the port before uvicorn runs.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    actual_port = sock.getsockname()[1]
    protocol = type(
        "HeadDeadlineH11Protocol", (_HeadDeadlineH11Protocol,), {"head_timeout_s": limits.head_timeout_s}
    )
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=10,
        http=protocol,
        limit_concurrency=limits.max_concurrency,
        timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            raise RuntimeError("server exited during startup")
        await asyncio.sleep(0.01)
    return RunningServer(server=server, task=task, host=host, port=actual_port)
