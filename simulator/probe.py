"""An independent check of the cap: runner processes count themselves with flock()s.

Reading what simulator/probe_runner.py recorded; used by the tests and the benchmarks."""

from __future__ import annotations

import fcntl
import os
import sys
from dataclasses import dataclass
from pathlib import Path

PROBE_SCRIPT = Path(__file__).with_name("probe_runner.py")


@dataclass
class ConcurrencyProbe:
    ledger: Path
    cap: int

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(PROBE_SCRIPT)]

    @property
    def env(self) -> dict[str, str]:
        return {"MAYFLY_PROBE_DIR": str(self.ledger), "MAYFLY_PROBE_CAP": str(self.cap)}

    def starts(self) -> list[str]:
        path = self.ledger / "starts.log"
        return path.read_text().splitlines() if path.exists() else []

    def hangs(self) -> list[str]:
        path = self.ledger / "hangs.log"
        return path.read_text().splitlines() if path.exists() else []

    def violations(self) -> list[str]:
        path = self.ledger / "violations.log"
        return path.read_text().splitlines() if path.exists() else []

    def held_now(self) -> int:
        """How many probe locks some live process still holds."""
        held = 0
        for index in range(self.cap):
            path = self.ledger / f"slot-{index}.lock"
            if not path.exists():
                continue
            fd = os.open(path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                held += 1
            finally:
                os.close(fd)
        return held
