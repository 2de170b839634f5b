"""CURVE on the acquisition link: the scanner (emulator) is the CURVE server, the daemon a client.

Real sockets over loopback tcp: a client with the allowed key receives frames; one with an
unknown key, and one without CURVE, receive nothing. Then the real daemon, configured with the
scanner's public key and its own certificate, streams from a CURVE `scanner serve` process with
no `insecure_dev` anywhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq.auth
from daemon_helpers import Subscriber, finish, free_port, run_until_exit, summary_of, thzedge

from edge.config import load_config
from scanner_io.emulator import EmulatorSettings, serve_uri
from scanner_io.errors import ConfigError
from scanner_io.frame import Frame
from scanner_io.sources import CurveClientKeys, ZmqSource

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """scanner (server), daemon (allowed client) and rogue (unknown client) certificates."""
    d = tmp_path / "keys"
    d.mkdir()
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    out = {}
    for name in ("scanner", "daemon", "rogue"):
        public, secret = zmq.auth.create_certificates(d, name)
        out[name], out[name + "_secret"] = Path(public), Path(secret)
    (allowed / "daemon.key").write_bytes(out["daemon"].read_bytes())
    out["allowed"] = allowed
    return out


def client_keys(keys: dict[str, Path], who: str) -> CurveClientKeys:
    server_public, _ = zmq.auth.load_certificate(keys["scanner"])
    public, secret = zmq.auth.load_certificate(keys[who + "_secret"])
    assert secret is not None
    return CurveClientKeys(server_public=server_public, public=public, secret=secret)


@pytest.fixture
def curve_scanner(keys: dict[str, Path]) -> Iterator[str]:
    """A CURVE scanner emulator streaming the simulator on loopback tcp; yields its endpoint."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    stop = threading.Event()
    settings = EmulatorSettings(
        bind=endpoint, rate=100.0, curve_secret_file=keys["scanner_secret"], curve_clients_dir=keys["allowed"]
    )
    t = threading.Thread(target=serve_uri, args=("sim", settings), kwargs={"stop": stop}, daemon=True)
    t.start()
    try:
        yield endpoint
    finally:
        stop.set()
        t.join(10)


def frames_within(source: ZmqSource, seconds: float) -> int:
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        if isinstance(source.read(0.1), Frame):
            n += 1
    return n


@pytest.mark.parametrize(("who", "expect"), [("daemon", True), ("rogue", False), (None, False)])
def test_only_the_allowed_key_receives_frames(
    curve_scanner: str, keys, who: str | None, expect: bool
) -> None:
    curve = client_keys(keys, who) if who is not None else None
    source = ZmqSource(curve_scanner, curve_scanner, curve=curve)
    try:
        n = frames_within(source, 2.0)
    finally:
        source.close()
    assert (n > 10) if expect else (n == 0), (who, n)


def test_a_tcp_source_without_curve_keys_needs_insecure_dev(tmp_path: Path, keys) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('[sources.scanner0]\nuri = "tcp://127.0.0.1:5555"\n')
    with pytest.raises(ConfigError, match="tcp without CURVE"):
        load_config(cfg)
    cfg.write_text(
        f'[sources.scanner0]\nuri = "tcp://127.0.0.1:5555"\ncurve_server_key = "{keys["scanner"]}"\n'
    )
    with pytest.raises(ConfigError, match="needs both"):
        load_config(cfg)
    cfg.write_text(
        f'[sources.scanner0]\nuri = "tcp://127.0.0.1:5555"\ncurve_server_key = "{keys["scanner"]}"\n'
        f'curve_client_key = "{keys["daemon_secret"]}"\n'
    )
    assert load_config(cfg).sources["scanner0"].curve  # no insecure_dev needed: the link is encrypted


def serve_curve_sim(keys, port: int):
    """`thzedge scanner serve` of the simulator at 60 f/s as a CURVE server admitting keys["allowed"]."""
    return thzedge(
        "scanner", "serve", "--source", "sim", "--bind", f"tcp://127.0.0.1:{port}", "--rate", "60",
        "--curve-secret", str(keys["scanner_secret"]), "--curve-clients", str(keys["allowed"]),
    )  # fmt: skip


def test_the_daemon_streams_from_a_curve_scanner_process(tmp_path: Path, keys, tiny_bundle: Path) -> None:
    port = free_port()
    scanner = serve_curve_sim(keys, port)
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(
        "[metrics]\nenabled = false\n[daemon]\nstop_timeout_s = 3.0\n"
        "[calibration]\nallow_uncalibrated = true\n"
        f'[sources.scanner0]\nuri = "tcp://127.0.0.1:{port}"\n'
        f'curve_server_key = "{keys["scanner"]}"\ncurve_client_key = "{keys["daemon_secret"]}"\n'
    )
    endpoint = f"ipc://{tmp_path}/results.sock"
    sub = Subscriber(endpoint)
    try:
        daemon = thzedge(
            "--json", "--config", str(cfg), "run", "--source", "scanner0", "--model", str(tiny_bundle),
            "--publish", endpoint, "--max-frames", "30", "--no-reconstruction",
        )  # fmt: skip
        rc, out, err = run_until_exit(daemon, sub, timeout=60)
    finally:
        sub.close()
        scanner.terminate()
        finish(scanner, timeout=20)
    assert rc == 0, err[-2000:]
    assert summary_of(out)["frames_in"] == 30
    assert len([r for r in sub.results]) >= 1
    assert "insecure_dev" not in err


@pytest.mark.parametrize("client", ["daemon", "rogue"])
def test_record_uses_the_configured_sources_curve_keys(tmp_path: Path, keys, client: str) -> None:
    """`thzedge record --source NAME` connects as the CURVE client configured for NAME (it used
    to open the bare URI: no CURVE, so a CURVE scanner sent it nothing). A key the scanner does
    not allow still records nothing."""
    from scanner_io.recording import recording_info

    port = free_port()
    scanner = serve_curve_sim(keys, port)
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(
        f'[sources.scanner0]\nuri = "tcp://127.0.0.1:{port}"\n'
        f'curve_server_key = "{keys["scanner"]}"\ncurve_client_key = "{keys[client + "_secret"]}"\n'
    )
    out_file = tmp_path / "rec.mcap"
    try:
        rec = thzedge(
            "--json", "--config", str(cfg), "record", "--source", "scanner0", "--out", str(out_file),
            "--duration", "8",
        )  # fmt: skip
        rc, out, err = finish(rec, timeout=60)
    finally:
        scanner.terminate()
        finish(scanner, timeout=20)
    assert rc == 0, err[-2000:]
    frames = recording_info(out_file).frames
    if client == "daemon":
        assert frames >= 20, err[-2000:]  # 60 fps for ~8 s less the connection set-up
    else:
        assert frames == 0
    assert "insecure_dev" not in err
