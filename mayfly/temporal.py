"""Connecting to Temporal with the one data converter every Mayfly process must share."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.runtime import Runtime

from mayfly.config import TemporalSettings

DATA_CONVERTER: DataConverter = pydantic_data_converter


async def connect(settings: TemporalSettings, runtime: Runtime | None = None) -> Client:
    return await Client.connect(
        settings.address, namespace=settings.namespace, data_converter=DATA_CONVERTER, runtime=runtime
    )
