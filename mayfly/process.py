"""How a Mayfly process stops: on SIGTERM or SIGINT, and without interpreter finalisation."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, for the running loop to wait on and shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def exit_now(code: int) -> None:
    """Exit with `code` without interpreter finalisation, where the Temporal SDK's native runtime
    can abort and replace the exit status (sdk-python#300)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
