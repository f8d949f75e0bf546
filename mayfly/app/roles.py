"""Which part of the worker one `mayfly worker` process runs."""

from __future__ import annotations

import argparse
from enum import StrEnum


class WorkerRole(StrEnum):
    """What one `mayfly worker` process runs. `all` suits most installs. Under a backlog of
    thousands a pool's semaphore replays whole runs (see `workflows.slot_semaphore`); in a process
    of its own that replay does not wait for the job workflows' tasks in the same interpreter, so
    large installs run one `semaphores` process beside their `jobs` workers."""

    ALL = "all"
    JOBS = "jobs"
    SEMAPHORES = "semaphores"


def add_role_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--role",
        choices=[role.value for role in WorkerRole],
        default=WorkerRole.ALL.value,
        help="all (default); or jobs and semaphores, in separate processes, for a backlog of thousands",
    )
