"""Process hardening for the worker, which holds the GitHub credentials and the sealing key."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("mayfly.hardening")

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def make_non_dumpable() -> bool:
    """Mark this process non-dumpable, so /proc/<pid>/environ, mem and maps become root's and
    ptrace is refused: a runner under the same uid can no longer read the worker's secrets.

    Children get the flag reset when they exec, so runners are unaffected. Returns whether the
    flag is set (False off Linux).
    """
    if not sys.platform.startswith("linux"):
        log.warning("not on Linux: the worker cannot mark itself non-dumpable")
        return False
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: errno %d", ctypes.get_errno())
        return False
    return is_dumpable() is False


def is_dumpable() -> bool | None:
    if not sys.platform.startswith("linux"):
        return None
    return bool(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
