"""systemd's notify protocol in plain Python, plus a heartbeat that gates the watchdog.

`Notifier` sends `READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1` as datagrams to the
`AF_UNIX` socket named by `$NOTIFY_SOCKET` (a leading `@` is the abstract namespace). Without
`NOTIFY_SOCKET` (not under systemd) every call is a no-op. A send error is raised, not
swallowed, so a test with a fake socket sees it; the daemon may catch `OSError` if it prefers.

`Heartbeat` is the main loop's liveness stamp: the loop calls `beat()` every iteration
(including idle poll timeouts), and `WatchdogPinger` sends `WATCHDOG=1` only while that stamp is
fresh, so a hung inference call stops the pings and systemd restarts the service, while a
silent scanner (the loop still cycling) keeps them going (R-SYS-2, R-NEW-13).

`JournaldHandler` speaks journald's native protocol so log records keep structured fields
(`MESSAGE_ID`, `EVENT`, `PRIORITY`); the root CLI uses it when `$JOURNAL_STREAM` says stderr is
the journal, and plain one-line stderr otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


class Notifier:
    """Sends sd_notify messages; a no-op when `NOTIFY_SOCKET` is not set."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _socket_address(env.get(NOTIFY_SOCKET_ENV, ""))
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.watchdog_interval_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of `KEY=value` lines; return False when not under systemd."""
        if self._address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            # STATUS is single-line by protocol; a newline would start a new assignment.
            lines.append(f"{key}={' '.join(text.splitlines())}")
        message = "\n".join(lines)
        with self._lock:  # the pinger thread and the main thread share one socket
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode("utf-8"), self._address)
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (after load, warm-up, source open and bind)."""
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        """Set the one-line status shown by `systemctl status`."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Ping the watchdog; only call while the main loop is demonstrably alive."""
        return self.notify(WATCHDOG=1)

    def watchdog_trigger(self) -> bool:
        """Ask systemd to act as if the watchdog expired (policy-driven restart)."""
        return self.notify(WATCHDOG="trigger")

    def reloading(self) -> bool:
        """Announce a reload (SIGHUP); send `ready()` when it is done."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str | None = None) -> bool:
        """Announce a clean shutdown has begun."""
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time during a slow step (engine load, first CUDA init)."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def errno(self, code: int, status: str | None = None) -> bool:
        """Report a fatal errno-style code (and status) before exiting."""
        return self.notify(ERRNO=code, **({"STATUS": status} if status else {}))

    def close(self) -> None:
        """Close the datagram socket (re-opened on the next send)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Heartbeat:
    """The main loop's liveness stamp (monotonic); `beat()` is cheap enough to call every loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        """Record that the main loop completed an iteration (with or without a frame)."""
        self._last = self._clock()

    @property
    def age_s(self) -> float:
        """Seconds since the last beat."""
        return self._clock() - self._last

    def fresh(self, max_age_s: float) -> bool:
        """True when the last beat is younger than `max_age_s`."""
        return self.age_s < max_age_s


class WatchdogPinger:
    """Sends `WATCHDOG=1` every `interval_s` while the heartbeat is fresh; never ungated.

    Default interval is half of `WatchdogSec` (`WATCHDOG_USEC/2`); the heartbeat must be younger
    than `max_age_s` (default: the watchdog interval itself), so when the loop hangs the pings
    stop at most `max_age_s` later and systemd fires `WatchdogSec` after the last one.
    """

    def __init__(
        self,
        notifier: Notifier,
        heartbeat: Heartbeat,
        max_age_s: float | None = None,
        interval_s: float | None = None,
        on_ping: Callable[[], object] | None = None,
    ) -> None:
        wd = notifier.watchdog_interval_s
        self.notifier = notifier
        self.heartbeat = heartbeat
        self.interval_s = interval_s if interval_s is not None else (wd / 2 if wd else 0.0)
        # Never trust a heartbeat older than the watchdog period itself, whatever was configured.
        limits = [x for x in (max_age_s, wd) if x]
        self.max_age_s = min(limits) if limits else 2 * self.interval_s
        self.pings = 0
        self.on_ping = on_ping  # e.g. DaemonMetrics.watchdog_pings.inc
        self.skipped = 0  # intervals where the heartbeat was stale: the loop is hung
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """True when there is a watchdog to ping (systemd set WATCHDOG_USEC, or an interval was given)."""
        return self.notifier.enabled and self.interval_s > 0

    def tick(self) -> bool:
        """Ping once if the heartbeat is fresh; return whether a ping was sent."""
        if not self.heartbeat.fresh(self.max_age_s):
            self.skipped += 1
            return False
        self.notifier.watchdog()
        self.pings += 1
        if self.on_ping is not None:
            self.on_ping()
        return True

    def start(self) -> WatchdogPinger:
        """Start the pinger thread (a no-op when there is no watchdog)."""
        if self.active and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="thzedge-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the pinger thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1.0)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            # systemd gone (shutdown) or the socket vanished: missing pings is the right signal.
            with contextlib.suppress(OSError):
                self.tick()

    def __enter__(self) -> WatchdogPinger:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of '@'.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:// and other forms are not used on the target systemd versions


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec = env.get(WATCHDOG_USEC_ENV)
    if not usec:
        return None
    pid = env.get(WATCHDOG_PID_ENV)
    # WATCHDOG_PID names the process meant to ping; a child that inherited the env must not.
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


# ---------------------------------------------------------------------------------------------
# journald: structured log records over the native protocol, when stderr goes to the journal

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
# Extra record attributes lifted into journal fields (e.g. StateTracker's MESSAGE_ID / EVENT).
_JOURNAL_FIELDS = ("MESSAGE_ID", "EVENT", "SOURCE", "SEQ")


def stderr_is_journal(env: Mapping[str, str] | None = None) -> bool:
    """True when systemd connected our stderr to the journal (`$JOURNAL_STREAM` = its dev:inode)."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


class JournaldHandler(logging.Handler):
    """Sends each record to journald with MESSAGE, PRIORITY, SYSLOG_IDENTIFIER and event fields.

    Falls back to stderr for a record the journal socket refuses, so nothing is lost.
    """

    def __init__(self, identifier: str = "thzedge", socket_path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.socket_path = socket_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                "MESSAGE": self.format(record),
                "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
                "SYSLOG_IDENTIFIER": self.identifier,
                "LOGGER": record.name,
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName,
            }
            for key in _JOURNAL_FIELDS:
                value = getattr(record, key, None)
                if value is not None:
                    fields[key] = str(value)
            self._sock.sendto(_journal_datagram(fields), self.socket_path)
        except Exception:
            # The journal is gone or the record too big for one datagram: say it on stderr instead.
            with contextlib.suppress(Exception):
                sys.stderr.write(self.format(record) + "\n")

    def close(self) -> None:
        self._sock.close()
        super().close()


def _journal_datagram(fields: Mapping[str, str]) -> bytes:
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            # Binary-safe form for multi-line values: KEY\n<64-bit LE length><value>\n
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)
