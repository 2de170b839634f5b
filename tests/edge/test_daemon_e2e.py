"""`thzedge run` end to end: real processes over real sockets.

scanner (the emulator subprocess, or a PUSH socket in the test) → `thzedge run` subprocess →
a plain pyzmq subscriber here that decodes results with docs/protocol.md's rules only (it does
not import edge.results). Every frame sent is accounted for: a result, or a counted drop.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from daemon_helpers import (
    NOISE_FRAMES,
    Subscriber,
    bundle_sha,
    check_result,
    embedding_dim,
    finish,
    free_port,
    identity_profile,
    run_until_exit,
    sim_profile,
    summary_of,
    thzedge,
    thzedge_run,
    write_config,
)

from calibration.profile import CalibrationProfile

pytestmark = pytest.mark.timeout(120)

# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle: Path) -> Path:
    """The shared tiny real ONNX bundle (tests/conftest.py, H1's exporter on random weights)."""
    return tiny_bundle


# --------------------------------------------------------------------------------------------
# End to end


def test_emulator_to_daemon_to_subscriber_accounts_for_every_frame(bundle_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    pub = f"ipc://{tmp_path}/results.sock"
    cfg = write_config(tmp_path / "thzedge.toml")
    sent, every = 47, 8  # every 8th frame goes out malformed (size, dtype, version in turn); last is valid
    valid = sent - sent // every
    sub = Subscriber(pub)
    # A live source needs its scanner's profile (R-CAL-1): the emulated sensor's true one.
    cal = sim_profile(tmp_path / "cal", seed=3)
    daemon = thzedge_run(
        f"tcp://127.0.0.1:{port}", bundle_dir, cfg, pub, "--max-frames", str(valid), calibration=cal
    )
    try:
        state = sub.wait_state(proc=daemon)
        assert state["protocol"] == 1 and state["model"]["bundle"] == bundle_sha(bundle_dir)
        assert state["calibration"] == CalibrationProfile.load(cal).profile_id
        emu = thzedge(
            "--json",
            "scanner",
            "serve",
            "--source",
            "sim?seed=3",
            "--bind",
            f"tcp://127.0.0.1:{port}",
            "--rate",
            "max",
            "--frames",
            str(sent),
            "--inject-malformed",
            str(every),
        )
        rc, out, err = run_until_exit(daemon, sub)
        assert rc == 0, err[-3000:]
        erc, eout, eerr = finish(emu)
        assert erc == 0, eerr[-2000:]
    finally:
        for p in (daemon,):
            if p.poll() is None:
                p.kill()
        sub.close()
    summary = summary_of(out)
    emu_stats = summary_of(eout)
    assert emu_stats["sent"] == sent
    # received + counted drops = frames sent (malformed and upstream gaps included).
    assert len(sub.results) == summary["published"]
    assert len(sub.results) + sum(summary["dropped"].values()) == sent
    assert summary["unaccounted"] == 0
    assert sum(summary["malformed"].values()) == sent // every == summary["dropped"]["malformed"]
    errors = [e for e in sub.events if e["kind"] == "error" and e.get("stage") == "acquire"]
    assert len(errors) == sent // every and all(e["reason"] and e["seq"] is not None for e in errors)
    seqs = [h["seq"] for h in sub.results]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    sha = bundle_sha(bundle_dir)
    for h in sub.results:
        check_result(h, sha)
        assert h["parts"] == [] and h["scanner"] == "sim0"


def _valid_frame_parts(seq: int, scanner: str = "scn0") -> list[bytes]:
    from scanner_io.codec import encode_frame
    from scanner_io.frame import FrameHeader

    rng = np.random.default_rng(seq)
    data = rng.integers(0, 4000, size=(96, 96), dtype=np.uint16)
    header = FrameHeader(
        scanner=scanner, seq=seq, t_capture_ns=time.time_ns(), shape=(96, 96), dtype="uint16"
    )
    return [bytes(memoryview(p)) for p in encode_frame(header, data)]


def _malformed_kinds(seq: int) -> dict[str, list[bytes]]:
    """One message per decoder rejection reason (each checked against the real decoder below)."""
    topic, header, payload = _valid_frame_parts(seq)
    h = json.loads(header)

    def with_header(**changes) -> list[bytes]:
        d = {**h, **changes}
        return [topic, json.dumps(d).encode(), payload]

    missing = {k: v for k, v in h.items() if k != "dtype"}
    nan_parts = _valid_frame_parts(seq)
    fh = {**h, "dtype": "float32"}
    nan = np.full((96, 96), np.nan, dtype="<f4").tobytes()
    return {
        "bad_parts": [topic, header],
        "bad_topic": [b"nope/scn0", header, payload],
        "bad_json": [topic, b"{not json", payload],
        "missing_field": [topic, json.dumps(missing).encode(), payload],
        "bad_field": with_header(seq="seven"),
        "bad_version": with_header(v=99),
        "bad_dtype": with_header(dtype="float64"),
        "bad_shape": with_header(shape=[0, 96]),
        "size_mismatch": [topic, header, payload[:-2]],
        "topic_mismatch": [b"frame/other", header, payload],
        "non_finite": [nan_parts[0], json.dumps(fh).encode(), nan],
    }


def test_malformed_frames_of_every_kind_mid_stream_are_counted_and_streaming_continues(
    bundle_dir: Path, tmp_path: Path
) -> None:
    from scanner_io.codec import decode_frame
    from scanner_io.errors import FrameDecodeError

    pub = f"ipc://{tmp_path}/results.sock"
    scan = f"ipc://{tmp_path}/scanner.sock"
    cfg = write_config(tmp_path / "thzedge.toml", calibration=NOISE_FRAMES)
    cal = identity_profile(tmp_path / "cal")
    # Build the stream: valid frames with every malformed kind in between, each verified to be
    # rejected by the real decoder for the intended reason.
    stream: list[tuple[str, list[bytes]]] = []
    seq = 0
    kinds = _malformed_kinds(0)
    for kind in kinds:
        stream.append(("ok", _valid_frame_parts(seq)))
        seq += 1
        msg = _malformed_kinds(seq)[kind]
        with pytest.raises(FrameDecodeError) as exc:
            decode_frame(msg)
        assert exc.value.reason == kind
        stream.append((kind, msg))
        seq += 1
    stream.append(("ok", _valid_frame_parts(seq)))
    n_valid = sum(1 for k, _ in stream if k == "ok")

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.bind(scan)
    sub = Subscriber(pub)
    daemon = thzedge_run(scan, bundle_dir, cfg, pub, "--max-frames", str(n_valid), calibration=cal)
    try:
        sub.wait_state(proc=daemon)
        for _, parts in stream:
            push.send_multipart(parts)  # blocks until the daemon's PULL is connected: nothing lost
        rc, out, err = run_until_exit(daemon, sub)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        push.close(0)
        ctx.term()
        sub.close()
    assert rc == 0, err[-3000:]
    summary = summary_of(out)
    assert summary["malformed"] == dict.fromkeys(kinds, 1)
    assert summary["dropped"]["upstream_gap"] == 0  # a rejected frame with a readable seq is no gap
    # A burst into a live source may overflow the queue (drop-oldest): counted, never lost.
    assert len(sub.results) == summary["published"] >= 1
    assert len(sub.results) + sum(summary["dropped"].values()) == len(stream)
    assert sub.results[-1]["seq"] == seq  # the frame after the last malformed one got through
    reasons = sorted(e["reason"] for e in sub.events if e["kind"] == "error" and e.get("stage") == "acquire")
    assert reasons == sorted(kinds)


def test_config_errors_exit_78(bundle_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nqueue_sise = 4\n")
    rc, out, err = finish(
        thzedge("run", "--source", "sim?frames=1", "--model", str(bundle_dir), "--config", str(bad))
    )
    assert rc == 78
    assert "queue_size" in err and "Traceback" not in err
    good = write_config(tmp_path / "ok.toml")
    rc, _, err = finish(
        thzedge("run", "--source", "scannr0", "--model", str(bundle_dir), "--config", str(good))
    )
    assert rc == 78 and "unknown source" in err
    nocal = write_config(
        tmp_path / "nocal.toml", f'[sources.s]\nuri = "sim?frames=2"\ncalibration = "{tmp_path}/none"\n'
    )
    rc, _, err = finish(thzedge("run", "--source", "s", "--model", str(bundle_dir), "--config", str(nocal)))
    assert rc == 78 and "calibration" in err


def test_fake_notify_socket_sees_status_ready_watchdog_stopping_in_order(
    bundle_dir: Path, tmp_path: Path
) -> None:
    path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(path)
    ns.settimeout(0.2)
    cfg = write_config(tmp_path / "thzedge.toml")
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    daemon = thzedge_run("sim?frames=40&fps=25", bundle_dir, cfg, f"ipc://{tmp_path}/r.sock", env=env)
    messages: list[str] = []
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                messages.append(ns.recv(4096).decode())
            except TimeoutError:
                if daemon.poll() is not None:
                    break
        rc, out, err = finish(daemon)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        ns.close()
    assert rc == 0, err[-2000:]
    lines = [ln for m in messages for ln in m.splitlines()]
    ready = lines.index("READY=1")
    stopping = lines.index("STOPPING=1")
    statuses_before = [ln for ln in lines[:ready] if ln.startswith("STATUS=")]
    assert len(statuses_before) >= 3, lines[:ready]  # one per start-up step
    assert not any(ln == "WATCHDOG=1" for ln in lines[:ready])  # no ping before READY
    assert any(ln == "WATCHDOG=1" for ln in lines[ready:stopping])  # pinged while streaming
    assert ready < stopping
    assert lines.count("READY=1") == 1


def test_sigterm_mid_stream_exits_0_in_time_with_nothing_unaccounted(
    bundle_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    pub = f"ipc://{tmp_path}/results.sock"
    cfg = write_config(tmp_path / "thzedge.toml")
    sub = Subscriber(pub)
    daemon = thzedge_run(
        f"tcp://127.0.0.1:{port}", bundle_dir, cfg, pub, calibration=sim_profile(tmp_path / "cal", seed=1)
    )
    emu = thzedge(
        "scanner",
        "serve",
        "--source",
        "sim?seed=1",
        "--bind",
        f"tcp://127.0.0.1:{port}",
        "--rate",
        "40",
        "--frames",
        "100000",
    )
    try:
        sub.pump(60, until=lambda s: len(s.results) >= 15)
        assert len(sub.results) >= 15
        # The scanner vanishes and the consumer stops reading: peers unreachable.
        emu.kill()
        emu.wait()
        t0 = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        rc, out, err = finish(daemon, timeout=30)
        took = time.monotonic() - t0
    finally:
        for p in (daemon, emu):
            if p.poll() is None:
                p.kill()
        sub.close()
    assert rc == 0, err[-3000:]
    assert took < 3.0 + 1.5, took  # stop_timeout_s = 3 in the config, plus process exit
    summary = summary_of(out)
    assert summary["unaccounted"] == 0
    assert summary["frames_in"] == summary["published"] + sum(
        v for k, v in summary["dropped"].items() if k not in ("malformed", "upstream_gap")
    )


def test_privacy_flags_off_no_biometric_parts_nor_identities_in_stderr(
    bundle_dir: Path, tmp_path: Path
) -> None:
    pub = f"ipc://{tmp_path}/results.sock"
    cfg = write_config(tmp_path / "thzedge.toml")
    sub = Subscriber(pub)
    daemon = thzedge_run("sim?frames=20&fps=50", bundle_dir, cfg, pub, debug=True)
    try:
        sub.wait_state(proc=daemon)
        rc, out, err = run_until_exit(daemon, sub)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        sub.close()
    assert rc == 0, err[-3000:]
    assert sub.results and all(h["parts"] == [] for h in sub.results)
    assert all(a == {} for a in sub.arrays)
    assert all(h["verification"] is None for h in sub.results)
    from scanner_io.simulator import identity_name

    names = [identity_name(i) for i in range(20)]
    assert not [n for n in names if n in err]
    assert "embedding" not in err.replace("publish_embedding", "")


def test_privacy_flags_on_publish_described_parts(bundle_dir: Path, tmp_path: Path) -> None:
    pub = f"ipc://{tmp_path}/results.sock"
    cfg = write_config(
        tmp_path / "thzedge.toml", "[privacy]\npublish_embedding = true\npublish_reconstruction = true\n"
    )
    sub = Subscriber(pub)
    daemon = thzedge_run("sim?frames=10&fps=50", bundle_dir, cfg, pub)
    try:
        sub.wait_state(proc=daemon)
        rc, out, err = run_until_exit(daemon, sub)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        sub.close()
    assert rc == 0, err[-3000:]
    summary = summary_of(out)
    assert (
        1 <= len(sub.results) <= summary["published"]
    )  # a paced live source: early results may precede the join
    assert summary["published"] + sum(summary["dropped"].values()) == 10
    for h, arrays in zip(sub.results, sub.arrays, strict=True):
        assert [p["kind"] for p in h["parts"]] == ["embedding", "reconstruction"]
        assert arrays["embedding"].shape == (embedding_dim(bundle_dir),)
        assert arrays["reconstruction"].shape == (64, 64)
        assert np.isfinite(arrays["reconstruction"]).all()


def test_late_joiner_learns_state_within_a_second(bundle_dir: Path, tmp_path: Path) -> None:
    pub = f"ipc://{tmp_path}/results.sock"
    cfg = write_config(tmp_path / "thzedge.toml")
    first = Subscriber(pub)
    daemon = thzedge_run("sim?fps=20", bundle_dir, cfg, pub)
    try:
        first.pump(60, until=lambda s: len(s.results) >= 5)
        late = Subscriber(pub)
        t0 = time.monotonic()
        state = late.wait_state(seconds=5)
        took = time.monotonic() - t0
        late.close()
        daemon.send_signal(signal.SIGTERM)
        rc, _, err = finish(daemon)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        first.close()
    assert rc == 0, err[-2000:]
    assert took < 1.0, took
    assert state["protocol"] == 1 and state["model"]["bundle"] == bundle_sha(bundle_dir)
    assert state["state"] in ("ready", "stalled")
    # Nothing configured: the sim source carries its sensor's true profile, and the daemon uses it.
    from calibration.simulated import true_profile
    from scanner_io.simulator import ScannerSimulator

    assert state["calibration"] == true_profile(ScannerSimulator(seed=0)).profile_id


def _frame_parts_with_claim(seq: int, claimed: str | None) -> tuple[list[bytes], np.ndarray]:
    from scanner_io.codec import encode_frame
    from scanner_io.frame import FrameHeader

    data = np.random.default_rng(seq % 2).integers(0, 4000, size=(96, 96), dtype=np.uint16)
    header = FrameHeader(
        scanner="scn0",
        seq=seq,
        t_capture_ns=time.time_ns(),
        shape=(96, 96),
        dtype="uint16",
        claimed_identity=claimed,
    )
    return [bytes(memoryview(p)) for p in encode_frame(header, data)], data


def test_verification_1to1_with_a_claim_else_1toN_and_identities_stay_out_of_logs(
    bundle_dir: Path, tmp_path: Path
) -> None:
    from calibration.conditioning import calibrate_and_condition
    from edge.bundle import Bundle
    from edge.gallery import Gallery
    from edge.runner import Runner

    claimant = "person-7f3a"
    # Enrol the claimant with the embedding the daemon will compute for frames like seq 0.
    _, data0 = _frame_parts_with_claim(0, None)
    _, data1 = _frame_parts_with_claim(1, None)
    bundle = Bundle.open(bundle_dir)
    with Runner.from_bundle(bundle, backend="ort") as r:
        x = np.stack([calibrate_and_condition(d, None) for d in (data0, data1)])[:, None]
        emb = r.encode(x).embedding
    # An untrained tiny net maps faces close together: put the threshold between the two.
    u = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    d01 = float(np.linalg.norm(u[0] - u[1]))
    assert d01 > 1e-4
    threshold = round(d01 / 2, 6)
    gallery = Gallery.for_bundle(bundle, threshold=threshold)
    gallery.enroll(claimant, emb[:1])
    gpath = gallery.save(tmp_path / "gallery.npz")
    cfg = write_config(
        tmp_path / "thzedge.toml",
        f'[verification]\ngallery = "{gpath}"\nthreshold = {threshold}\n',
        calibration=NOISE_FRAMES,
    )
    cal = identity_profile(tmp_path / "cal")
    scan = f"ipc://{tmp_path}/scanner.sock"
    pub = f"ipc://{tmp_path}/results.sock"
    rec = tmp_path / "raw.mcap"
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.bind(scan)
    sub = Subscriber(pub)
    daemon = thzedge_run(
        scan, bundle_dir, cfg, pub, "--max-frames", "8", "--record", str(rec), debug=True, calibration=cal
    )
    try:
        sub.wait_state(proc=daemon)
        for seq in range(8):
            # even seqs look like seq 0 (the enrolled face); claims on seqs 0..3 only
            push.send_multipart(_frame_parts_with_claim(seq, claimant if seq < 4 else None)[0])
            time.sleep(0.05)
        rc, out, err = run_until_exit(daemon, sub)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        push.close(0)
        ctx.term()
        sub.close()
    assert rc == 0, err[-3000:]
    v = {h["seq"]: h["verification"] for h in sub.results}
    assert sorted(v) == list(range(8))
    assert v[0]["mode"] == "1:1" and v[0]["decision"] == "accept" and v[0]["identity"] == claimant
    assert v[1]["mode"] == "1:1" and v[1]["decision"] == "reject" and v[1]["threshold"] == threshold
    assert v[4]["mode"] == "1:N" and v[4]["decision"] == "accept" and v[4]["identity"] == claimant
    assert v[5]["mode"] == "1:N" and v[5]["decision"] == "unknown" and v[5]["identity"] is None
    # Even at debug level, no identity and no score in the logs (R-SEC-5).
    assert claimant not in err
    assert f"{v[0]['score']:.4f}"[:6] not in err
    # --record kept every raw frame, bit for bit.
    from scanner_io.recording import RecordingReader

    frames = [it.item for it in RecordingReader(rec)]
    assert [f.header.seq for f in frames] == list(range(8))
    assert frames[0].header.claimed_identity == claimant


def test_lockstep_over_tcp_drops_nothing(bundle_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    pub = f"tcp://127.0.0.1:{free_port()}"
    cfg = write_config(tmp_path / "thzedge.toml")
    sub = Subscriber(pub)
    sent = 80
    daemon = thzedge_run(
        f"tcp://127.0.0.1:{port}?mode=lockstep",
        bundle_dir,
        cfg,
        pub,
        "--max-frames",
        str(sent),
        calibration=sim_profile(tmp_path / "cal", seed=5),
    )
    try:
        state = sub.wait_state(proc=daemon)
        assert state["mode"] == "lockstep"
        emu = thzedge(
            "--json",
            "scanner",
            "serve",
            "--source",
            "sim?seed=5",
            "--bind",
            f"tcp://127.0.0.1:{port}",
            "--rate",
            "max",
            "--frames",
            str(sent),
            "--hwm",
            "2",
        )
        rc, out, err = run_until_exit(daemon, sub)
        erc, eout, _ = finish(emu)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        sub.close()
    assert rc == 0 and erc == 0, err[-3000:]
    summary = summary_of(out)
    assert summary_of(eout)["sent"] == sent
    assert summary["published"] == sent == len(sub.results)  # received == sent (R-ZMQ-2)
    assert sum(summary["dropped"].values()) == 0
    assert [h["seq"] for h in sub.results] == list(range(sent))


def test_metrics_and_health_while_streaming(bundle_dir: Path, tmp_path: Path) -> None:
    import urllib.request

    port = free_port()
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text(f'[metrics]\nbind = "127.0.0.1:{port}"\n')
    pub = f"ipc://{tmp_path}/results.sock"
    sub = Subscriber(pub)
    daemon = thzedge_run("sim?fps=30", bundle_dir, cfg, pub)
    try:
        sub.wait_state(proc=daemon)
        # A result is counted in the metrics just after it is sent: once the 11th has arrived,
        # the publisher has counted the first 10.
        sub.pump(60, until=lambda s: len(s.results) >= 11)
        base = f"http://127.0.0.1:{port}"
        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        ready = json.loads(urllib.request.urlopen(f"{base}/readyz", timeout=5).read())
        daemon.send_signal(signal.SIGTERM)
        rc, _, err = finish(daemon)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        sub.close()
    assert rc == 0, err[-2000:]
    assert ready["ok"] is True and ready["state"] == "ready"

    def value(name: str) -> float:
        return sum(float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith(name))

    assert value("thzedge_frames_received_total") >= 10
    assert value("thzedge_frames_processed_total") >= 10
    assert value('thzedge_results_published_total{status="ok"}') >= 10
    assert value('thzedge_stage_duration_seconds_count{stage="infer"}') >= 10
    assert value("thzedge_end_to_end_latency_seconds_count") >= 10
    assert 'thzedge_state{thzedge_state="ready"} 1.0' in metrics
