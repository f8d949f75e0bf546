"""Where a job's slot-seconds go: a per-phase timeline read from RunnerJob histories.

Each interval is measured between two history events of the job's own workflow, so the figures
include every hop (task queue pickup, workflow task, signal delivery) that a phase really costs.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from mayfly.models import job_workflow_id

# (name, from-marker, to-marker); markers are found in the history by `_markers`.
PHASES = [
    ("mint (often before the grant)", "mint_scheduled", "mint_completed"),
    ("grant -> spawn scheduled", "granted", "spawn_scheduled"),
    ("spawn", "spawn_scheduled", "spawn_completed"),
    ("spawn -> running (online)", "spawn_completed", "online"),
    ("running -> exit seen", "online", "exit_completed"),
    ("exit seen -> release sent", "exit_completed", "release"),
    ("slot held (grant -> release)", "granted", "release"),
]


@dataclass
class Timeline:
    samples: dict[str, list[float]] = field(default_factory=dict)
    grants: list[datetime] = field(default_factory=list)
    releases: list[datetime] = field(default_factory=list)
    started: list[datetime] = field(default_factory=list)
    closed: list[datetime] = field(default_factory=list)

    def add(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(seconds)

    def idle_slot_gaps(self, cap: int) -> list[float]:
        """How long a slot stood free between one job's release and the next job's grant.

        With the pool full and grants in FIFO order, the k-th release frees the slot that the
        (cap + k)-th grant takes, so pairing the sorted lists measures the whole hop: the
        release signal, the semaphore's task, the grant signal and the waiter's task."""
        grants, releases = sorted(self.grants), sorted(self.releases)
        return [
            (grant - release).total_seconds() for release, grant in zip(releases, grants[cap:], strict=False)
        ]

    def ramp_and_tail(self, cap: int) -> list[str]:
        """The makespan's ends, where slots stand idle: from the first workflow's start until
        the pool is full, and from the last release until the last workflow has closed."""
        grants = sorted(self.grants)
        if not grants or not self.started or not self.closed or not self.releases:
            return []
        full = grants[min(cap, len(grants)) - 1]
        return [
            f"first start -> pool full ({min(cap, len(grants))} grants): "
            f"{(full - min(self.started)).total_seconds():.2f}s "
            f"(first grant after {(grants[0] - min(self.started)).total_seconds():.2f}s)",
            "last release -> last workflow closed: "
            f"{(max(self.closed) - max(self.releases)).total_seconds():.2f}s",
        ]

    def report(self, cap: int | None = None) -> str:
        lines = [f"{'phase':<32} {'mean':>7} {'p50':>7} {'p95':>7}  n"]
        if cap is not None:
            self.samples["release -> next grant (idle)"] = self.idle_slot_gaps(cap)
        for name in [name for name, _, _ in PHASES] + ["release -> next grant (idle)"]:
            values = sorted(self.samples.get(name, []))
            if not values:
                continue
            p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
            lines.append(
                f"{name:<32} {statistics.fmean(values):>6.2f}s {statistics.median(values):>6.2f}s "
                f"{p95:>6.2f}s  {len(values)}"
            )
        if cap is not None:
            lines += self.ramp_and_tail(cap)
        return "\n".join(lines)


def is_slot_release(event: HistoryEvent) -> bool:
    """A holder gives its slot back by a local activity, recorded as a marker."""
    if event.event_type != EventType.EVENT_TYPE_MARKER_RECORDED:
        return False
    details = event.marker_recorded_event_attributes.details.get("data")
    return details is not None and any(b'"activity_type":"slots.release"' in p.data for p in details.payloads)


def _time(event: HistoryEvent) -> datetime:
    return event.event_time.ToDatetime()


def _markers(events: Iterable[HistoryEvent]) -> dict[str, datetime]:
    scheduled: dict[int, str] = {}
    found: dict[str, datetime] = {}

    def first(name: str, event: HistoryEvent) -> None:
        found.setdefault(name, _time(event))

    for event in events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            name = event.workflow_execution_signaled_event_attributes.signal_name
            if name == "slot_granted":
                first("granted", event)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            activity = event.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[event.event_id] = activity
            if activity == "github.mint_runner":
                first("mint_scheduled", event)
            elif activity == "containers.spawn":
                first("spawn_scheduled", event)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            activity = scheduled.get(event.activity_task_completed_event_attributes.scheduled_event_id, "")
            marker = {
                "github.mint_runner": "mint_completed",
                "containers.spawn": "spawn_completed",
                "containers.wait_exit": "exit_completed",
                "containers.terminate": "terminate_completed",
            }.get(activity)
            if marker:
                first(marker, event)
        elif kind == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            fields = event.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
            state = fields.get("MayflyState")
            if state is not None and b"running" in state.data:
                first("online", event)
        elif kind == EventType.EVENT_TYPE_MARKER_RECORDED:
            # The slot goes back by a local activity, recorded as a marker.
            details = event.marker_recorded_event_attributes.details.get("data")
            if details is not None and any(
                b'"activity_type":"slots.release"' in p.data for p in details.payloads
            ):
                first("release", event)
    return found


async def job_timeline(client: Client, job_ids: Iterable[int]) -> Timeline:
    timeline = Timeline()
    for job_id in job_ids:
        history = await client.get_workflow_handle(job_workflow_id(job_id)).fetch_history()
        marks = _markers(history.events)
        if history.events:
            timeline.started.append(_time(history.events[0]))
            timeline.closed.append(_time(history.events[-1]))
        if "granted" in marks and "release" in marks:
            timeline.grants.append(marks["granted"])
            timeline.releases.append(marks["release"])
        for name, start, end in PHASES:
            if start in marks and end in marks:
                timeline.add(name, (marks[end] - marks[start]).total_seconds())
    return timeline
