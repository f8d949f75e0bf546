"""CPU accounting for benchmarks on a 2-core machine: where did the time go?"""

from __future__ import annotations

import os
import resource
from pathlib import Path


def dev_server_cpu_s() -> float:
    """CPU seconds used so far by the dev server, found as our child process named `temporal`."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().split(" (", 1)[1].rsplit(")", 1)
        except (OSError, ValueError):
            continue
        fields = rest.split()
        if comm.startswith("temporal") and int(fields[1]) == os.getpid():
            total += sum(int(fields[i]) for i in (11, 12)) / os.sysconf("SC_CLK_TCK")
    return total


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_s() -> float:
    """Reaped children only (e.g. a load generator that has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
