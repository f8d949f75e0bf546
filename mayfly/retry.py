"""How long to wait before trying a failed GitHub call again.

Temporal's own retry backoff has no jitter, so a burst of jobs that failed together would
retry together and meet the same 502 burst again. GitHub activities therefore compute the
delay themselves (exponential backoff with full jitter, or what GitHub asked for) and hand it
to Temporal as `next_retry_delay`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    base_s: float = 1.0
    cap_s: float = 30.0

    def ceiling(self, attempt: int) -> float:
        """The largest delay allowed after the `attempt`-th failure (1-based)."""
        exponent: int = max(0, attempt - 1)
        return float(min(self.cap_s, self.base_s * 2.0**exponent))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform between 0 and the exponential ceiling."""
        return (rng or random).uniform(0, self.ceiling(attempt))


# Never wait longer than this on GitHub's word alone; a reset an hour away should surface as an
# error in the UI rather than a silent stall.
MAX_SERVER_REQUESTED_WAIT_S = 15 * 60


def retry_delay(
    attempt: int, retry_after_s: float | None, backoff: Backoff, rng: random.Random | None = None
) -> float:
    """GitHub's Retry-After (or rate-limit reset) wins; a little jitter spreads the herd after it."""
    if retry_after_s is not None:
        return min(MAX_SERVER_REQUESTED_WAIT_S, retry_after_s) + (rng or random).uniform(0, backoff.base_s)
    return backoff.delay(attempt, rng)
