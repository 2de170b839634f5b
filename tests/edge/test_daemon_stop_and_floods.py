"""The daemon process under issue 14's smaller failures (10): a stop in start-up, a busy metrics
port, the last results on a clean stop, a flood of malformed messages in the journal, and what
`thzedge_frames_received_total` counts. Real processes, sockets and HTTP.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zmq
from daemon_helpers import (
    Subscriber,
    finish,
    free_port,
    run_until_exit,
    summary_of,
    thzedge_run,
    write_config,
)

from scanner_io.codec import encode_frame
from scanner_io.frame import FrameHeader

pytestmark = pytest.mark.timeout(240)


def _sigterm_caught(pid: int) -> bool:
    """True once the process has a SIGTERM handler (bit 15 of SigCgt in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(int(ln.split()[1], 16) for ln in status.splitlines() if ln.startswith("SigCgt:"))
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def test_sigterm_in_the_first_half_second_is_a_clean_stop(tiny_bundle: Path, tmp_path: Path) -> None:
    pub = f"ipc://{tmp_path}/results.sock"
    cfg = write_config(tmp_path / "thzedge.toml")
    daemon = thzedge_run("sim?fps=30", tiny_bundle, cfg, pub)
    # As soon as the process catches SIGTERM, or at half a second: model loading is still going on.
    end = time.monotonic() + 0.5
    while time.monotonic() < end and not _sigterm_caught(daemon.pid):
        time.sleep(0.005)
    daemon.send_signal(signal.SIGTERM)
    rc, _, err = finish(daemon, timeout=60)
    assert rc == 0, (rc, err[-2000:])
    assert "Traceback" not in err


def test_metrics_port_in_use_is_retryable_exit_69(tiny_bundle: Path, tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(f'[metrics]\nbind = "127.0.0.1:{port}"\n')
    try:
        proc = thzedge_run("sim?frames=5", tiny_bundle, cfg, f"ipc://{tmp_path}/results.sock")
        rc, _, err = finish(proc, timeout=90)
    finally:
        holder.close()
    assert rc == 69, (rc, err[-2000:])
    assert "in use" in err and len([ln for ln in err.splitlines() if ln.startswith("thzedge: error")]) == 1


def published_total(port: int) -> float | None:
    """The daemon's thzedge_results_published_total from its metrics endpoint; None once it is gone."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    return sum(
        float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("thzedge_results_published_total{")
    )


def test_the_last_results_before_a_clean_stop_reach_the_subscriber(tiny_bundle: Path, tmp_path: Path) -> None:
    """A subscriber that reads only once everything was published still gets all of it.

    Results carry reconstructions (16 KiB each) and the subscriber starts reading only when the
    metrics say all were published, so the last of them are still on their way when the daemon
    stops: a close with linger 0 may discard them.
    """
    n = 150
    port = free_port()
    pub = f"ipc://{tmp_path}/results.sock"
    cfg = write_config(
        tmp_path / "thzedge.toml", "[publisher]\nhwm = 1000\n[privacy]\npublish_reconstruction = true\n"
    )
    cfg.write_text(cfg.read_text().replace("enabled = false", f'bind = "127.0.0.1:{port}"'))
    sub = Subscriber(pub)
    daemon = thzedge_run(f"sim?frames={n}", tiny_bundle, cfg, pub)
    try:
        sub.wait_state(proc=daemon)
        while daemon.poll() is None:  # not reading: the results pile up in the daemon
            published = published_total(port)
            if published is None or published >= n:
                break  # all published, or the daemon is stopping
            time.sleep(0.02)
        rc, out, err = run_until_exit(daemon, sub, timeout=120)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        sub.close()
    assert rc == 0, err[-2000:]
    assert summary_of(out)["published"] == n
    # The first results may go out before the subscriber's connection is complete (the daemon
    # does not wait for subscribers); from the first one received on, none may be missing.
    seqs = sorted(h["seq"] for h in sub.results)
    assert seqs and seqs == list(range(seqs[0], n)) and len(seqs) >= n // 2, seqs[:5]
    assert all("reconstruction" in a for a in sub.arrays)
    assert sub.events[-1]["kind"] == "state" and sub.events[-1]["state"] == "stopped"


def _message(seq: int, malformed: bool) -> list[bytes]:
    data = np.full((64, 64), 1000 + seq, dtype=np.uint16)
    header = FrameHeader(
        scanner="junk0", seq=seq, t_capture_ns=time.time_ns(), shape=(64, 64), dtype="uint16"
    )
    parts = [bytes(memoryview(p)) for p in encode_frame(header, data)]
    if malformed:
        parts[2] = parts[2][:-2]  # size_mismatch
    return parts


def test_a_flood_of_malformed_messages_is_counted_exactly_and_logged_sparingly(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    frames, junk = 5, 400
    port = free_port()
    cfg = write_config(tmp_path / "thzedge.toml", calibration="allow_uncalibrated = true\n")
    cfg.write_text(cfg.read_text().replace("enabled = false", f'bind = "127.0.0.1:{port}"'))
    endpoint = f"ipc://{tmp_path}/scanner.sock"
    pub = f"ipc://{tmp_path}/results.sock"
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.bind(endpoint)
    # Junk first, then frames: when the last frame's result is out, every message was taken.
    msgs = [_message(i, True) for i in range(junk)] + [_message(junk + i, False) for i in range(frames)]
    sender = threading.Thread(target=lambda: [push.send_multipart(m) for m in msgs], daemon=True)
    sub = Subscriber(pub)
    daemon = thzedge_run(f"{endpoint}?mode=lockstep", tiny_bundle, cfg, pub)
    try:
        sub.wait_state(proc=daemon)
        sender.start()
        sub.pump(120, until=lambda s: len(s.results) >= frames)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        daemon.send_signal(signal.SIGTERM)
        rc, out, err = finish(daemon, timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        sub.close()
        sender.join(10)
        push.close(0)
        ctx.term()
    assert rc == 0, err[-2000:]
    summary = summary_of(out)
    assert summary["frames_in"] == frames and summary["malformed"] == {"size_mismatch": junk}

    def value(name: str) -> float:
        return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name))

    help_line = next(ln for ln in text.splitlines() if ln.startswith("# HELP thzedge_frames_received_total"))
    assert "valid or not" in help_line
    assert value("thzedge_frames_received_total") == frames + junk  # what its help text says
    assert value('thzedge_frames_malformed_total{reason="size_mismatch"}') == junk
    rejected_lines = [ln for ln in err.splitlines() if "malformed frame rejected" in ln]
    assert 1 <= len(rejected_lines) < junk / 10, len(rejected_lines)


def test_results_in_flight_at_sigterm_reach_a_subscriber_that_was_not_reading(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """SIGTERM while hundreds of results wait in the daemon's send queue for a subscriber that
    stopped reading (its RCVHWM small, so they cannot move into it); it reads again only after
    the signal. Every result the daemon published from the first one received on must arrive.

    The stop flush waits on a tracker of the last event; pyzmq copies a small message and gives
    it a tracker that is done at once, so without forcing that message zero-copy the daemon
    closed its socket (linger 0) with the queue still full.
    """
    port = free_port()
    pub = f"ipc://{tmp_path}/results.sock"
    cfg = write_config(
        tmp_path / "thzedge.toml", "[publisher]\nhwm = 1000\n[privacy]\npublish_reconstruction = true\n"
    )
    cfg.write_text(cfg.read_text().replace("enabled = false", f'bind = "127.0.0.1:{port}"'))
    sub = Subscriber(pub, rcvhwm=2)
    daemon = thzedge_run("sim?fps=100", tiny_bundle, cfg, pub)
    try:
        sub.wait_state(seconds=90, proc=daemon)
        sub.pump(0.5)  # connected and receiving
        # Not reading while ~300 results of 16 KiB pile up in the daemon (3 s at 100 f/s on a quiet
        # machine; a loaded one publishes slower, so count them rather than sleep a fixed time).
        deadline = time.monotonic() + 60
        while (published_total(port) or 0) < 300 and time.monotonic() < deadline and daemon.poll() is None:
            time.sleep(0.1)
        daemon.send_signal(signal.SIGTERM)
        # Slow to drain: ~2 ms a message, so the queue outlasts the daemon's own shutdown.
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 1.0 or daemon.poll() is None:
            if time.monotonic() - quiet_since > 60:
                break
            if sub.sock.poll(50):
                sub.decode(sub.sock.recv_multipart())
                quiet_since = time.monotonic()
                time.sleep(0.002)
        rc, out, err = finish(daemon, timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        sub.close()
    assert rc == 0, err[-2000:]
    summary = summary_of(out)
    seqs = sorted(h["seq"] for h in sub.results)
    assert seqs, "no result received"
    # sim seqs start at 0; published results are those seqs less the frames dropped on the way.
    dropped = sum(summary["dropped"].values())
    missing = summary["published"] - seqs[0] - len(seqs)
    gone = sorted(set(range(seqs[0], summary["published"])) - set(seqs))
    tail = [e.get("state") for e in sub.events[-2:]]
    assert 0 <= missing <= dropped, (
        len(seqs),
        seqs[0],
        gone,
        summary["published"],
        summary["dropped"],
        tail,
        err[-1500:],
    )
    assert summary["published"] - seqs[0] >= 200  # many results really were in flight
    assert sub.events[-1]["kind"] == "state" and sub.events[-1]["state"] == "stopped"
