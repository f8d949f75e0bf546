"""Wraps the simulated runner and records, independently of Mayfly, how many run at once.

Each runner process takes one of `cap` exclusive flock()s before it becomes the runner (the
lock survives exec). The kernel drops the lock when the process dies, however it dies. A
process that finds every lock taken is proof that more than `cap` runners were alive at once.
"""

from __future__ import annotations

import fcntl
import os
import random
import sys
import time
from pathlib import Path


def main() -> None:
    ledger = Path(os.environ["MAYFLY_PROBE_DIR"])
    cap = int(os.environ["MAYFLY_PROBE_CAP"])
    ledger.mkdir(parents=True, exist_ok=True)
    taken: int | None = None
    for index in range(cap):
        fd = os.open(ledger / f"slot-{index}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.set_inheritable(fd, True)
        taken = index
        break
    with open(ledger / "starts.log", "a") as log:
        log.write(f"{time.time():.3f} {os.getpid()} {os.environ.get('MAYFLY_CONTAINER_NAME', '?')} {taken}\n")
    if taken is None:
        with open(ledger / "violations.log", "a") as log:
            log.write(f"{time.time():.3f} {os.getpid()} {os.environ.get('MAYFLY_CONTAINER_NAME', '?')}\n")
    hang_rate = float(os.environ.get("MAYFLY_PROBE_HANG_RATE", "0"))
    if random.random() < hang_rate:
        with open(ledger / "hangs.log", "a") as log:
            log.write(f"{os.environ.get('MAYFLY_CONTAINER_NAME', '?')}\n")
        # A runner that never connects (network trouble, a broken image): it only sleeps.
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(3600)"])
    os.execv(sys.executable, [sys.executable, "-m", "simulator.runner"])


if __name__ == "__main__":
    main()
