"""Prometheus metrics: the Temporal SDK's own, plus Mayfly's per-pool figures.

Workflow metrics go through `workflow.metric_meter()`, which is replay-safe, and activity
metrics through `activity.metric_meter()`; both land on the worker's Prometheus endpoint.
"""

from __future__ import annotations

from temporalio.common import MetricMeter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

SLOTS_HELD = "mayfly_slots_held"
SLOT_WAITERS = "mayfly_slot_waiters"
SLOT_CAPACITY = "mayfly_slot_capacity"
SLOT_WAIT_SECONDS = "mayfly_slot_wait_seconds"
SLOTS_RECLAIMED = "mayfly_slots_reclaimed"
JOB_PHASES = "mayfly_job_phase_transitions"
REGISTRATION_FAILURES = "mayfly_registration_failures"
WEBHOOK_TO_SPAWN_SECONDS = "mayfly_webhook_to_spawn_seconds"
GITHUB_RATE_LIMIT_REMAINING = "mayfly_github_ratelimit_remaining"

_SECONDS_BUCKETS = [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]


def prometheus_runtime(bind_address: str) -> Runtime:
    return Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(
                bind_address=bind_address,
                counters_total_suffix=True,
                durations_as_seconds=True,
                histogram_bucket_overrides={
                    SLOT_WAIT_SECONDS: _SECONDS_BUCKETS,
                    WEBHOOK_TO_SPAWN_SECONDS: _SECONDS_BUCKETS,
                },
            ),
            global_tags={"service": "mayfly"},
        )
    )


def record_rate_limit(meter: MetricMeter, remaining: int | None) -> None:
    if remaining is not None:
        meter.create_gauge(GITHUB_RATE_LIMIT_REMAINING, "GitHub API calls left in the current window").set(
            remaining
        )
