"""`thzedge run --precision` and `--metrics-bind`: two daemons on one host, no config file."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import pytest
from daemon_helpers import Subscriber, finish, free_port, thzedge

from edge.bundle import demo_bundle_path
from edge.config import DEFAULT_CONFIG_PATH

pytestmark = pytest.mark.timeout(120)


def test_two_daemons_without_a_config_file(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    pubs = [f"ipc://{tmp_path}/a.sock", f"ipc://{tmp_path}/b.sock"]
    if DEFAULT_CONFIG_PATH.exists() or "THZEDGE_CONFIG" in os.environ:
        pytest.skip("this host has a thzedge config file; the test is about running without one")
    subs = [Subscriber(p) for p in pubs]
    daemons = [
        thzedge(
            "run",
            "--source",
            "sim?fps=20",
            "--model",
            "demo",
            "--precision",
            precision,
            "--publish",
            pub,
            "--metrics-bind",
            f"127.0.0.1:{port}",
        )  # fmt: skip
        for precision, pub, port in zip(("int8", "fp32"), pubs, ports, strict=True)
    ]
    try:
        states = [sub.wait_state(proc=d) for sub, d in zip(subs, daemons, strict=True)]
        for sub in subs:
            sub.pump(60, until=lambda s: len(s.results) >= 3)
        ready = [
            json.loads(urllib.request.urlopen(f"http://127.0.0.1:{p}/readyz", timeout=5).read())
            for p in ports
        ]
        for d in daemons:
            d.send_signal(signal.SIGTERM)
        codes = [finish(d) for d in daemons]
    finally:
        for d in daemons:
            if d.poll() is None:
                d.kill()
        for sub in subs:
            sub.close()
    assert [rc for rc, _, _ in codes] == [0, 0], [err[-2000:] for _, _, err in codes]
    assert [s["model"]["precision"] for s in states] == ["int8", "fp32"]
    assert [sub.results[0]["provenance"]["precision"] for sub in subs] == ["int8", "fp32"]
    assert all(r["ok"] and r["state"] == "ready" for r in ready)


def test_metrics_bind_off_and_a_bad_value(tmp_path: Path) -> None:
    port = free_port()
    args = ("run", "--source", "sim?frames=2", "--model", str(demo_bundle_path()), "--publish")
    rc, _, err = finish(thzedge(*args, f"ipc://{tmp_path}/r.sock", "--metrics-bind", "nowhere"))
    assert rc == 2 and err.strip() == (
        "thzedge: error: --metrics-bind 'nowhere': expected HOST:PORT such as 127.0.0.1:9464, or off"
    )
    rc, _, err = finish(thzedge(*args, f"ipc://{tmp_path}/r.sock", "--precision", "fp64"))
    assert rc == 2 and "Invalid value for '--precision'" in err
    # `off`: no server; the port stays free for whoever wants it.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        rc, _, err = finish(thzedge(*args, f"ipc://{tmp_path}/r.sock", "--metrics-bind", "off"))
    assert rc == 0, err[-2000:]
