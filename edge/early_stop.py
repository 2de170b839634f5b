"""A SIGTERM/SIGINT before the daemon's own handlers are in place still ends thzedge cleanly.

Installed first thing by the entry points (before the heavy imports): until a command installs
its own handlers (the daemon does, in `Daemon.run`), a stop request raises SystemExit(0), so
`finally` blocks run (a recorder's `.part` is finished, sockets close) and `systemctl stop`
during start-up is a clean stop instead of a death by signal. Imports nothing heavy.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

__all__ = ["install"]


def _stop(signum: int, _frame: FrameType | None) -> None:
    # Runs in the main thread between bytecodes; raising here unwinds whatever start-up is doing.
    sys.stderr.write(f"thzedge: stopped by {signal.Signals(signum).name} during start-up\n")
    raise SystemExit(0)


def install() -> None:
    """Make SIGTERM end the process with exit 0 until a command installs its own handler."""
    signal.signal(signal.SIGTERM, _stop)
