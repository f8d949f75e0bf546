"""Liveness and readiness over HTTP for the worker: alive while its event loop answers, ready
while Temporal's health check passes."""

from __future__ import annotations

from datetime import timedelta

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from temporalio.client import Client


def health_app(client: Client) -> Starlette:
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> JSONResponse:
        try:
            await client.service_client.check_health(timeout=timedelta(seconds=2))
        except Exception as error:
            return JSONResponse({"status": f"Temporal unavailable: {type(error).__name__}"}, status_code=503)
        return JSONResponse({"status": "ready"})

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz)])
