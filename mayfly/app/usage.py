"""`mayfly usage --since 24h`: slot- and runner-seconds of closed job workflows, from visibility.

Each job workflow records its own figures as search attributes when it closes, so totals need
one paginated visibility listing, not one call per workflow.
"""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from temporalio.client import Client

from mayfly import search_attributes
from mayfly.models import RUNNER_JOB_WORKFLOW

_SPAN = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_span(text: str) -> timedelta:
    """`90s`, `30m`, `24h` or `7d`."""
    match = _SPAN.match(text.strip())
    if match is None:
        raise ValueError(f"--since {text!r}: expected a number and one of s, m, h, d (e.g. 24h)")
    return timedelta(seconds=float(match[1]) * _UNIT_S[match[2]])


class UsageTotals:
    def __init__(self) -> None:
        self.jobs = 0
        self.slot_s = 0.0
        self.runner_s = 0.0


async def usage(client: Client, since: timedelta, by: str) -> dict[str, UsageTotals]:
    """Totals per pool, repository or scope of the job workflows closed in the last `since`."""
    key = {"pool": search_attributes.POOL, "scope": search_attributes.SCOPE}.get(
        by, search_attributes.REPOSITORY
    )
    cutoff = (datetime.now(UTC) - since).strftime("%Y-%m-%dT%H:%M:%SZ")
    totals: dict[str, UsageTotals] = defaultdict(UsageTotals)
    query = (
        f"WorkflowType = '{RUNNER_JOB_WORKFLOW}' AND ExecutionStatus != 'Running' AND CloseTime > '{cutoff}'"
    )
    async for run in client.list_workflows(query):
        attributes = run.typed_search_attributes
        group = attributes.get(key) or "?"
        entry = totals[str(group)]
        entry.jobs += 1
        entry.slot_s += attributes.get(search_attributes.SLOT_SECONDS) or 0.0
        entry.runner_s += attributes.get(search_attributes.RUNNER_SECONDS) or 0.0
    return dict(totals)


def usage_lines(totals: dict[str, UsageTotals], by: str) -> list[str]:
    lines = [f"{by:<30} {'jobs':>6} {'slot-hours':>11} {'runner-hours':>13}"]
    for group, entry in sorted(totals.items()):
        lines.append(
            f"{group:<30} {entry.jobs:>6} {entry.slot_s / 3600:>11.3f} {entry.runner_s / 3600:>13.3f}"
        )
    if not totals:
        lines.append("no job workflow closed in that span")
    return lines
