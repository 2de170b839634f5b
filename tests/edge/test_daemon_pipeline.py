"""The daemon's loop run in-process to completion: queue policy, per-task failures, watchdog gating.

These use the real `Daemon` (real stages, real ONNX Runtime runner, real XPUB socket over ipc,
real sd_notify datagrams) with a scripted source, so a fault can be placed on one exact frame.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from edge.pipeline.context import DaemonSettings, ModelInfo, ProcessingContext, QueuedFrame
from edge.pipeline.queues import FrameQueue
from scanner_io.frame import Frame, FrameHeader

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def runner(tiny_bundle: Path) -> Any:
    from edge.runner import Runner

    r = Runner.from_bundle(tiny_bundle, backend="ort")
    yield r
    r.close()


def make_frame(seq: int, value: int | None = None) -> Frame:
    rng = np.random.default_rng(seq)
    data = rng.integers(100, 4000, size=(96, 96), dtype=np.uint16)
    if value is not None:
        data[:] = value
    return Frame(
        FrameHeader(scanner="t0", seq=seq, t_capture_ns=time.time_ns(), shape=(96, 96), dtype="uint16"), data
    )


class ScriptedSource:
    """A source that plays a list of items; `None` items are silences (a read timing out)."""

    def __init__(self, items: list[Any], live: bool = False, hold: threading.Event | None = None) -> None:
        self.items = list(items)
        self.live = live
        self.hold = hold  # while set... nothing; while clear, the source is silent
        self.closed = False

    @property
    def exhausted(self) -> bool:
        return not self.items

    @property
    def state(self) -> str:
        return "ended" if self.exhausted else "up"

    def read(self, timeout_s: float) -> Any:
        if self.hold is not None and not self.hold.is_set():
            time.sleep(timeout_s)
            return None
        if not self.items:
            return None
        item = self.items.pop(0)
        if item is None or self.live:
            time.sleep(timeout_s)  # a silence; or a live source's pacing: one frame per poll
        return item

    def calibration(self) -> None:
        return None  # a scripted stream carries no calibration

    def sensor_maps(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def identity_context(generation: int, source_profile: Any = None) -> ProcessingContext:
    return ProcessingContext(profile=None, params=None, calibration_id="identity", generation=generation)


def collect(
    endpoint: str, stop: threading.Event, out: list[dict], topics: tuple[bytes, ...] = (b"result/",)
) -> threading.Thread:
    import json

    def run() -> None:
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        for topic in topics:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        sub.connect(endpoint)
        while not stop.is_set():
            if sub.poll(50):
                parts = sub.recv_multipart()
                out.append(json.loads(parts[1]))
        sub.close(0)
        ctx.term()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_the_test_doubles_satisfy_the_pipeline_protocols(runner: Any) -> None:
    from edge.runner import ModelRunner
    from scanner_io.sources import FrameSource

    assert isinstance(ScriptedSource([]), FrameSource)
    for fake in (PoisonRunner(runner, np.zeros((64, 64))), HangingRunner(runner), SlowOrBrokenRunner(runner)):
        assert isinstance(fake, ModelRunner)
    assert isinstance(runner, ModelRunner)


def test_frame_queue_drop_oldest_and_block() -> None:
    stop = threading.Event()
    q = FrameQueue(2, block_when_full=False)
    items = [QueuedFrame(make_frame(i), 0.0) for i in range(3)]
    assert q.put(items[0], stop) is None and q.put(items[1], stop) is None
    assert q.put(items[2], stop) is items[0]  # the oldest goes
    assert [x.frame.seq for x in q.get_batch(8, 0.01)] == [1, 2]
    b = FrameQueue(1, block_when_full=True)
    assert b.put(items[0], stop) is None
    stop.set()
    assert b.put(items[1], stop) is items[1]  # blocked, then stopped: handed back to be counted


def test_stage_metrics_observe_each_label_once_per_frame() -> None:
    from edge.observability import DaemonMetrics
    from edge.pipeline.metrics import Metrics
    from edge.results import FrameResult, Provenance

    m = DaemonMetrics()
    r = FrameResult("t0", 1, 0, "ok", Provenance("b", "fp32", "ort", "identity"))
    r.latency_ms.update({"encode": 4.0, "verify": 1.0, "reconstruct": 2.0, "total": 9.0})
    Metrics(m).published(r)
    post = {"stage": "postprocess"}
    assert m.value("thzedge_stage_duration_seconds_count", post) == 1  # verify + reconstruct: one frame
    assert m.value("thzedge_stage_duration_seconds_sum", post) == pytest.approx(0.003)
    assert m.value("thzedge_stage_duration_seconds_count", {"stage": "infer"}) == 1
    assert m.value("thzedge_results_published_total", {"status": "ok"}) == 1


class PoisonRunner:
    """The real runner, but reconstruction raises for frames whose input equals `poison`."""

    def __init__(self, inner: Any, poison: np.ndarray) -> None:
        self.inner = inner
        self.poison = poison
        self.max_batch = inner.max_batch
        self.postures = inner.postures
        self.backend = inner.backend

    def encode(self, x: np.ndarray) -> Any:
        enc = self.inner.encode(x)
        enc.features["poison"] = np.array([np.array_equal(row[0], self.poison) for row in x])
        return enc

    def reconstruct(self, enc: Any, postures: np.ndarray) -> np.ndarray:
        if "poison" in enc.features and enc.features["poison"].any():
            raise RuntimeError("decoder failed")
        return self.inner.reconstruct(enc, postures)


def test_a_failing_task_marks_only_its_frame_partial(runner: Any, tmp_path: Path) -> None:
    from calibration.conditioning import calibrate_and_condition
    from edge.pipeline.daemon import Daemon

    poison_frame = make_frame(5, value=3000)
    poison = calibrate_and_condition(poison_frame.data, None)
    frames = [make_frame(i) for i in range(5)] + [poison_frame] + [make_frame(i) for i in range(6, 12)]
    endpoint = f"ipc://{tmp_path}/r.sock"
    got: list[dict] = []
    stop = threading.Event()
    # Lockstep source: no frame flows before the subscriber has joined.
    src = ScriptedSource(frames, live=False)
    settings = DaemonSettings(endpoint=endpoint, poll_s=0.02, wait_subscriber_s=30.0)
    t = collect(endpoint, stop, got)
    daemon = Daemon(
        settings,
        PoisonRunner(runner, poison),
        lambda: src,
        identity_context,
        model=ModelInfo(bundle="b", backend="ort", precision="fp32"),
    )
    summary = daemon.run()
    time.sleep(0.3)
    stop.set()
    t.join(5)
    assert summary.published == 12 and summary.unaccounted == 0 and summary.partial == 1
    by_seq = {h["seq"]: h for h in got}
    assert sorted(by_seq) == list(range(12))
    bad = by_seq[5]
    assert bad["status"] == "partial" and bad["posture"] is not None
    assert bad["errors"] == [{"task": "reconstruct", "error": "RuntimeError: decoder failed"}]
    assert all(by_seq[s]["status"] == "ok" for s in range(12) if s != 5)


class HangingRunner:
    """The real runner until `hang` is set: then encode blocks (a stuck backend call)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.max_batch = inner.max_batch
        self.postures = inner.postures
        self.hang = threading.Event()
        self.release = threading.Event()

    def encode(self, x: np.ndarray) -> Any:
        if self.hang.is_set():
            self.release.wait(30)
        return self.inner.encode(x)

    def reconstruct(self, enc: Any, postures: np.ndarray) -> np.ndarray:
        return self.inner.reconstruct(enc, postures)


def test_watchdog_pings_continue_while_the_source_is_silent_and_stop_when_inference_hangs(
    runner: Any, tmp_path: Path
) -> None:
    from edge.pipeline.daemon import Daemon
    from edge.sdnotify import Notifier

    path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(path)
    ns.settimeout(0.05)
    notifier = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})  # ping every 0.2 s
    hold = threading.Event()
    src = ScriptedSource([make_frame(i) for i in range(200)], live=True, hold=hold)
    hr = HangingRunner(runner)
    settings = DaemonSettings(
        endpoint=f"ipc://{tmp_path}/r.sock",
        poll_s=0.02,
        heartbeat_timeout_s=0.4,
        stalled_after_s=0.3,
        stop_timeout_s=1.0,
    )
    daemon = Daemon(settings, hr, lambda: src, identity_context, notifier=notifier)
    msgs: list[tuple[float, str]] = []

    def drain(seconds: float) -> list[str]:
        end = time.monotonic() + seconds
        out = []
        while time.monotonic() < end:
            try:
                m = ns.recv(4096).decode()
            except TimeoutError:
                continue
            msgs.append((time.monotonic(), m))
            out.extend(m.splitlines())
        return out

    result: dict[str, Any] = {}
    th = threading.Thread(target=lambda: result.setdefault("summary", daemon.run()), daemon=True)
    th.start()
    try:
        assert daemon.ready.wait(30)
        # 1. A silent source: the loop still cycles, so pings go on, and STATUS says stalled.
        silent = drain(1.5)
        assert silent.count("WATCHDOG=1") >= 4, silent
        assert any(ln.startswith("STATUS=stalled") for ln in silent), silent
        # 2. Frames flow, then the backend hangs inside encode: pings stop, state degraded.
        hold.set()
        drain(0.5)
        hr.hang.set()
        drain(1.0)  # heartbeat goes stale after 0.4 s
        hung = drain(1.5)
        assert "WATCHDOG=1" not in hung, hung
        assert daemon.state_name == "degraded"
    finally:
        hr.release.set()
        daemon.request_stop()
        th.join(15)
        ns.close()
    assert not th.is_alive()
    assert result["summary"].unaccounted == 0


class SlowOrBrokenRunner:
    """The real runner, slowed down; and one encode call returning a malformed output."""

    def __init__(self, inner: Any, delay_s: float = 0.0, break_call: int | None = None) -> None:
        self.inner = inner
        self.max_batch = inner.max_batch
        self.postures = inner.postures
        self.delay_s = delay_s
        self.break_call = break_call
        self.calls = 0

    def encode(self, x: np.ndarray) -> Any:
        self.calls += 1
        time.sleep(self.delay_s)
        enc = self.inner.encode(x)
        if self.calls == self.break_call:
            enc.posture_logits = enc.posture_logits[:0]  # a backend bug: rows missing
        return enc

    def reconstruct(self, enc: Any, postures: np.ndarray) -> np.ndarray:
        return self.inner.reconstruct(enc, postures)


def test_stale_frames_and_an_inference_bug_are_counted_not_lost(runner: Any, tmp_path: Path) -> None:
    from edge.pipeline.daemon import Daemon

    # Live source faster than inference: frames wait, the old ones are dropped as stale.
    src = ScriptedSource([make_frame(i) for i in range(60)], live=True)
    slow = SlowOrBrokenRunner(runner, delay_s=0.15, break_call=2)  # call 1 is the warm-up
    settings = DaemonSettings(endpoint=f"ipc://{tmp_path}/r.sock", poll_s=0.02, max_age_s=0.1, queue_size=60)
    summary = Daemon(settings, slow, lambda: src, identity_context).run()
    assert summary.frames_in == 60
    assert summary.dropped["stale"] > 0
    assert summary.dropped["task_error"] >= 1
    assert summary.unaccounted == 0
    assert summary.published + summary.dropped["stale"] + summary.dropped["task_error"] == 60
    assert slow.calls > 2 and summary.published > 0  # inference went on after the broken batch


def test_without_a_model_the_demo_bundle_is_used_and_announced(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import edge.bundle
    from edge.pipeline.assemble import RunOptions, run_daemon

    # Stand-in for the shipped demo bundle (edge/demo_bundle), whichever bundle is installed there.
    monkeypatch.setattr(edge.bundle, "demo_bundle_path", lambda: tiny_bundle)
    cfg = tmp_path / "thzedge.toml"
    cfg.write_text("[metrics]\nenabled = false\n")
    with caplog.at_level("WARNING", logger="thzedge.daemon"):
        summary = run_daemon(
            RunOptions(source="sim?frames=5", config=cfg, publish=f"ipc://{tmp_path}/r.sock", max_frames=4)
        )
    assert summary.frames_in == 4 and summary.published == 4 and summary.exit_reason == "max_frames"
    assert any("demo model" in r.getMessage() and "simulated" in r.getMessage() for r in caplog.records)


def test_a_bad_queue_mode_is_a_config_error_before_the_model_loads(tmp_path: Path) -> None:
    from edge.pipeline.assemble import RunOptions, run_daemon
    from scanner_io.errors import ConfigError

    cfg = tmp_path / "thzedge.toml"
    cfg.write_text("[metrics]\nenabled = false\n[daemon]\ninsecure_dev = true\n")
    # The model path does not exist: the mode is checked first, so the error names the mode.
    with pytest.raises(ConfigError, match="expected mode=live or mode=lockstep"):
        run_daemon(RunOptions(source="tcp://127.0.0.1:5999?mode=fast", config=cfg, model=tmp_path / "none"))


def test_a_recording_calibrates_with_its_embedded_profile(tmp_path: Path) -> None:
    from calibration.conditioning import ConditioningParams
    from calibration.profile import CalibrationProfile
    from edge.pipeline.acquire import profile_from_source
    from scanner_io.recording import Recorder
    from scanner_io.sources import open_source

    profile = CalibrationProfile.identity("t0", (96, 96), ConditioningParams(db_min=11.0))
    with Recorder(tmp_path / "r.mcap", calibration=profile, fsync=False) as rec:
        rec.write(make_frame(0))
    with open_source(f"replay:{tmp_path / 'r.mcap'}?rate=max") as src:
        found, origin = profile_from_source(src)
    assert found.profile_id == profile.profile_id and "recording" in origin
    with Recorder(tmp_path / "bare.mcap", fsync=False) as rec:
        rec.write(make_frame(0))
    with open_source(f"replay:{tmp_path / 'bare.mcap'}?rate=max") as src:
        assert profile_from_source(src) is None


def test_status_is_sent_on_state_changes_and_every_status_interval_not_per_frame(
    runner: Any, tmp_path: Path
) -> None:
    from edge.pipeline.daemon import Daemon
    from edge.sdnotify import Notifier

    path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(path)
    ns.settimeout(0.05)
    frames = 80
    src = ScriptedSource([make_frame(i) for i in range(frames)], live=True)  # one frame per poll
    settings = DaemonSettings(endpoint=f"ipc://{tmp_path}/r.sock", poll_s=0.02, status_interval_s=0.5)
    daemon = Daemon(
        settings, runner, lambda: src, identity_context, notifier=Notifier(env={"NOTIFY_SOCKET": path})
    )
    result: dict[str, Any] = {}
    th = threading.Thread(target=lambda: result.setdefault("summary", daemon.run()), daemon=True)
    th.start()
    lines: list[tuple[float, str]] = []
    try:
        while th.is_alive() or not lines or lines[-1][1] != "STOPPING=1":
            try:
                msg = ns.recv(4096).decode()
            except TimeoutError:
                if not th.is_alive():
                    break
                continue
            lines += [(time.monotonic(), ln) for ln in msg.splitlines()]
        th.join(10)
    finally:
        ns.close()
    assert result["summary"].published == frames
    texts = [t for _, t in lines]
    ready, stopping = texts.index("READY=1"), texts.index("STOPPING=1")
    streaming = [(t, s) for t, s in lines[ready + 1 : stopping] if s.startswith("STATUS=")]
    duration = lines[stopping][0] - lines[ready][0]
    refreshes = [s for _, s in streaming if "frames in" in s]
    # About one line per interval (here 0.5 s), not one per frame or per main-loop turn.
    assert 1 <= len(refreshes) <= duration / 0.5 + 1, (duration, streaming)
    assert len(streaming) <= len(refreshes) + 3, streaming  # plus the few state changes
    assert len(streaming) < frames / 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel thread names are Linux")
def test_pipeline_stages_name_their_kernel_threads() -> None:
    """`top -H` and benchmarks/bench_daemon.py tell the stages apart by their kernel names."""
    from edge.pipeline.stage import Stage

    seen: dict[str, str] = {}

    class Probe(Stage):
        def loop(self) -> None:
            seen["comm"] = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

    stage = Probe("probe", pipe=None)  # type: ignore[arg-type]
    stage.start()
    stage.join(5)
    assert stage.error is None
    assert seen["comm"] == "thz-probe"


def test_a_stage_that_dies_mid_stream_ends_the_run_as_a_bug_not_a_clean_stop(
    runner: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 0 after a crashed publisher would keep systemd (Restart=on-failure) from restarting."""
    from edge.pipeline.daemon import Daemon
    from edge.results import ResultPublisher
    from scanner_io.errors import InternalError

    sent = ResultPublisher.publish_result
    count = {"n": 0}

    def flaky(self: Any, result: Any, deadline: Any = None) -> Any:
        count["n"] += 1
        if count["n"] == 4:
            raise RuntimeError("publisher bug")
        return sent(self, result, deadline)

    monkeypatch.setattr(ResultPublisher, "publish_result", flaky)
    src = ScriptedSource([make_frame(i) for i in range(12)], live=False)
    daemon = Daemon(
        DaemonSettings(endpoint=f"ipc://{tmp_path}/r.sock", poll_s=0.02, stop_timeout_s=2.0),
        runner,
        lambda: src,
        identity_context,
        model=ModelInfo(bundle="b", backend="ort", precision="fp32"),
    )
    with pytest.raises(InternalError, match="stage publish failed: RuntimeError: publisher bug"):
        daemon.run()
    assert daemon.stats.published == 3


def test_a_lockstep_source_waits_for_a_first_subscriber_when_configured(
    runner: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """[publisher] wait_subscriber_s: a consumer that joins late still gets every result."""
    from edge.pipeline.daemon import Daemon

    endpoint = f"ipc://{tmp_path}/r.sock"
    n = 12
    src = ScriptedSource([make_frame(i) for i in range(n)], live=False)  # no silences: no head start
    # Held longer than a source may be silent: the wait is not a stall.
    settings = DaemonSettings(endpoint=endpoint, poll_s=0.02, wait_subscriber_s=30.0, stalled_after_s=0.3)
    daemon = Daemon(settings, runner, lambda: src, identity_context)
    got: list[dict] = []
    stop = threading.Event()
    collectors: list[threading.Thread] = []
    both = (b"result/", b"event/")
    late = threading.Timer(0.5, lambda: collectors.append(collect(endpoint, stop, got, both)))
    late.start()
    t0 = time.monotonic()
    summary = daemon.run()
    waited = time.monotonic() - t0
    time.sleep(0.3)
    stop.set()
    late.join(5)
    collectors[0].join(5)
    assert summary.published == n and summary.unaccounted == 0
    assert waited >= 0.5
    assert sorted(h["seq"] for h in got if "seq" in h) == list(range(n))
    states = [h["state"] for h in got if h.get("kind") == "state"]
    assert states[0] == "ready" and "stalled" not in states, states

    # Nobody joins: the run starts once the wait is over, and says so.
    src = ScriptedSource([make_frame(i) for i in range(n)], live=False)
    settings = DaemonSettings(endpoint=f"ipc://{tmp_path}/r2.sock", poll_s=0.02, wait_subscriber_s=0.3)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="thzedge.daemon"):
        summary = Daemon(settings, runner, lambda: src, identity_context).run()
    assert summary.published == n and time.monotonic() - t0 >= 0.3
    assert any("no subscriber joined within 0.3 s" in r.getMessage() for r in caplog.records)


def test_start_up_reads_the_gallery_once_and_each_reload_reads_it_again(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """Generation 0 is loaded twice when the source carries the profile; the file is read once."""
    from edge.bundle import Bundle
    from edge.config import SourceConfig, VerificationConfig
    from edge.gallery import Gallery
    from edge.pipeline.assemble import ContextLoader
    from edge.security import EndpointSecurity

    bundle = Bundle.open(tiny_bundle)
    path = tmp_path / "g.npz"

    def enrol(*names: str) -> None:
        g = Gallery(bundle.encoder_sha256, 32, bundle_sha256=bundle.sha256)
        for i, name in enumerate(names):
            g.enroll(name, np.eye(32, dtype=np.float32)[i : i + 1])
        g.save(path)

    enrol("alice")
    ctx = zmq.Context()
    try:
        load = ContextLoader(
            SourceConfig(uri="sim"),
            VerificationConfig(gallery=path, threshold=0.5),
            bundle,
            "fp32",
            EndpointSecurity(ctx),
        )
        first, again = load(0, None), load(0, None)
        assert first.gallery is again.gallery and first.gallery.identities == ("alice",)
        enrol("alice", "bob")  # re-enrolled, then SIGHUP
        assert load(1, None).gallery.identities == ("alice", "bob")
        enrol("carol")  # a reload of the same generation (the last one failed) reads it again
        assert load(1, None).gallery.identities == ("carol",)
    finally:
        ctx.term()
