"""Revoking a CURVE client key on SIGHUP cuts off that client even while it stays connected
(issue 14, failure 6). A real `thzedge run` process, real CURVE subscribers over tcp.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import zmq
from daemon_helpers import finish, free_port, thzedge_run

from edge.security import generate_keys, load_keypair, secure_client_socket

pytestmark = [
    pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE"),
    pytest.mark.timeout(240),
]


def _count(sock: zmq.Socket, seconds: float) -> int:
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        if sock.poll(50):
            while True:
                try:
                    sock.recv_multipart(zmq.NOBLOCK)
                    n += 1
                except zmq.Again:
                    break
    return n


def test_a_revoked_client_that_stays_connected_receives_nothing(tiny_bundle: Path, tmp_path: Path) -> None:
    server_dir, clients, own = tmp_path / "server", tmp_path / "clients", tmp_path / "own"
    _, server_secret = generate_keys(server_dir, "server")
    clients.mkdir()
    for name in ("keeper", "revoked"):
        public, _ = generate_keys(own, name)
        (clients / f"{name}.key").write_bytes(public.read_bytes())
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(
        f'[publisher]\nendpoint = "{endpoint}"\n[publisher.curve]\nenabled = true\n'
        f'secret_key_file = "{server_secret}"\nallowed_clients_dir = "{clients}"\n'
        "[metrics]\nenabled = false\n[daemon]\nstop_timeout_s = 3.0\n"
    )
    server_public = load_keypair(server_secret).public
    ctx = zmq.Context()
    subs = {}
    for name in ("keeper", "revoked"):
        s = ctx.socket(zmq.SUB)
        s.linger = 0
        secure_client_socket(s, server_public, load_keypair(own / f"{name}.key_secret"))
        s.setsockopt(zmq.SUBSCRIBE, b"result/")
        s.connect(endpoint)
        subs[name] = s
    daemon = thzedge_run("sim?fps=30", tiny_bundle, cfg, endpoint)
    try:
        assert subs["keeper"].poll(90_000) and subs["revoked"].poll(30_000), "no results (daemon not up?)"
        (clients / "revoked.key").unlink()
        daemon.send_signal(signal.SIGHUP)
        # Let the reload and the messages already on their way pass, then count.
        _count(subs["revoked"], 3.0)
        _count(subs["keeper"], 3.0)
        after = {name: _count(s, 5.0) for name, s in subs.items()}
        assert after["keeper"] >= 10, after  # the allowed client reconnected and streams on
        assert after["revoked"] == 0, after
        daemon.send_signal(signal.SIGTERM)
        rc, _, err = finish(daemon, timeout=60)
        assert rc == 0, err[-2000:]
        assert "revoked" in err and "CURVE client rejected" in err
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        for s in subs.values():
            s.close(0)
        ctx.term()
