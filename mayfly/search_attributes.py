"""Search attributes on every job workflow, so the Temporal UI can answer "why is job X not running?".

They are plaintext and indexed: never put a secret in one.
"""

from __future__ import annotations

from temporalio.client import Client
from temporalio.common import SearchAttributeKey

POOL = SearchAttributeKey.for_keyword("MayflyPool")
REPOSITORY = SearchAttributeKey.for_keyword("MayflyRepository")
SCOPE = SearchAttributeKey.for_keyword("MayflyScope")
JOB_ID = SearchAttributeKey.for_int("MayflyJobId")
RUNNER = SearchAttributeKey.for_keyword("MayflyRunner")
STATE = SearchAttributeKey.for_keyword("MayflyState")
# Set when a job workflow closes: what `mayfly usage` totals.
SLOT_SECONDS = SearchAttributeKey.for_float("MayflySlotSeconds")
RUNNER_SECONDS = SearchAttributeKey.for_float("MayflyRunnerSeconds")

ALL: list[SearchAttributeKey[str] | SearchAttributeKey[int] | SearchAttributeKey[float]] = [
    POOL,
    REPOSITORY,
    SCOPE,
    JOB_ID,
    RUNNER,
    STATE,
    SLOT_SECONDS,
    RUNNER_SECONDS,
]


def dev_server_flags() -> list[str]:
    flags: list[str] = []
    for key in ALL:
        kind = {JOB_ID.name: "Int", SLOT_SECONDS.name: "Double", RUNNER_SECONDS.name: "Double"}.get(
            key.name, "Keyword"
        )
        flags += ["--search-attribute", f"{key.name}={kind}"]
    return flags


async def missing(client: Client, namespace: str) -> list[str]:
    """Names of Mayfly's search attributes the namespace does not define yet."""
    from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest

    response = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    return [key.name for key in ALL if key.name not in response.custom_attributes]


async def register(client: Client, namespace: str) -> list[str]:
    """Define the missing ones (what `mayfly setup` does); returns what it added."""
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest

    names = await missing(client, namespace)
    if names:
        wanted = {
            key.name: IndexedValueType.ValueType(key.indexed_value_type) for key in ALL if key.name in names
        }
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=wanted)
        )
    return names
