"""A hostile scanner message must not cut the daemon off from its scanner for good (issue 14,
failures 1 and 2). Real PUSH/PULL sockets over ipc; waits are count-based with generous limits.
"""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from scanner_io.codec import MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES, MalformedFrame, encode_frame
from scanner_io.frame import Frame, FrameHeader
from scanner_io.sources import MAX_MESSAGE_BYTES, MAX_PARTS, open_source

pytestmark = pytest.mark.timeout(240)


def _frame(seq: int) -> list[bytes]:
    header = FrameHeader(scanner="rec0", seq=seq, t_capture_ns=time.time_ns(), shape=(16, 16), dtype="uint16")
    return [bytes(memoryview(p)) for p in encode_frame(header, np.full((16, 16), seq, np.uint16))]


def _push(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(endpoint)
    return s


def _read_until(src, want, seconds: float = 120.0, feed=None) -> list:
    got: list = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not want(got):
        if feed is not None:
            feed()
        item = src.read(0.2)
        if item is not None:
            got.append(item)
    return got


@pytest.mark.parametrize("restart", [False, True], ids=["scanner stays", "scanner restarts"])
def test_an_oversize_part_does_not_cut_the_source_off_for_good(tmp_path: Path, restart: bool) -> None:
    endpoint = f"ipc://{tmp_path}/scanner.sock"
    ctx = zmq.Context()
    push = _push(ctx, endpoint)
    src = open_source(f"{endpoint}?reconnect_max_ms=500")
    try:
        push.send_multipart(_frame(0))
        assert isinstance(_read_until(src, lambda g: g)[0], Frame)
        # One part over MAXMSGSIZE: libzmq drops the peer (and did not reconnect to it).
        push.send_multipart([b"frame/rec0", b"{}", bytes(MAX_PAYLOAD_BYTES + MAX_HEADER_BYTES + 1)])
        if restart:
            time.sleep(0.5)
            push.close(0)
            push = _push(ctx, endpoint)
        seq = [1]

        def feed() -> None:  # the scanner keeps sending; NOBLOCK: it drops while nobody is connected
            try:
                push.send_multipart(_frame(seq[0]), zmq.NOBLOCK)
                seq[0] += 1
            except zmq.Again:
                pass

        got = _read_until(src, lambda g: any(isinstance(i, Frame) for i in g), feed=feed)
        assert any(isinstance(i, Frame) for i in got), src.stats.to_dict()
        assert src.stats.recreated >= 1 and src.stats.disconnects >= 1  # the event is counted
        assert src.state == "up"
    finally:
        src.close()
        push.close(0)
        ctx.term()


def test_whole_messages_are_bounded_in_parts_and_bytes(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/scanner.sock"
    ctx = zmq.Context()
    push = _push(ctx, endpoint)
    src = open_source(endpoint)
    big = bytes(MAX_PAYLOAD_BYTES)  # each part within the per-part limit
    try:
        msgs = [
            _frame(0),
            [b"frame/rec0"] + [b"x" * 1024] * 31,  # 32 parts
            [b"frame/rec0", big, big],  # 3 parts, 128 MiB in all
            _frame(1),
        ]
        sender = threading.Thread(target=lambda: [push.send_multipart(m) for m in msgs], daemon=True)
        sender.start()
        got = _read_until(src, lambda g: len(g) >= 4)
        sender.join(30)
        assert [type(i).__name__ for i in got] == ["Frame", "MalformedFrame", "MalformedFrame", "Frame"]
        assert [i.reason for i in got if isinstance(i, MalformedFrame)] == ["bad_parts", "too_large"]
        assert src.stats.malformed == {"bad_parts": 1, "too_large": 1}
        assert MAX_PARTS == 3 and MAX_MESSAGE_BYTES < 2 * MAX_PAYLOAD_BYTES
    finally:
        src.close()
        push.close(0)
        ctx.term()


def test_a_source_that_cannot_recover_stops_the_daemon_with_exit_69(
    tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instead of `stalled` forever with the watchdog fed: the run ends with SourceUnavailableError."""
    from edge.pipeline.assemble import RunOptions, run_daemon
    from scanner_io.errors import SourceUnavailableError
    from scanner_io.sources import ZmqSource

    endpoint = f"ipc://{tmp_path}/scanner.sock"
    ctx = zmq.Context()
    push = _push(ctx, endpoint)
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text("[metrics]\nenabled = false\n[calibration]\nallow_uncalibrated = true\n")

    def on_ready(_daemon: object) -> None:
        def cannot_open(self: ZmqSource) -> None:
            raise zmq.ZMQError(errno.EMFILE, "too many open files")

        # The fault: no new socket can be made (file descriptors exhausted), then the peer goes.
        monkeypatch.setattr(ZmqSource, "_open", cannot_open)
        push.send_multipart(_frame(0))
        time.sleep(1.0)
        push.close(0)

    try:
        with pytest.raises(SourceUnavailableError, match="cannot recover") as info:
            run_daemon(
                RunOptions(
                    source=f"{endpoint}?reconnect_max_ms=200",
                    model=tiny_bundle,
                    config=cfg,
                    publish=f"ipc://{tmp_path}/results.sock",
                ),
                on_ready=on_ready,
            )
        assert info.value.exit_code == 69
    finally:
        if not push.closed:
            push.close(0)
        ctx.term()


def _peak_rss_mb(query: str, parts: int, part_bytes: int) -> dict:
    """Run benchmarks/bench_message_memory.py in a fresh process: the receiver's RSS before/peak."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "benchmarks" / "bench_message_memory.py")]
    cmd += ["--parts", str(parts), "--part-bytes", str(part_bytes), "--query", query]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_32_part_message_of_32_mib_parts_does_not_raise_rss_when_frames_are_bounded() -> None:
    """libzmq assembles the whole message before Python sees it; only MAXMSGSIZE (per part) and the
    part count bound it. With max_frame_bytes set to a 64x64 frame's bytes the first 32 MiB part
    makes libzmq drop the peer before allocating it; the source recreates its socket and reads on.
    Before the bound (MAXMSGSIZE 64 MiB for every link) this raised RSS by ~1 GB."""
    got = _peak_rss_mb("max_frame_bytes=16384&reconnect_max_ms=200", 32, 32 * 1024 * 1024)
    assert got["seen"].count("Frame") >= 2, got  # the stream went on after the hostile message
    assert got["peak_after_mb"] - got["peak_before_mb"] < 64, got  # was ~1024 MB
    assert got["recreated"] >= 1, got  # the dropped peer was got back by a new socket


def test_max_frame_bytes_rejects_larger_payloads_and_bad_values(tmp_path: Path) -> None:
    from scanner_io.errors import ConfigError

    endpoint = f"ipc://{tmp_path}/scanner.sock"
    ctx = zmq.Context()
    push = _push(ctx, endpoint)
    src = open_source(f"{endpoint}?max_frame_bytes=256")  # below the 16 KiB header bound
    try:
        push.send_multipart(_frame(0))  # 16x16 uint16: 512 bytes > 256
        header = FrameHeader(scanner="rec0", seq=1, t_capture_ns=time.time_ns(), shape=(8, 8), dtype="uint16")
        push.send_multipart([bytes(memoryview(p)) for p in encode_frame(header, np.zeros((8, 8), np.uint16))])
        got = _read_until(src, lambda g: len(g) >= 2, seconds=30)
        assert [getattr(i, "reason", "Frame") for i in got] == ["too_large", "Frame"]
    finally:
        src.close()
        push.close(0)
        ctx.term()
    for bad in (0, MAX_PAYLOAD_BYTES + 1):
        with pytest.raises(ConfigError, match="max_frame_bytes"):
            open_source(f"{endpoint}?max_frame_bytes={bad}")


def test_the_daemon_bounds_a_scanner_link_by_its_profile(tmp_path: Path) -> None:
    from calibration.profile import CalibrationProfile
    from edge.config import CalibrationConfig, SourceConfig
    from edge.pipeline.assemble import bound_frame_bytes, stream_profile

    shape = (64, 64)
    zeros = np.zeros(shape, np.float32)
    prof = CalibrationProfile("rec0", shape, zeros, zeros + 1, np.zeros(shape, bool))
    saved = prof.save(tmp_path / "profile")
    src = SourceConfig(uri="ipc:///run/x.sock", calibration=saved, name="s0")
    cal = CalibrationConfig(state_dir=tmp_path / "state")
    # 4 x 64*64*4: frames up to 128x128 still reach the shape check (exit 78, failure 8)
    got = stream_profile(src, cal).profile  # the daemon's rule picks the configured profile
    assert bound_frame_bytes(src.uri, got) == "ipc:///run/x.sock?max_frame_bytes=65536"
    assert bound_frame_bytes("ipc:///run/x.sock?hwm=2", got).endswith("?hwm=2&max_frame_bytes=65536")
    assert bound_frame_bytes("ipc:///x?max_frame_bytes=9", got) == "ipc:///x?max_frame_bytes=9"
    bare = SourceConfig(uri="ipc:///run/x.sock", name="s1")
    none = stream_profile(bare, cal).profile
    assert bound_frame_bytes(bare.uri, none) == bare.uri  # no profile: the codec's 64 MiB
