"""Keep a long engine build visibly alive: a terminal line, periodic plain lines, systemd notices.

A TensorRT build on an Orin takes minutes per graph and prints nothing, so an operator cannot
tell it from a hung process (roboflow/inference PR 2703). `BuildProgress.step(graph)` wraps one
graph's build and, until it returns, every `interval_s`:

- on a terminal, redraws one status line in place (`[2/6] decoder_1 fp16  1m30s, total 4m02s`);
- otherwise (a log, a pipe, the journal) writes a plain line with the same facts, so a build
  under `nohup` or a unit shows progress without control characters;
- under systemd (`$NOTIFY_SOCKET`), sends `STATUS=` with that line and `EXTEND_TIMEOUT_USEC` so
  a unit running `thzedge export engine` is not killed by its start timeout mid-build.

Each graph's start and end are always one plain line. The ticker is one daemon thread that only
formats text; it stops when the step ends, whatever the build raised.

`default_workspace_mb` is the builder's workspace cap: on a Jetson the GPU shares the system's
memory, and an uncapped builder asks for more than is free ("Tactic Device request: 800MB
Available: 526MB", ultralytics PR 23945), so the default there is a quarter of the memory
available now, within 256..2048 MB; elsewhere 1024 MB. `--workspace` overrides both.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from edge.sdnotify import Notifier

MEMINFO = Path("/proc/meminfo")
DEFAULT_WORKSPACE_MB = 1024
JETSON_WORKSPACE_RANGE_MB = (256, 2048)


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`: short enough for a status line."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class BuildProgress:
    """Progress of building `total` graphs at one precision; see the module docstring."""

    def __init__(
        self,
        total: int,
        precision: str,
        *,
        stream: TextIO | None = None,
        interval_s: float | None = None,
        notifier: Notifier | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.precision = str(precision)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        # A terminal is redrawn every second; a log gets a line every 30 s (enough to see it is alive).
        self.interval_s = interval_s if interval_s is not None else (1.0 if self.tty else 30.0)
        self.notifier = notifier if notifier is not None else Notifier()
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.lines = 0  # plain lines written (tests and the final summary)

    def status(self, graph: str, step_started: float) -> str:
        """The one-line state: which graph, which precision, how long this graph and the whole build."""
        now = self.clock()
        return (
            f"[{self.done + 1}/{self.total}] building {graph} {self.precision} engine: "
            f"{format_duration(now - step_started)}, total {format_duration(now - self.started)}"
        )

    @contextlib.contextmanager
    def step(self, graph: str) -> Iterator[None]:
        """Report progress while one graph builds; writes its start and end as plain lines."""
        t0 = self.clock()
        self._line(f"[{self.done + 1}/{self.total}] building {graph} {self.precision} engine ...")
        self._notify(self.status(graph, t0))
        stop = threading.Event()
        ticker = threading.Thread(
            target=self._tick, args=(graph, t0, stop), name="engine-build-progress", daemon=True
        )
        ticker.start()
        ok = False
        try:
            yield
            ok = True
        finally:
            stop.set()
            ticker.join(timeout=self.interval_s + 1.0)
            took = format_duration(self.clock() - t0)
            verdict = "built" if ok else "failed"
            self._line(f"[{self.done + 1}/{self.total}] {verdict} {graph} {self.precision} engine in {took}")
            if ok:
                self.done += 1

    def finish(self) -> str:
        """The closing line (also sent as STATUS=)."""
        took = format_duration(self.clock() - self.started)
        text = f"built {self.done}/{self.total} {self.precision} engines in {took}"
        self._notify(text)
        return text

    def _tick(self, graph: str, t0: float, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            text = self.status(graph, t0)
            if self.tty:
                self._redraw(text)
            else:
                self._line(text)
            self._notify(text)

    def _notify(self, text: str) -> None:
        if not self.notifier.enabled:
            return
        with contextlib.suppress(OSError):  # a vanished systemd must not fail the build
            # One datagram; ask for more than one interval: the next may come late under load.
            usec = int(max(3 * self.interval_s, 90.0) * 1_000_000)
            self.notifier.notify(STATUS=text, EXTEND_TIMEOUT_USEC=usec)

    def _redraw(self, text: str) -> None:
        self.stream.write("\r\x1b[2K" + text)
        self.stream.flush()

    def _line(self, text: str) -> None:
        if self.tty:
            text = "\r\x1b[2K" + text
        self.stream.write(text + "\n")
        self.stream.flush()
        self.lines += 1


def available_memory_mb(meminfo: Path | None = None) -> int | None:
    """MemAvailable (else MemTotal) from /proc/meminfo, in MB; None when unreadable."""
    try:
        text = (meminfo or MEMINFO).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for field in ("MemAvailable", "MemTotal"):
        m = re.search(rf"^{field}:\s+(\d+)\s*kB", text, re.M)
        if m:
            return int(m.group(1)) // 1024
    return None


def default_workspace_mb(jetson: bool, meminfo: Path | None = None) -> int:
    """The builder workspace cap when --workspace is not given (see the module docstring)."""
    if not jetson:
        return DEFAULT_WORKSPACE_MB
    avail = available_memory_mb(meminfo)
    lo, hi = JETSON_WORKSPACE_RANGE_MB
    if avail is None:
        return lo
    return max(lo, min(hi, avail // 4))
