"""The Mayfly worker: runs the workflows and activities on its task queues.

Run it as `python worker.py --config mayfly.toml` or `mayfly worker --config mayfly.toml`;
the wiring lives in `mayfly.app.wiring`, so the library never imports this script.
"""

from __future__ import annotations

from mayfly.app.wiring import main
from mayfly.process import exit_now

if __name__ == "__main__":
    exit_now(main())
