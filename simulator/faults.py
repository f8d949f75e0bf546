"""Fault injection knobs for the GitHub simulator.

Every knob defaults to "off" so an unconfigured simulator behaves like a healthy GitHub.
The rates are independent probabilities drawn per request (or per webhook delivery).
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field


class FaultConfig(BaseModel):
    """Probabilities and parameters of the faults the simulator injects."""

    # Reject unknown keys so a typo in a test's fault setup fails loudly instead of silently
    # running a fault-free scenario.
    model_config = ConfigDict(extra="forbid")

    registration_502_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Chance that generate-jitconfig / registration-token answer 502 *without* acting
    (the burst behaviour of actions/runner#4399)."""

    lost_response_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Chance that a successful mutating call (POST/DELETE on runners, JIT, tokens) is
    carried out and then answered with 502 anyway, so the client's retry sees the result
    of the first attempt (e.g. a 409 for a JIT name)."""

    slow_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    slow_seconds: float = Field(default=0.0, ge=0.0)

    rate_limit_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    retry_after_seconds: int = Field(default=1, ge=0)

    webhook_duplicate_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    webhook_reorder_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    webhook_drop_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    webhook_drop_actions: list[str] = Field(default_factory=list)
    """When set, `webhook_drop_rate` applies only to deliveries of these `workflow_job` actions
    (e.g. only `in_progress` and `completed`); others always arrive."""

    jit_error_status: int | None = Field(default=None, ge=400, le=599)
    """generate-jitconfig answers this status without acting (e.g. 403: permission lost)."""

    deregister_error_status: int | None = Field(default=None, ge=400, le=599)
    """DELETE of a runner answers this status without acting (e.g. 401: token revoked)."""

    seed: int | None = None

    def api_rng(self) -> random.Random:
        """RNG for request faults."""
        return random.Random(self.seed)

    def webhook_rng(self) -> random.Random:
        """RNG for delivery faults.

        Kept separate from the API RNG so the webhook fault sequence does not depend on how
        many API requests happened to interleave with it.
        """
        return random.Random(None if self.seed is None else self.seed + 1)
