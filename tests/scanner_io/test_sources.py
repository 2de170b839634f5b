"""Sources over real sockets: emulator → tcp/ipc source round trips, gaps, malformed frames,
state, backpressure, and URI handling."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import zmq

from scanner_io.codec import encode_frame
from scanner_io.emulator import EmulatorSettings, EmulatorStats, serve, source_uri_for
from scanner_io.errors import ConfigError, SourceUnavailableError
from scanner_io.frame import Frame
from scanner_io.sources import MalformedFrame, Source, ZmqSource, open_source
from tests.scanner_io.conftest import synthetic_frames, wait_for


class ListSource(Source):
    """Frames from a list, lockstep or live; the emulator's input in these tests."""

    def __init__(self, frames: list[Frame], live: bool = False) -> None:
        super().__init__("list")
        self.live = live
        self._frames = list(frames)

    @property
    def exhausted(self) -> bool:
        return not self._frames

    def read(self, timeout_s: float) -> Frame | MalformedFrame | None:
        return self._frames.pop(0) if self._frames else None


class EmulatorThread:
    """Runs `serve` in its own thread (its socket is created, used and closed there)."""

    def __init__(self, source: Source, settings: EmulatorSettings) -> None:
        self.stop = threading.Event()
        self.stats: EmulatorStats | None = None
        self.bound = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source, settings), daemon=True)
        self._thread.start()
        assert self.bound.wait(5)

    def _run(self, source: Source, settings: EmulatorSettings) -> None:
        self.stats = serve(source, settings, stop=self.stop, on_bound=lambda ep: self.bound.set())

    def join(self, timeout: float = 10) -> EmulatorStats:
        self._thread.join(timeout)
        assert not self._thread.is_alive()
        assert self.stats is not None
        return self.stats

    def close(self) -> None:
        self.stop.set()
        self._thread.join(5)


@pytest.fixture
def emulators(zmq_ctx) -> Iterator[list[EmulatorThread]]:
    started: list[EmulatorThread] = []
    yield started
    for emu in started:
        emu.close()


@pytest.fixture
def sources(zmq_ctx) -> Iterator[list[Source]]:
    opened: list[Source] = []
    yield opened
    for src in opened:
        src.close()


def _read_n(src: Source, n: int, timeout: float = 10.0) -> list[Frame | MalformedFrame]:
    out: list[Frame | MalformedFrame] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        item = src.read(0.2)
        if item is not None:
            out.append(item)
    return out


@pytest.mark.parametrize("kind", ["tcp", "ipc"])
def test_emulator_to_source_round_trip_is_bit_exact(
    kind, tcp_endpoint, ipc_endpoint, emulators, sources
) -> None:
    endpoint = tcp_endpoint if kind == "tcp" else ipc_endpoint
    frames = synthetic_frames(40) + synthetic_frames(
        5, shape=(8, 16, 4), dtype="float32", seed=1, start_seq=40
    )
    src = open_source(endpoint)
    sources.append(src)
    assert isinstance(src, ZmqSource) and src.live
    emulators.append(EmulatorThread(ListSource(frames), EmulatorSettings(bind=endpoint, rate="max")))
    got = _read_n(src, len(frames))
    stats = emulators[0].join()
    assert stats.sent == len(frames) and not stats.dropped
    assert len(got) == len(frames)
    for sent, recv in zip(frames, got, strict=True):
        assert isinstance(recv, Frame)
        assert recv.header == sent.header
        assert recv.data.dtype == sent.data.dtype and recv.data.tobytes() == sent.data.tobytes()
    assert src.stats.received == len(frames)
    assert src.stats.upstream_gaps == 0 and src.stats.malformed_total == 0
    # After the last frame the emulator said the stream is over: the source has ended.
    assert not src.exhausted and src.read(5.0) is None
    assert src.exhausted and src.state == "ended" and src.end is not None
    assert (src.end.scanner, src.end.last_seq, src.end.frames) == ("scanner0", 44, 45)


def test_sequence_gaps_are_counted_as_upstream_losses(tcp_endpoint, emulators, sources) -> None:
    src = open_source(tcp_endpoint)
    sources.append(src)
    emulators.append(
        EmulatorThread(
            ListSource(synthetic_frames(30, shape=(16, 16))),
            EmulatorSettings(bind=tcp_endpoint, rate="max", skip_every=4),
        )
    )
    got = _read_n(src, 23)
    stats = emulators[0].join()
    assert stats.skipped == 7 and stats.sent == 23 and len(got) == 23
    # Skipped seqs 3, 7, …, 27 leave 7 holes; the last frame (29) arrives, so all are seen.
    assert src.stats.upstream_gaps == 7
    assert src.stats.received + src.stats.upstream_gaps == 30


def test_malformed_messages_are_rejected_with_reason_and_the_stream_continues(
    tcp_endpoint, emulators, sources
) -> None:
    src = open_source(tcp_endpoint)
    sources.append(src)
    frames = synthetic_frames(24, shape=(16, 16))
    emulators.append(
        EmulatorThread(
            ListSource(frames), EmulatorSettings(bind=tcp_endpoint, rate="max", inject_malformed_every=4)
        )
    )
    got = _read_n(src, 24)
    emulators[0].join()
    bad = [g for g in got if isinstance(g, MalformedFrame)]
    good = [g for g in got if isinstance(g, Frame)]
    assert len(bad) == 6 and len(good) == 18
    assert {b.reason for b in bad} == {"size_mismatch", "bad_dtype", "bad_version"}
    assert all(b.seq is not None and b.seq % 4 == 3 for b in bad)
    assert src.stats.malformed == {"size_mismatch": 2, "bad_dtype": 2, "bad_version": 2}
    # Rejected frames keep their place in the sequence: no false upstream gaps.
    assert src.stats.upstream_gaps == 0
    by_seq = {f.header.seq: f for f in frames}
    assert all(g.data.tobytes() == by_seq[g.header.seq].data.tobytes() for g in good)


def test_raw_garbage_from_a_peer_is_rejected_and_the_next_frame_still_arrives(
    tcp_endpoint, zmq_ctx, sources
) -> None:
    push = zmq_ctx.socket(zmq.PUSH)
    try:
        push.setsockopt(zmq.LINGER, 0)
        push.bind(tcp_endpoint)
        src = open_source(tcp_endpoint)
        sources.append(src)
        (frame,) = synthetic_frames(1, shape=(4, 4))
        topic, header, payload = encode_frame(frame.header, frame.data)
        push.send_multipart([b"only one part"])
        push.send_multipart([b"frame/scanner0", b"{not json", b""])
        push.send_multipart([topic, header, bytes(payload) + b"x"])
        push.send_multipart([b"frame/other", header, bytes(payload)])
        push.send_multipart([topic, header, payload])
        got = _read_n(src, 5)
    finally:
        push.close(0)
    assert [g.reason for g in got[:4]] == ["bad_parts", "bad_json", "size_mismatch", "topic_mismatch"]
    assert got[2].seq == 0
    assert isinstance(got[4], Frame) and got[4].data.tobytes() == frame.data.tobytes()


def test_state_goes_down_up_stalled_down(tcp_endpoint, zmq_ctx, sources) -> None:
    src = open_source(tcp_endpoint + "?stall_s=0.3&reconnect_max_ms=200")
    sources.append(src)
    assert src.state == "down"  # nothing bound yet: the source keeps trying, it does not fail
    push = zmq_ctx.socket(zmq.PUSH)
    try:
        push.setsockopt(zmq.LINGER, 0)
        push.bind(tcp_endpoint)
        assert wait_for(lambda: src.state == "up")
        (frame,) = synthetic_frames(1, shape=(4, 4))
        push.send_multipart(encode_frame(frame.header, frame.data))
        assert isinstance(src.read(5), Frame)
        assert wait_for(lambda: src.state == "stalled", timeout=5)
    finally:
        push.close(0)
    assert wait_for(lambda: src.state == "down", timeout=5)
    assert src.stats.connects == 1 and src.stats.disconnects == 1
    src.close()
    assert src.state == "ended"


def test_live_emulator_never_blocks_on_a_stalled_consumer(tcp_endpoint, emulators, sources) -> None:
    src = open_source(tcp_endpoint + "?hwm=2")
    sources.append(src)
    # 600 frames of 128 KiB (zero-copy sends) sharing one buffer: ~77 MiB, far more than the
    # HWMs and kernel socket buffers can hold, so a consumer that reads nothing forces drops.
    (proto,) = synthetic_frames(1, shape=(256, 256))
    frames = [Frame(replace(proto.header, seq=i), proto.data) for i in range(600)]
    emu = EmulatorThread(
        ListSource(frames, live=True), EmulatorSettings(bind=tcp_endpoint, rate=2000.0, sndhwm=2)
    )
    emulators.append(emu)
    assert wait_for(lambda: src.state == "up")
    stats = emu.join(timeout=30)  # returns although the consumer reads nothing meanwhile
    dropped = sum(stats.dropped.values())
    assert stats.sent + dropped == 600 and dropped > 0 and set(stats.dropped) == {"backpressure"}
    got = []
    while (item := src.read(0.5)) is not None:
        got.append(item)
    assert 0 < len(got) <= stats.sent
    assert all(g.data.tobytes() == proto.data.tobytes() for g in got[:5])
    # What the scanner dropped shows up here as upstream gaps, frame for frame.
    last = max(g.header.seq for g in got)
    first = min(g.header.seq for g in got)
    assert src.stats.received + src.stats.upstream_gaps == last - first + 1
    assert src.stats.upstream_gaps > 0


def test_lockstep_emulator_drops_nothing_for_a_slow_consumer(ipc_endpoint, emulators, sources) -> None:
    src = open_source(ipc_endpoint + "?hwm=1")
    sources.append(src)
    frames = synthetic_frames(30, shape=(64, 64))
    emulators.append(
        EmulatorThread(ListSource(frames), EmulatorSettings(bind=ipc_endpoint, rate="max", sndhwm=1))
    )
    got = []
    for _ in range(30):
        time.sleep(0.005)  # slower than the sender
        item = src.read(5)
        assert item is not None
        got.append(item)
    stats = emulators[0].join()
    assert stats.sent == 30 and not stats.dropped
    assert [g.header.seq for g in got] == list(range(30))


def test_named_sources_resolve_and_unknown_names_list_the_known_ones(tcp_endpoint, sources) -> None:
    src = open_source("scanner0", names={"scanner0": tcp_endpoint, "scanner1": "ipc:///tmp/x"})
    sources.append(src)
    assert src.uri == tcp_endpoint
    with pytest.raises(SourceUnavailableError, match="scanner0, scanner1") as info:
        open_source("scaner0", names={"scanner0": tcp_endpoint, "scanner1": "ipc:///tmp/x"})
    assert "did you mean 'scanner0'" in str(info.value)
    with pytest.raises(SourceUnavailableError, match="none configured"):
        open_source("scanner7")
    with pytest.raises(SourceUnavailableError, match="unsupported source"):
        open_source("gige://1234")


@pytest.mark.parametrize(
    "uri",
    [
        "replay:x.mcap?rat=2",
        "replay:x.mcap?rate=-1",
        "replay:x.mcap?rate=fast",
        "sim?fps=0",
        "tcp://127.0.0.1:1?hwm=0",
        "replay:?rate=1",
    ],
)
def test_bad_uri_parameters_are_config_errors(uri: str) -> None:
    with pytest.raises(ConfigError):
        open_source(uri)


def test_missing_recording_is_unavailable(tmp_path) -> None:
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        open_source(f"replay:{tmp_path}/nope.mcap")


def test_emulator_source_uri_pacing() -> None:
    assert source_uri_for("sim", None) == "sim?fps=30.0"
    assert source_uri_for("sim?seed=3&fps=5", 100.0) == "sim?seed=3"
    assert source_uri_for("replay:a.mcap?loop=2", "max") == "replay:a.mcap?loop=2&rate=max"
    assert source_uri_for("replay:a.mcap", None) == "replay:a.mcap"


def test_stats_are_json_ready(tcp_endpoint, sources) -> None:
    src = open_source(tcp_endpoint)
    sources.append(src)
    assert json.loads(json.dumps(src.stats.to_dict()))["received"] == 0
    assert np.isscalar(src.stats.malformed_total)


def test_source_reconnects_after_the_emulator_process_is_killed_and_restarted(
    tmp_path, tcp_endpoint, sources
) -> None:
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from scanner_io.recording import Recorder

    repo = Path(__file__).resolve().parents[2]
    recording = tmp_path / "loop.mcap"
    with Recorder(recording) as rec:
        for f in synthetic_frames(20, shape=(32, 32)):
            rec.write(f)
    cmd = [
        sys.executable,
        "-m",
        "edge",
        "scanner",
        "serve",
        "--source",
        f"replay:{recording}?loop=0",
        "--bind",
        tcp_endpoint,
        "--rate",
        "200",
    ]
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    src = open_source(tcp_endpoint + "?reconnect_max_ms=300")
    sources.append(src)
    server = start()
    try:
        first = _read_n(src, 30, timeout=20)
        assert len(first) == 30 and all(isinstance(f, Frame) for f in first)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        assert wait_for(lambda: src.state == "down", timeout=10)
        while src.read(0.1) is not None:  # drain what arrived before the kill
            pass
        server = start()
        again = _read_n(src, 10, timeout=20)
        assert len(again) == 10 and all(isinstance(f, Frame) for f in again)
        assert src.state == "up"
    finally:
        server.kill()
        server.wait(10)
    assert src.stats.connects >= 2 and src.stats.disconnects >= 1
    # A restarted scanner (and each loop of the replay) starts its seq again: a reset, not a gap.
    # (Live frames the scanner dropped while nobody was connected may still show up as gaps.)
    assert src.stats.seq_resets >= 1


def test_cli_scanner_serve_streams_the_simulator(tmp_path, ipc_endpoint, sources) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    from scanner_io.simulator import ScannerSimulator

    repo = Path(__file__).resolve().parents[2]
    src = open_source(ipc_endpoint)
    sources.append(src)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge",
            "--json",
            "scanner",
            "serve",
            "--source",
            "sim?seed=5&identities=3",
            "--bind",
            ipc_endpoint,
            "--rate",
            "max",
            "--frames",
            "6",
        ],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        got = _read_n(src, 6, timeout=60)
        out, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(5)
    assert server.returncode == 0, err
    assert json.loads(out)["sent"] == 6
    # The frames on the wire are exactly the simulator's for the same seed (capture times are
    # the wall clock, so they differ).
    sim = ScannerSimulator(seed=5, identities=3)
    for item in got:
        expected = sim.next_frame()
        assert isinstance(item, Frame)
        assert replace(item.header, t_capture_ns=0) == replace(expected.header, t_capture_ns=0)
        assert item.data.tobytes() == expected.data.tobytes()


def test_split_queue_mode_takes_the_consumers_mode_off_a_zmq_uri() -> None:
    from scanner_io.sources import QueuePolicy, split_queue_mode

    assert split_queue_mode("tcp://127.0.0.1:5710?mode=lockstep&hwm=4") == (
        "tcp://127.0.0.1:5710?hwm=4",
        QueuePolicy.block,
    )
    assert split_queue_mode("ipc:///run/s.sock?mode=live") == ("ipc:///run/s.sock", QueuePolicy.drop_oldest)
    assert split_queue_mode("tcp://127.0.0.1:5710") == ("tcp://127.0.0.1:5710", QueuePolicy.auto)
    assert split_queue_mode("replay:x.mcap?rate=max") == ("replay:x.mcap?rate=max", QueuePolicy.auto)
    with pytest.raises(ConfigError, match="mode=live or mode=lockstep"):
        split_queue_mode("tcp://127.0.0.1:5710?mode=fast")


def test_end_of_stream_ends_the_source_after_the_frames_before_it(
    ipc_endpoint, zmq_ctx, sources, caplog
) -> None:
    from scanner_io.codec import EndOfStream, encode_end_of_stream

    push = zmq_ctx.socket(zmq.PUSH)
    try:
        push.setsockopt(zmq.LINGER, 0)
        push.bind(ipc_endpoint)
        src = open_source(ipc_endpoint)
        sources.append(src)
        frames = synthetic_frames(10, shape=(4, 4))  # more than the hand-off queue holds
        for f in frames[:6]:
            push.send_multipart(encode_frame(f.header, f.data))
        push.send_multipart([b"pause/scanner0", b'{"v":1}', b""])  # a message kind this receiver lacks
        # The scanner captured 8 frames (seq 0..7) but the last two never reached the wire.
        push.send_multipart(encode_end_of_stream(EndOfStream("scanner0", last_seq=7, frames=6)))
        for f in frames[6:]:
            push.send_multipart(encode_frame(f.header, f.data))  # after the end: never read
        got: list[Frame | MalformedFrame] = []
        deadline = time.monotonic() + 10
        while not src.exhausted and time.monotonic() < deadline:
            assert src.state != "ended"
            item = src.read(0.2)
            if item is not None:
                got.append(item)
    finally:
        push.close(0)
    assert src.exhausted and src.state == "ended"
    assert [g.header.seq for g in got if isinstance(g, Frame)] == list(range(6))
    assert [g.reason for g in got if isinstance(g, MalformedFrame)] == ["bad_topic"]
    assert src.stats.malformed == {"bad_topic": 1}
    assert src.end == EndOfStream("scanner0", last_seq=7, frames=6)
    assert src.read(0.2) is None  # nothing after the end
    assert "the last 2 frame(s) before the end did not arrive" in caplog.text
    assert list(src) == []  # iteration ends too
