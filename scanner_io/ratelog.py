"""Log lines that a flood cannot multiply: at most one per key per interval, with a count.

A scanner (or an attacker) sending a million malformed messages a minute must not write a
million journal lines: the counters (metrics, summaries) stay exact, the log says "and N more".
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["RateLimitedLog"]

DEFAULT_INTERVAL_S = 1.0
MAX_KEYS = 256  # keys are reason labels (a fixed vocabulary); the bound is a guard, not a budget


class RateLimitedLog:
    """Emit a warning per key at most every `interval_s`; later lines count the ones held back."""

    def __init__(self, logger: logging.Logger, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._log = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """Log `msg % args` unless `key` logged within the interval; True if it was logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            if key not in self._last and len(self._last) >= MAX_KEYS:
                self._last.clear()  # a guard only: forgetting is harmless, it just logs sooner
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held and last is not None:
            self._log.warning(msg + " (and %d more like it in the last %.1f s)", *args, held, now - last)
        else:
            self._log.warning(msg, *args)
        return True
