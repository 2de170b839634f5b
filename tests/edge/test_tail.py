"""`thzedge tail`: a real daemon, a real `tail` process, lines checked against what was published."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from daemon_helpers import REPO, finish, free_port, thzedge_run, write_config

from edge.cli import main
from edge.results import FrameResult, Provenance, decode_message, encode_event, encode_result
from edge.security import generate_keys
from edge.subscriber import resolve_target
from edge.tail import ResultFilter, format_message, to_json_line
from scanner_io.errors import UsageError

pytestmark = pytest.mark.timeout(120)


def _result(status: str = "ok", decision: str | None = "accept", label: str = "Left") -> FrameResult:
    r = FrameResult(
        scanner="sim0",
        seq=41,
        t_capture_ns=1,
        status=status,
        provenance=Provenance("ab" * 32, "fp32", "ort", "identity"),
        posture={"label": label, "index": 1, "confidence": 0.93},
        verification=None if decision is None else {"decision": decision, "identity": "secret-name"},
        latency_ms={"total": 2.25},
        embedding=np.ones(8, np.float32),
    )
    return r


def test_format_line_has_seq_posture_decision_status_latency_and_no_identity() -> None:
    msg = decode_message(encode_result(_result(), 5))
    line = format_message(msg)
    assert line == "sim0 seq=41 posture=Left 0.93 decision=accept status=ok latency=2.2ms"
    assert "secret-name" not in line
    event = decode_message(encode_event("sim0", "drop", {"reason": "stale", "count": 3, "seq": 9}))
    assert format_message(event) == "sim0 event drop reason=stale count=3 seq=9"
    as_json = json.loads(to_json_line(msg))
    assert as_json["type"] == "result" and as_json["seq"] == 41 and as_json["parts"] == []


def test_filter_keeps_matching_results_and_every_event() -> None:
    f = ResultFilter.parse("status=ok|partial,decision=accept")
    assert f.keep(decode_message(encode_result(_result(), 5)))
    assert not f.keep(decode_message(encode_result(_result(decision="unknown"), 5)))
    assert not f.keep(decode_message(encode_result(_result(status="error"), 5)))
    assert not ResultFilter.parse("decision=accept").keep(
        decode_message(encode_result(_result(decision=None), 5))
    )
    assert f.keep(decode_message(encode_event("sim0", "state", {"state": "ready"})))
    # A frame of a visit: the visit's decision shows, and filters, beside the frame's own.
    r = _result(decision="unknown")
    assert r.verification is not None
    r.verification["visit"] = {"id": 3, "frames": 9, "decision": "accept", "identity": "secret-name"}
    line = format_message(decode_message(encode_result(r, 5)))
    assert "decision=unknown" in line and " visit=3:accept" in line and "secret-name" not in line
    assert ResultFilter.parse("visit=accept").keep(decode_message(encode_result(r, 5)))
    assert not ResultFilter.parse("visit=accept").keep(decode_message(encode_result(_result(), 5)))
    for bad in ("status", "colour=red", "status="):
        with pytest.raises(UsageError):
            ResultFilter.parse(bad)


def _tail(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_tail_prints_the_running_daemons_results_as_json_lines(tiny_bundle: Path, tmp_path: Path) -> None:
    pub = f"ipc://{tmp_path}/results.sock"
    cfg = write_config(tmp_path / "thzedge.toml")
    daemon = thzedge_run("sim?fps=40&seed=2", tiny_bundle, cfg, pub, "--max-frames", "400")
    tail = _tail("--json", "tail", pub, "--count", "5", "--filter", "status=ok")
    try:
        out, err = tail.communicate(timeout=60)
        assert tail.returncode == 0, err
        lines = [json.loads(ln) for ln in out.splitlines()]
        results = [x for x in lines if x["type"] == "result"]
        assert len(results) == 5 and all(r["status"] == "ok" for r in results)
        seqs = [r["seq"] for r in results]
        assert seqs == sorted(seqs) and len(set(seqs)) == 5
        assert all(r["posture"]["label"] in ("Front", "Left", "Right", "Up", "Down") for r in results)
        # A late joiner is welcomed with the state at once (docs/protocol.md).
        assert any(x["type"] == "event" and x["kind"] == "state" for x in lines)
        assert daemon.poll() is None, "tail's exit must not touch the daemon"
    finally:
        tail.kill()
        daemon.terminate()
        rc, _, derr = finish(daemon)
    assert rc == 0, derr[-2000:]


def test_tail_over_curve_takes_the_client_keys_from_the_config(tiny_bundle: Path, tmp_path: Path) -> None:
    keys, clients = tmp_path / "keys", tmp_path / "clients"
    clients.mkdir()
    generate_keys(keys, "server")
    generate_keys(keys, "tail")
    (clients / "tail.key").write_bytes((keys / "tail.key").read_bytes())
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(
        f'[publisher]\nendpoint = "{endpoint}"\n'
        f'[publisher.curve]\nenabled = true\nsecret_key_file = "{keys / "server.key_secret"}"\n'
        f'allowed_clients_dir = "{clients}"\nclient_key_file = "{keys / "tail.key_secret"}"\n'
        "[metrics]\nenabled = false\n[daemon]\nstop_timeout_s = 3.0\n"
    )
    target = resolve_target(None, cfg, None)
    assert target.curve and target.endpoint == endpoint
    daemon = thzedge_run("sim?fps=40", tiny_bundle, cfg, endpoint, "--max-frames", "400")
    tail = _tail("--config", str(cfg), "tail", "--count", "3", "--no-events")
    try:
        out, err = tail.communicate(timeout=60)
        assert tail.returncode == 0, err
        assert "(CURVE)" in err
        lines = out.splitlines()
        assert len(lines) == 3 and all(" seq=" in ln and " status=" in ln for ln in lines), out
    finally:
        tail.kill()
        daemon.terminate()
        finish(daemon)


def test_tail_by_source_name_and_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[sources.scanner0]\nuri = "sim"\n[publisher]\nendpoint = "ipc://{tmp_path}/r.sock"\n')
    assert resolve_target(None, cfg, "scanner0").endpoint == f"ipc://{tmp_path}/r.sock"
    assert main(["--config", str(cfg), "tail", "--source", "scanner9"]) == 78
    err = capsys.readouterr().err.strip()
    assert "unknown source 'scanner9'" in err and "scanner0" in err and len(err.splitlines()) == 1
    assert main(["tail", "ipc:///x", "--source", "scanner0"]) == 2
    assert main(["tail", "--filter", "bogus"]) == 2


def test_tail_with_no_daemon_waits_and_stops_on_sigterm(tmp_path: Path) -> None:
    tail = _tail("tail", f"ipc://{tmp_path}/none.sock")
    assert tail.stderr is not None and tail.stderr.readline().startswith("subscribed to ipc://")
    time.sleep(1.0)
    assert tail.poll() is None  # waiting for a daemon that is not there yet
    tail.terminate()
    out, err = tail.communicate(timeout=20)
    assert tail.returncode == 0 and out == "" and "Traceback" not in err
