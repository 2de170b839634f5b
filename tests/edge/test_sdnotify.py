"""sd_notify over a real unix datagram socket, and the heartbeat-gated watchdog (R-SYS-1/2)."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import pytest

from edge.sdnotify import Heartbeat, Notifier, WatchdogPinger


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield str(path), sock
    sock.close()


def recv_all(sock: socket.socket, timeout: float = 0.2) -> list[str]:
    out = []
    sock.settimeout(timeout)
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            return out


def test_noop_without_notify_socket():
    n = Notifier(env={})
    assert not n.enabled
    assert n.ready() is False and n.status("x") is False and n.watchdog() is False
    assert n.watchdog_interval_s is None


def test_messages_arrive_in_order(notify_socket):
    path, sock = notify_socket
    with Notifier(env={"NOTIFY_SOCKET": path}) as n:
        assert n.enabled
        n.status("loading model")
        n.status("warming up\nengine")  # a newline must not start a new assignment
        n.ready()
        n.watchdog()
        n.stopping()
    got = recv_all(sock)
    assert got == ["STATUS=loading model", "STATUS=warming up engine", "READY=1", "WATCHDOG=1", "STOPPING=1"]


def test_abstract_namespace_socket():
    name = f"thzedge-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    try:
        with Notifier(env={"NOTIFY_SOCKET": "@" + name}) as n:
            n.ready(status="streaming")
        sock.settimeout(2)
        assert sock.recv(4096).decode() == "READY=1\nSTATUS=streaming"
    finally:
        sock.close()


def test_send_error_is_raised_not_swallowed(tmp_path):
    n = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    with pytest.raises(OSError):
        n.ready()
    n.close()


def test_watchdog_interval_from_env():
    n = Notifier(env={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval_s == 30.0
    p = WatchdogPinger(n, Heartbeat())
    assert p.interval_s == 15.0  # WATCHDOG_USEC / 2
    assert p.max_age_s == 30.0
    assert WatchdogPinger(n, Heartbeat(), max_age_s=10).max_age_s == 10
    # Another process's watchdog (WATCHDOG_PID) is not ours to ping.
    other = Notifier(
        env={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    )
    assert other.watchdog_interval_s is None


def test_heartbeat_gates_pings():
    now = [100.0]
    hb = Heartbeat(clock=lambda: now[0])
    n = Notifier(env={})
    counted = []
    p = WatchdogPinger(n, hb, max_age_s=5.0, interval_s=1.0, on_ping=lambda: counted.append(1))
    assert p.tick()  # fresh
    now[0] += 4.9
    assert p.tick()
    now[0] += 0.2  # 5.1 s without a beat: the loop is hung
    assert not p.tick()
    assert (p.pings, p.skipped, len(counted)) == (2, 1, 2)
    hb.beat()
    assert p.tick()


def test_pinger_stops_when_loop_hangs_and_continues_while_idle(notify_socket):
    """A loop that keeps beating (idle source) keeps the pings; a hung loop stops them."""
    path, sock = notify_socket
    n = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})  # WatchdogSec=0.2 s
    hb = Heartbeat()
    hang = threading.Event()
    stop = threading.Event()

    def main_loop():
        while not stop.is_set():
            if hang.is_set():
                time.sleep(0.01)  # a blocked backend call: no beats
                continue
            hb.beat()  # idle poll timeout still beats
            time.sleep(0.01)

    loop = threading.Thread(target=main_loop)
    loop.start()
    with WatchdogPinger(n, hb) as p:
        assert p.interval_s == pytest.approx(0.1)
        time.sleep(0.6)
        idle = recv_all(sock, 0.05)
        assert idle.count("WATCHDOG=1") >= 3
        hang.set()
        time.sleep(0.25)  # within WatchdogSec the pings must have stopped
        recv_all(sock, 0.05)
        time.sleep(0.5)
        assert recv_all(sock, 0.05) == []
        assert p.skipped >= 3
    stop.set()
    loop.join()
    n.close()


# --- journald -------------------------------------------------------------------------------


def parse_journal(datagram: bytes) -> dict[str, str]:
    import struct

    fields, i = {}, 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            fields[k.decode()] = v.decode()
            i = nl + 1
        else:  # binary-safe form
            (n,) = struct.unpack("<Q", datagram[nl + 1 : nl + 9])
            fields[line.decode()] = datagram[nl + 9 : nl + 9 + n].decode()
            i = nl + 9 + n + 1
    return fields


def test_journald_handler_sends_structured_fields(tmp_path):
    import logging

    from edge.observability import StateTracker, message_id
    from edge.sdnotify import JournaldHandler

    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(tmp_path / "journal.sock"))
    rx.settimeout(2)
    handler = JournaldHandler(socket_path=str(tmp_path / "journal.sock"))
    logger = logging.getLogger("thzedge.test-journal")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        StateTracker(logger=logger).set("stalled", "source silent 12 s", level=logging.WARNING)
        fields = parse_journal(rx.recv(65536))
        assert fields["MESSAGE_ID"] == message_id("state.stalled")
        assert fields["EVENT"] == "state.stalled"
        assert fields["PRIORITY"] == "4"
        assert fields["SYSLOG_IDENTIFIER"] == "thzedge"
        assert "source silent 12 s" in fields["MESSAGE"]
        logger.error("two\nlines")
        assert parse_journal(rx.recv(65536))["MESSAGE"] == "two\nlines"
    finally:
        logger.removeHandler(handler)
        handler.close()
        rx.close()


def test_journald_handler_falls_back_to_stderr(tmp_path, capsys):
    import logging

    from edge.sdnotify import JournaldHandler

    handler = JournaldHandler(socket_path=str(tmp_path / "no-journal.sock"))
    record = logging.LogRecord("thzedge", logging.INFO, __file__, 1, "kept %s", ("anyway",), None)
    handler.emit(record)
    handler.close()
    assert "kept anyway" in capsys.readouterr().err


def test_stderr_is_journal_only_when_journal_stream_matches(tmp_path):
    import subprocess
    import sys

    code = "from edge.sdnotify import stderr_is_journal; print(stderr_is_journal())"
    err_file = tmp_path / "stderr"
    with open(err_file, "w") as err:
        st = os.fstat(err.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        match = subprocess.run(
            [sys.executable, "-c", code],
            stderr=err,
            capture_output=False,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "JOURNAL_STREAM": "1:2"},
    )
    assert match.stdout.strip() == "True"
    assert other.stdout.strip() == "False"
