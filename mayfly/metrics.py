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
# Per closed job workflow; their sums are the usage totals, by pool and repository.
JOB_SLOT_SECONDS = "mayfly_job_slot_seconds"
JOB_RUNNER_SECONDS = "mayfly_job_runner_seconds"
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


class SemaphoreMetrics:
    """A pool semaphore's instruments, created once per workflow instance rather than per task."""

    def __init__(self, meter: MetricMeter, pool: str) -> None:
        meter = meter.with_additional_attributes({"pool": pool})
        self.held = meter.create_gauge(SLOTS_HELD, "slots held by job workflows")
        self.waiters = meter.create_gauge(SLOT_WAITERS, "job workflows waiting for a slot")
        self.capacity = meter.create_gauge(SLOT_CAPACITY, "the pool's cap")
        self.wait_seconds = meter.create_histogram_float(
            SLOT_WAIT_SECONDS, "from asking for a slot to being granted one", "s"
        )
        self.reclaimed = meter.create_counter(SLOTS_RECLAIMED, "slots freed from closed holders")


class JobMetrics:
    """A job workflow's instruments, created once per workflow instance."""

    def __init__(self, meter: MetricMeter, pool: str) -> None:
        meter = meter.with_additional_attributes({"pool": pool})
        self.phases = meter.create_counter(JOB_PHASES, "job workflows entering each phase")
        self.registration_failures = meter.create_counter(
            REGISTRATION_FAILURES, "runner attempts that never came online"
        )
        self.webhook_to_spawn = meter.create_histogram_float(
            WEBHOOK_TO_SPAWN_SECONDS, "from the job's workflow start to its container running", "s"
        )
        self.slot_seconds = meter.create_histogram_float(JOB_SLOT_SECONDS, "slot-seconds a job used", "s")
        self.runner_seconds = meter.create_histogram_float(
            JOB_RUNNER_SECONDS, "container-seconds a job's runners lived", "s"
        )

    def record_usage(self, scope: str, repository: str, *, slot_s: float, runner_s: float) -> None:
        # Scopes are configured and repositories are theirs: bounded labels.
        labels = {"scope": scope, "repository": repository}
        self.slot_seconds.record(slot_s, labels)
        self.runner_seconds.record(runner_s, labels)


def record_rate_limit(meter: MetricMeter, remaining: int | None) -> None:
    if remaining is not None:
        meter.create_gauge(GITHUB_RATE_LIMIT_REMAINING, "GitHub API calls left in the current window").set(
            remaining
        )
