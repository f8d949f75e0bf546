"""Serve an ASGI app with uvicorn inside the current event loop (dev stack and tests)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp


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


async def serve(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    # Binding the socket ourselves makes port 0 usable: we know the port before uvicorn runs.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    actual_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            raise RuntimeError("server exited during startup")
        await asyncio.sleep(0.01)
    return RunningServer(server=server, task=task, host=host, port=actual_port)
