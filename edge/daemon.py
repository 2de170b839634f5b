"""The streaming daemon: acquisition → one bounded queue → inference → publisher, wired in `compose`.

Three named stages, each a thread that owns its resources and polls with a timeout:

- `AcquisitionStage` owns the source (and the optional MCAP recorder). Decoding and validation
  happen inside the source; a rejected message is counted as `malformed{reason}` and announced
  as an `error` event with its reason and seq. Sequence gaps are counted as `upstream_gap`.
  Each accepted frame is calibrated + conditioned here (the one shared conditioning function),
  so that work overlaps inference.
- `FrameQueue` is the one bounded queue between acquisition and inference: drop-oldest for live
  sources (`queue_full`), blocking for lockstep replay (nothing dropped).
- `InferenceStage` takes whatever is queued up to the bundle's max batch, drops frames that
  waited longer than `max_age_s` (`stale`), runs the encoder once per batch, then per frame:
  posture, gallery verification, reconstruction by the predicted posture's decoder. A task
  failing on one frame yields that frame's result as `partial` with the error; the other frames
  are unaffected.
- `PublisherStage` owns the results socket (`edge.results.ResultPublisher`); the other stages
  hand it results and events through a queue, so no socket is ever shared between threads.

`Daemon.run()` is the main loop: it starts the stages, sends sd_notify STATUS/READY/WATCHDOG/
STOPPING, applies SIGHUP reloads, reports stalls, and on SIGTERM/SIGINT (which only set an
event) lets the stages drain inside `stop_timeout_s`. Every frame that entered is accounted
for: published, or dropped with a reason (`RunSummary.unaccounted` is 0 on a clean run).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.observability import DROP_REASONS
from edge.runner import softmax
from scanner_io.frame import POSTURES, Frame

log = logging.getLogger("thzedge.daemon")

STAGES: tuple[str, ...] = ("queue", "condition", "encode", "verify", "reconstruct", "publish", "total")
LATENCY_WINDOW = 100_000  # latest frames kept for the summary's percentiles
STAGE_WINDOW = 10_000  # latest frames kept for the per-stage medians


class Ring:
    """A fixed-size window of the latest float samples (a numpy array: 8 bytes per sample)."""

    def __init__(self, size: int) -> None:
        self._a = np.empty(size, dtype=np.float64)
        self._n = 0

    def append(self, value: float) -> None:
        self._a[self._n % self._a.size] = value
        self._n += 1

    def __len__(self) -> int:
        return min(self._n, self._a.size)

    def values(self) -> np.ndarray:
        """Return the samples held (order not kept: only statistics are taken)."""
        return self._a[: len(self)].copy()


# ---------------------------------------------------------------------------------------------
# Settings and run-time context


@dataclass(frozen=True)
class DaemonSettings:
    """How the loop behaves; `run_daemon` builds it from the config file and the CLI flags."""

    endpoint: str
    scanner: str = "scanner"  # instance name used on event topics until a frame names its scanner
    hwm: int = 100
    queue_size: int = 8
    max_age_s: float = 2.0  # frames waiting longer than this in the daemon are dropped as stale; 0 = off
    stop_timeout_s: float = 5.0
    heartbeat_timeout_s: float = 10.0
    stalled_after_s: float = 5.0
    max_frames: int | None = None
    reconstruction: bool = True
    publish_embedding: bool = False
    publish_reconstruction: bool = False
    verification_mode: str = "auto"  # auto | 1:1 | 1:N | off
    state_interval_s: float = 0.5
    poll_s: float = 0.05
    ipc_mode: int = 0o600
    ipc_group: str | None = None
    # "auto": follow the source (live → drop oldest, lockstep replay → block); "block"; "drop_oldest".
    queue_policy: str = "auto"


@dataclass(frozen=True)
class ProcessingContext:
    """Everything a reload may change, swapped as one reference so a switch happens at one seq."""

    profile: Any | None  # calibration.profile.CalibrationProfile
    params: Any | None  # calibration.conditioning.ConditioningParams
    calibration_id: str
    gallery: Any | None = None  # edge.gallery.Gallery (carries the verification threshold)
    generation: int = 0


@dataclass
class QueuedFrame:
    """A frame in the queue: arrival time (host monotonic) and, once prepared, its model input.

    `prepare_frame` runs in the acquisition thread, so conditioning overlaps inference; the
    context it used travels with the frame, so a reload switches calibration (and gallery) at
    exactly one seq.
    """

    frame: Frame
    t_received: float
    x: np.ndarray | None = None  # [64, 64] float32 model input
    ctx: ProcessingContext | None = None
    error: BaseException | None = None  # conditioning failed
    condition_ms: float = 0.0


@dataclass
class Stats:
    """The pipeline's own counters (the summary line and the accounting identity)."""

    frames_in: int = 0
    published: int = 0
    processed: int = 0
    errors: int = 0  # results published with status `error`
    partial: int = 0
    batches: int = 0
    batched_frames: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    malformed: dict[str, int] = field(default_factory=dict)
    latency_ms: Ring = field(default_factory=lambda: Ring(LATENCY_WINDOW))
    stage_ms: dict[str, Ring] = field(default_factory=lambda: {s: Ring(STAGE_WINDOW) for s in STAGES})
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count `n` dropped frames under `reason`."""
        with self.lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass(frozen=True)
class RunSummary:
    """What a run did: the one-line summary `thzedge run` prints, and its JSON form."""

    frames_in: int
    published: int
    dropped: dict[str, int]
    malformed: dict[str, int]
    errors: int
    partial: int
    latency_mean_ms: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    stage_p50_ms: dict[str, float]
    mean_batch: float | None
    duration_s: float
    endpoint: str
    exit_reason: str

    @property
    def unaccounted(self) -> int:
        """Frames that entered but were neither published nor counted as dropped (0 when healthy)."""
        in_daemon = sum(v for k, v in self.dropped.items() if k not in ("malformed", "upstream_gap"))
        return self.frames_in - self.published - in_daemon

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready summary."""
        d = dataclasses.asdict(self)
        d["unaccounted"] = self.unaccounted
        return d

    def render(self) -> str:
        """Return the one-line summary."""
        drops = " ".join(f"{k}={v}" for k, v in self.dropped.items())
        mal = ",".join(f"{k}={v}" for k, v in sorted(self.malformed.items())) or "none"

        def ms(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1f}"

        return (
            f"frames_in={self.frames_in} published={self.published} "
            f"dropped={sum(self.dropped.values())} ({drops}) malformed={sum(self.malformed.values())} "
            f"({mal}) errors={self.errors} partial={self.partial} "
            f"latency_ms mean={ms(self.latency_mean_ms)} p99={ms(self.latency_p99_ms)} "
            f"duration_s={self.duration_s:.1f}"
        )


# ---------------------------------------------------------------------------------------------
# The one bounded queue


class FrameQueue:
    """A bounded frame queue: drop-oldest (live) or blocking (lockstep) when full."""

    def __init__(self, maxsize: int, block_when_full: bool) -> None:
        self.maxsize = maxsize
        self.block_when_full = block_when_full
        self._items: collections.deque[QueuedFrame] = collections.deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: QueuedFrame, stop: threading.Event, poll_s: float = 0.05) -> QueuedFrame | None:
        """Add `item`; return the evicted oldest frame (live) or None. Lockstep waits for room.

        In lockstep, a `stop` while waiting returns `item` itself: the caller counts it.
        """
        with self._cond:
            if self.block_when_full:
                while len(self._items) >= self.maxsize:
                    if stop.is_set():
                        return item
                    self._cond.wait(poll_s)
                evicted = None
            else:
                evicted = self._items.popleft() if len(self._items) >= self.maxsize else None
            self._items.append(item)
            self._cond.notify_all()
            return evicted

    def get_batch(self, max_n: int, timeout_s: float) -> list[QueuedFrame]:
        """Return up to `max_n` queued frames, oldest first; waits at most `timeout_s` for the first."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout_s)
            out = []
            while self._items and len(out) < max_n:
                out.append(self._items.popleft())
            if out:
                self._cond.notify_all()
            return out

    def drain(self) -> list[QueuedFrame]:
        """Remove and return everything queued."""
        with self._cond:
            out = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return out


# ---------------------------------------------------------------------------------------------
# Stages


class Stage(threading.Thread):
    """A named pipeline stage: `setup()` then `loop()` in its own thread, `teardown()` always."""

    stats: Stats
    metrics: Metrics
    outbox: Outbox

    def __init__(self, name: str) -> None:
        super().__init__(name=f"thzedge-{name}", daemon=True)
        self.stage_name = name
        self.ready = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def setup(self) -> None:
        """Open what the stage owns (in its own thread: sockets stay with their creator)."""

    def loop(self) -> None:
        """Run until finished or stopped."""

    def teardown(self) -> None:
        """Close what the stage owns."""

    def count_drop(self, reason: str, n: int = 1, seq: int | None = None) -> None:
        """Count `n` dropped frames in the run's stats and metrics; with `seq`, in a `drop` event too."""
        self.stats.drop(reason, n)
        self.metrics.dropped(reason, n)
        if seq is not None:
            self.outbox.report_drop(reason, seq, n)

    def run(self) -> None:
        try:
            self.setup()
        except BaseException as exc:  # reported by the main thread, which exits with its code
            self.error = exc
            self.ready.set()
            self.done.set()
            return
        self.ready.set()
        try:
            self.loop()
        except BaseException as exc:
            self.error = exc
            log.error("stage %s failed: %s: %s", self.stage_name, type(exc).__name__, exc)
            log.debug("stage failure", exc_info=True)
        finally:
            try:
                self.teardown()
            except Exception as exc:
                log.warning("stage %s teardown: %s: %s", self.stage_name, type(exc).__name__, exc)
            self.done.set()


class Outbox:
    """The handoff from acquisition/inference to the publisher (a queue; the socket stays put)."""

    def __init__(self, maxsize: int = 64, drop_event_interval_s: float = 0.25) -> None:
        self._q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=maxsize)
        # Drop events are rate-limited (R-INT-1): counts accumulate per reason and go out as one
        # `drop` event per reason at most every `drop_event_interval_s`; the counters stay exact.
        self._drops: dict[str, list[int]] = {}  # reason -> [count, last seq]
        self._drops_lock = threading.Lock()
        self._drop_interval = drop_event_interval_s
        self._drops_sent_at: dict[str, float] = {}

    def report_drop(self, reason: str, seq: int, count: int = 1) -> None:
        """Note `count` dropped frames (the latest `seq`) for the next rate-limited `drop` event."""
        with self._drops_lock:
            entry = self._drops.setdefault(reason, [0, seq])
            entry[0] += count
            entry[1] = seq

    def take_drop_events(self, now: float, force: bool = False) -> list[dict[str, Any]]:
        """Return the `drop` event bodies due now (one per reason), clearing what they report."""
        out = []
        with self._drops_lock:
            for reason in list(self._drops):
                if force or now - self._drops_sent_at.get(reason, -1e9) >= self._drop_interval:
                    count, seq = self._drops.pop(reason)
                    self._drops_sent_at[reason] = now
                    out.append({"reason": reason, "count": count, "seq": seq})
        return out

    def put(
        self,
        kind: str,
        payload: Any,
        stop_deadline: Callable[[], float | None],
        poll_s: float,
        on_wait: Callable[[], None] | None = None,
    ) -> bool:
        """Queue one item, waiting while the publisher is behind; False if the stop deadline passed."""
        while True:
            try:
                self._q.put((kind, payload), timeout=poll_s)
                return True
            except queue.Full:
                if on_wait is not None:
                    on_wait()  # waiting on a slow consumer is `blocked`, not hung: keep the heartbeat
                deadline = stop_deadline()
                if deadline is not None and time.monotonic() >= deadline:
                    return False

    def put_nowait(self, kind: str, payload: Any) -> bool:
        """Queue one item if there is room (events that may be skipped, e.g. rate-limited drops)."""
        try:
            self._q.put_nowait((kind, payload))
            return True
        except queue.Full:
            return False

    def get(self, timeout_s: float) -> tuple[str, Any] | None:
        """Return the next item or None after `timeout_s`."""
        try:
            return self._q.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def qsize(self) -> int:
        return self._q.qsize()


class AcquisitionStage(Stage):
    """Owns the source: reads frames, counts malformed ones and gaps, feeds the queue."""

    def __init__(
        self,
        open_source: Callable[[], Any],
        frames: FrameQueue,
        outbox: Outbox,
        stats: Stats,
        settings: DaemonSettings,
        stop: threading.Event,
        metrics: Metrics,
        stop_deadline: Callable[[], float | None],
        prepare: Callable[[QueuedFrame], None],
        open_recorder: Callable[[Any | None], Any] | None = None,
    ) -> None:
        super().__init__("acquire")
        self.prepare = prepare  # calibrate + condition here, so it overlaps inference
        self.go = threading.Event()
        self._open_source = open_source
        self._open_recorder = open_recorder
        self.frames = frames
        self.outbox = outbox
        self.stats = stats
        self.settings = settings
        self.stop = stop
        self.metrics = metrics
        self.stop_deadline = stop_deadline
        self.source: Any = None
        self.recorder: Any = None
        self.source_profile: tuple[Any, str] | None = None
        self.live = True
        self.exit_reason = "running"
        self.last_frame_t: float | None = None
        self.scanner: str | None = None
        self._last_seq: dict[str, int] = {}
        self._unknown_malformed = 0

    def setup(self) -> None:
        self.source = self._open_source()
        self.live = bool(getattr(self.source, "live", True))
        # Read here, in the thread that owns the source, before any frame is read.
        self.source_profile = profile_from_source(self.source)
        if self._open_recorder is not None:
            # The recording carries the profile this stream is conditioned with, also when it is
            # the source's own (the simulator's maps), so its replay conditions frames alike.
            self.recorder = self._open_recorder(self.source_profile[0] if self.source_profile else None)

    @property
    def source_state(self) -> str:
        return str(getattr(self.source, "state", "up")) if self.source is not None else "down"

    def loop(self) -> None:
        limit = self.settings.max_frames
        # Frames are read only once the daemon has its final context and a bound results socket.
        while not self.go.wait(self.settings.poll_s):
            if self.stop.is_set():
                self.exit_reason = "stopped"
                return
        while not self.stop.is_set():
            if limit is not None and self.stats.frames_in >= limit:
                self.exit_reason = "max_frames"
                return
            item = self.source.read(self.settings.poll_s)
            if item is None:
                if self.recorder is not None:
                    self.recorder.tick()  # a quiet stream still reaches the disk
                if getattr(self.source, "exhausted", False):
                    self.exit_reason = "source_ended"
                    return
                continue
            if not isinstance(item, Frame):
                self._malformed(item)
                continue
            self._accept(item)
        self.exit_reason = "stopped"

    def _malformed(self, item: Any) -> None:
        reason = str(getattr(item, "reason", "malformed"))
        seq = getattr(item, "seq", None)
        with self.stats.lock:
            self.stats.malformed[reason] = self.stats.malformed.get(reason, 0) + 1
            self.stats.dropped["malformed"] += 1
        self.metrics.malformed(reason)
        scanner = getattr(item, "scanner", None) or self.scanner
        if seq is not None and scanner is not None:
            # The seq was used up by this message: the next frame is not a gap.
            self._last_seq[scanner] = max(self._last_seq.get(scanner, -1), int(seq))
        elif seq is None:
            self._unknown_malformed += 1
        log.warning("malformed frame rejected: reason=%s seq=%s", reason, seq)
        if self.recorder is not None:
            with contextlib.suppress(Exception):
                self.recorder.write_event("malformed", reason=reason, seq=seq)
        self.outbox.put(
            "event",
            ("error", {"stage": "acquire", "reason": reason, "seq": seq, "message": _short(item)}),
            self.stop_deadline,
            self.settings.poll_s,
        )

    def _accept(self, frame: Frame) -> None:
        now = time.monotonic()
        self.last_frame_t = now
        scanner = frame.header.scanner
        self.scanner = self.scanner or scanner
        last = self._last_seq.get(scanner)
        if last is not None:
            gap = frame.header.seq - last - 1
            if gap > 0:
                # Malformed messages whose seq could not be read explain part of the gap.
                explained = min(gap, self._unknown_malformed)
                gap -= explained
                if gap:
                    self.count_drop("upstream_gap", gap, frame.header.seq)
                    log.warning("upstream gap: %d frame(s) missing before seq %d", gap, frame.header.seq)
            elif gap < -1 or gap == -1:
                # The scanner restarted its counter (or repeated a seq): start tracking afresh.
                log.warning("seq went back from %d to %d: scanner restarted", last, frame.header.seq)
                self.outbox.put_nowait(
                    "event", ("source", {"state": "seq_reset", "from_seq": last, "seq": frame.header.seq})
                )
        self._unknown_malformed = 0
        self._last_seq[scanner] = frame.header.seq
        with self.stats.lock:
            self.stats.frames_in += 1
        self.metrics.received()
        if self.recorder is not None:
            self.recorder.write(frame)
        queued = QueuedFrame(frame, now)
        self.prepare(queued)
        evicted = self.frames.put(queued, self.stop, self.settings.poll_s)
        if evicted is not None:
            reason = "shutdown" if evicted.frame is frame else "queue_full"
            self.count_drop(reason, seq=evicted.frame.header.seq)
        self.metrics.queue_depth(len(self.frames))

    def teardown(self) -> None:
        for thing in (self.source, self.recorder):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.close()


class InferenceStage(Stage):
    """Batches prepared frames through the encoder and the post-processing tasks."""

    def __init__(
        self,
        runner: Any,
        frames: FrameQueue,
        outbox: Outbox,
        stats: Stats,
        settings: DaemonSettings,
        provenance: Callable[[ProcessingContext], Any],
        metrics: Metrics,
        upstream_done: threading.Event,
        stop: threading.Event,
        stop_deadline: Callable[[], float | None],
        drain_deadline: Callable[[], float | None],
        max_batch: int,
        beat: Any | None = None,
    ) -> None:
        super().__init__("infer")
        self.beat = beat
        self.runner = runner
        self.frames = frames
        self.outbox = outbox
        self.stats = stats
        self.settings = settings
        self.provenance = provenance
        self.metrics = metrics
        self.upstream_done = upstream_done
        self.stop = stop
        self.stop_deadline = stop_deadline
        self.drain_deadline = drain_deadline
        self.max_batch = max(1, max_batch)
        self._accounted = 0  # frames of the current batch already published or dropped

    def loop(self) -> None:
        while True:
            if self.beat is not None:
                self.beat.beat()
            deadline = self.drain_deadline()
            if deadline is not None and time.monotonic() >= deadline:
                left = self.frames.drain()
                if left:
                    self.count_drop("shutdown", len(left))
                    log.warning("stop timeout: %d queued frame(s) dropped as shutdown", len(left))
                return
            batch = self.frames.get_batch(self.max_batch, self.settings.poll_s)
            self.metrics.queue_depth(len(self.frames))
            if not batch:
                if self.upstream_done.is_set() and len(self.frames) == 0:
                    return
                continue
            self._accounted = 0
            try:
                self.process(batch)
            except Exception as exc:
                # A bug outside the per-task handling: the frames not yet accounted are lost,
                # and counted as such; the next batch starts clean.
                lost = len(batch) - self._accounted
                log.error(
                    "inference stage error (%s): %d frame(s) dropped as task_error", type(exc).__name__, lost
                )
                if lost > 0:
                    self.count_drop("task_error", lost, batch[-1].frame.header.seq)

    def process(self, batch: list[QueuedFrame]) -> None:
        """Turn one batch of queued frames into results handed to the publisher."""
        now = time.monotonic()
        fresh: list[QueuedFrame] = []
        for q in batch:
            if self.settings.max_age_s > 0 and now - q.t_received > self.settings.max_age_s:
                self._accounted += 1
                self.count_drop("stale", seq=q.frame.header.seq)
            else:
                fresh.append(q)
        if not fresh:
            return
        self.metrics.batch_size(len(fresh))
        with self.stats.lock:
            self.stats.batches += 1
            self.stats.batched_frames += len(fresh)
        results = []
        ok: list[int] = []
        for i, q in enumerate(fresh):
            assert q.ctx is not None  # prepared by the acquisition stage
            r = _new_result(q, self.provenance(q.ctx), now)
            r.latency_ms["condition"] = q.condition_ms
            results.append(r)
            if q.error is not None:
                self._fail(r, "condition", q.error, fatal=True)
            else:
                ok.append(i)
        if ok:
            x = np.stack([fresh[i].x for i in ok])[:, None]
            self._infer([results[i] for i in ok], [fresh[i] for i in ok], x)
        for r in results:
            self._emit(r)

    def _infer(self, results: list[Any], frames: list[QueuedFrame], x: np.ndarray) -> None:
        t0 = time.perf_counter()
        try:
            encs = [self.runner.encode(x)]  # the runner checks and converts its input
            per_frame = False
        except Exception:
            # Isolate the frame that breaks the batch: retry one by one.
            encs, per_frame = [], True
            for i in range(len(results)):
                try:
                    encs.append(self.runner.encode(x[i : i + 1]))
                except Exception as exc:
                    encs.append(None)
                    self._fail(results[i], "encode", exc, fatal=True)
        encode_ms = (time.perf_counter() - t0) * 1e3
        for r in results:
            r.latency_ms["encode"] = encode_ms
        # Pair each surviving frame with its encoder output (one batch, or one per frame).
        pairs: list[tuple[Any, Any, int, Any]] = []  # (result, frame, row, enc)
        for i, (r, q) in enumerate(zip(results, frames, strict=True)):
            enc = encs[i] if per_frame else encs[0]
            if enc is None:
                continue
            pairs.append((r, q, 0 if per_frame else i, enc))
        names = _posture_names(self.runner)
        # One softmax per encoder call (the whole batch), not one per frame.
        probs = {id(e): softmax(np.asarray(e.posture_logits, np.float64)) for e in encs if e is not None}
        for r, q, row, enc in pairs:
            p = probs[id(enc)][row]
            idx = int(p.argmax())
            r.posture = {
                "label": names[idx] if idx < len(names) else str(idx),
                "index": idx,
                "confidence": float(p[idx]),
            }
            r.embedding = np.asarray(enc.embedding[row], dtype=np.float32).copy()
            self._verify(r, q.frame, q.ctx)
        if self.settings.reconstruction and pairs:
            self._reconstruct(pairs)

    def _verify(self, r: Any, frame: Frame, ctx: ProcessingContext) -> None:
        mode = self.settings.verification_mode
        if ctx.gallery is None or mode == "off":
            return
        t0 = time.perf_counter()
        claimed = frame.header.claimed_identity
        # The gallery compares with the references of the predicted posture (edge.gallery).
        posture = r.posture.get("index") if isinstance(r.posture, dict) else None
        try:
            if mode == "1:1" or (mode == "auto" and claimed is not None):
                if claimed is None:
                    raise ValueError("1:1 verification needs claimed_identity in the frame header")
                outcome = ctx.gallery.match_1to1(r.embedding, claimed, posture=posture)
            else:
                outcome = ctx.gallery.match_1toN(r.embedding, posture=posture)
            r.verification = outcome.to_dict()  # edge.gallery.Match: its threshold is the gallery's
        except Exception as exc:
            self._fail(r, "verify", exc)
        ms = (time.perf_counter() - t0) * 1e3
        r.latency_ms["verify"] = ms

    def _reconstruct(self, pairs: list[tuple[Any, Any, int, Any]]) -> None:
        t0 = time.perf_counter()
        groups: dict[int, list[tuple[Any, Any, int, Any]]] = {}
        for p in pairs:
            groups.setdefault(id(p[3]), []).append(p)
        for members in groups.values():
            enc = members[0][3]
            rows = [m[2] for m in members]
            postures = np.array([m[0].posture["index"] for m in members], dtype=np.int64)
            try:
                images = self.runner.reconstruct(_take(enc, rows), postures)
                for m, img in zip(members, images, strict=True):
                    m[0].reconstruction = np.asarray(img, dtype=np.float32).reshape(64, 64)
            except Exception:
                for m in members:
                    try:
                        one = np.array([m[0].posture["index"]], dtype=np.int64)
                        img = self.runner.reconstruct(_take(enc, [m[2]]), one)
                        m[0].reconstruction = np.asarray(img[0], dtype=np.float32).reshape(64, 64)
                    except Exception as exc:
                        self._fail(m[0], "reconstruct", exc)
        ms = (time.perf_counter() - t0) * 1e3
        for m in pairs:
            m[0].latency_ms["reconstruct"] = ms

    def _fail(self, r: Any, task: str, exc: BaseException, fatal: bool = False) -> None:
        # The log names the task and the exception type only: messages may quote an identity.
        log.warning("task %s failed on seq %d: %s", task, r.seq, type(exc).__name__)
        r.errors.append({"task": task, "error": f"{type(exc).__name__}: {exc}"[:300]})
        r.status = "error" if fatal else ("partial" if r.status == "ok" else r.status)
        self.metrics.task_error(task)
        self.outbox.put_nowait(
            "event",
            (
                "error",
                {
                    "stage": "infer",
                    "task": task,
                    "seq": r.seq,
                    "reason": "task_failed",
                    "message": f"{type(exc).__name__}",
                },
            ),
        )

    def _emit(self, r: Any) -> None:
        if r.status == "error":
            r.posture = None
            r.embedding = None
        r.t_ready_mono = time.monotonic()
        with self.stats.lock:
            self.stats.processed += 1
            if r.status == "partial":
                self.stats.partial += 1
            elif r.status == "error":
                self.stats.errors += 1
        self.metrics.processed()
        self._accounted += 1
        beat = self.beat.beat if self.beat is not None else None
        if not self.outbox.put("result", r, self.stop_deadline, self.settings.poll_s, beat):
            self.count_drop("shutdown")


class PublisherStage(Stage):
    """Owns the results socket: sends results and events, welcomes joiners with the state."""

    def __init__(
        self,
        make_publisher: Callable[[], Any],
        outbox: Outbox,
        stats: Stats,
        settings: DaemonSettings,
        state: Callable[[], dict[str, Any]],
        metrics: Metrics,
        upstream_done: threading.Event,
        stop_deadline: Callable[[], float | None],
        scanner: Callable[[], str],
        state_version: Callable[[], int] = lambda: 0,
    ) -> None:
        super().__init__("publish")
        self.state_version = state_version
        self._make = make_publisher
        self.outbox = outbox
        self.stats = stats
        self.settings = settings
        self.state = state
        self.metrics = metrics
        self.upstream_done = upstream_done
        self.stop_deadline = stop_deadline
        self.scanner = scanner
        self.publisher: Any = None
        self._drops_reported = 0
        self._last_state = 0.0
        self._state_version = -1

    def setup(self) -> None:
        self.publisher = self._make()

    def loop(self) -> None:
        pub = self.publisher
        while True:
            now = time.monotonic()
            joins = pub.poll_subscriptions()
            pub.scanner = self.scanner()
            version = self.state_version()
            if (
                joins
                or now - self._last_state >= self.settings.state_interval_s
                or version != self._state_version
            ):
                # Built only when sent: this loop runs once per result.
                pub.publish_event("state", self.state(), self.stop_deadline)
                self._last_state = now
                self._state_version = version
            for body in self.outbox.take_drop_events(now):
                pub.publish_event("drop", body, self.stop_deadline)
            item = self.outbox.get(self.settings.poll_s)
            if item is None:
                if self.upstream_done.is_set() and self.outbox.qsize() == 0:
                    for body in self.outbox.take_drop_events(time.monotonic(), force=True):
                        pub.publish_event("drop", body, self.stop_deadline)
                    return
                continue
            kind, payload = item
            if kind == "result":
                self._send_result(payload)
            else:
                ekind, body = payload
                pub.publish_event(ekind, body, self.stop_deadline)

    def _send_result(self, r: Any) -> None:
        with self.stats.lock:
            dropped_total = sum(self.stats.dropped.values())
        r.dropped_since_last = dropped_total - self._drops_reported
        self._drops_reported = dropped_total
        t_pub = self.publisher.publish_result(r, self.stop_deadline)
        if t_pub is None:
            self.count_drop("shutdown")
            return
        with self.stats.lock:
            self.stats.published += 1
            total = r.latency_ms.get("total")
            if total is not None:
                self.stats.latency_ms.append(total)
            for k, v in r.latency_ms.items():
                if k in self.stats.stage_ms:
                    self.stats.stage_ms[k].append(v)
        self.metrics.published(r, t_pub)

    def teardown(self) -> None:
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                st = dict(self.state())
                st["state"] = "stopped"
                self.publisher.publish_event("state", st, time.monotonic())
            self.publisher.close()


# ---------------------------------------------------------------------------------------------
# Metrics adapter (edge.observability.DaemonMetrics when present)


class Metrics:
    """Forwards pipeline counts to `edge.observability.DaemonMetrics`; never identity, score or image."""

    # Our per-frame latency keys → DaemonMetrics' stage labels.
    STAGE_LABELS = {
        "queue": "queue_wait",
        "condition": "condition",
        "encode": "infer",
        "verify": "postprocess",
        "reconstruct": "postprocess",
        "publish": "publish",
    }

    def __init__(self, impl: Any | None = None) -> None:
        self.impl = impl

    def _do(self, fn: Callable[[Any], Any]) -> None:
        if self.impl is None:
            return
        try:
            fn(self.impl)
        except Exception as exc:  # metrics must never break the pipeline
            log.debug("metrics: %s: %s", type(exc).__name__, exc)

    def received(self) -> None:
        self._do(lambda m: m.frame_received())

    def malformed(self, reason: str) -> None:
        self._do(lambda m: m.malformed(reason))  # also counts dropped{reason="malformed"}

    def dropped(self, reason: str, n: int = 1) -> None:
        self._do(lambda m: m.dropped(reason, n))

    def processed(self) -> None:
        self._do(lambda m: m.frames_processed.inc())

    def published(self, r: Any, t_publish_ns: int | None = None) -> None:
        def go(m: Any) -> None:
            m.published(r.status)
            # One observation per label and frame: verify + reconstruct add up to `postprocess`.
            seconds: dict[str, float] = {}
            for stage, ms in r.latency_ms.items():
                label = self.STAGE_LABELS.get(stage)
                if label is not None:
                    seconds[label] = seconds.get(label, 0.0) + ms / 1e3
            for label, s in seconds.items():
                m.observe_stage(label, s)
            if t_publish_ns is not None and t_publish_ns >= r.t_capture_ns:
                m.end_to_end_latency.observe((t_publish_ns - r.t_capture_ns) / 1e9)

        self._do(go)

    def task_error(self, task: str) -> None:
        self._do(lambda m: m.task_errors.labels(task).inc())

    def queue_depth(self, n: int) -> None:
        self._do(lambda m: m.queue_depth.set(n))

    def batch_size(self, n: int) -> None:
        self._do(lambda m: m.batch_size.observe(n))

    def source_state(self, state: str) -> None:
        self._do(lambda m: m.set_source_state(state))

    def calibration(self, profile_id: str) -> None:
        self._do(lambda m: m.set_calibration(profile_id))


# ---------------------------------------------------------------------------------------------
# The daemon


class Daemon:
    """Wires the stages (`compose`), runs the main loop and returns a `RunSummary`.

    Collaborators are passed in (a runner, a source factory, a context loader), so tests can run
    the real loop in-process to completion with `max_frames`; `run_daemon` builds them from config.
    """

    def __init__(
        self,
        settings: DaemonSettings,
        runner: Any,
        open_source: Callable[[], Any],
        load_context: Callable[[int, Any | None], ProcessingContext],
        notifier: Any | None = None,
        metrics: Any | None = None,
        open_recorder: Callable[[Any | None], Any] | None = None,
        binder: Callable[[Any, str], str] | None = None,
        model_info: dict[str, Any] | None = None,
        on_ready: Callable[[Daemon], None] | None = None,
    ) -> None:
        from edge.observability import StateTracker
        from edge.sdnotify import Heartbeat, Notifier

        self.settings = settings
        self.runner = runner
        self._open_source = open_source
        self._load_context = load_context
        self._open_recorder = open_recorder
        self._binder = binder
        self.notifier = notifier if notifier is not None else Notifier(env={})
        self.metrics_impl = metrics
        self.metrics = Metrics(metrics)
        self._notify = _SafeNotifier(self.notifier)  # the pinger gets the raw one: it has its own guard
        self.tracker = StateTracker(metrics, self._notify, log)
        self.heartbeat = Heartbeat()  # stamped by the inference loop; gates WATCHDOG=1
        self.model_info = model_info or {}
        self.on_ready = on_ready
        self.stats = Stats()
        self.stop_event = threading.Event()  # set by SIGTERM/SIGINT or `request_stop`
        self.reload_event = threading.Event()  # set by SIGHUP or `request_reload`
        # Set by the main loop from the stages' `done`, not handed the stages' own events: the
        # loop enters `stopping` (STOPPING=1) before it lets inference and the publisher finish.
        self.upstream_done = threading.Event()  # acquisition finished: no new frames will come
        self.infer_done = threading.Event()
        self.ready = threading.Event()
        self.state_version = 0
        self.pinger: Any = None
        self._stop_at: float | None = None
        self._ready_at = time.monotonic()
        self._ctx: ProcessingContext | None = None
        self._source_profile: Any | None = None  # calibration a replayed recording carries
        self._warned_identity = False
        self._stages: list[Stage] = []
        self.frames: FrameQueue | None = None
        self.acquisition: AcquisitionStage | None = None
        self.inference: InferenceStage | None = None
        self.publisher: PublisherStage | None = None

    # -- control, callable from any thread or a signal handler -----------------------------

    def request_stop(self) -> None:
        """Stop accepting frames; the stages drain and the run ends within `stop_timeout_s`."""
        self.stop_event.set()

    def request_reload(self) -> None:
        """Reload gallery and calibration at the next main-loop turn."""
        self.reload_event.set()

    # -- wiring -------------------------------------------------------------------------------

    @property
    def context(self) -> ProcessingContext:
        assert self._ctx is not None
        return self._ctx

    @property
    def state_name(self) -> str:
        return str(self.tracker.state)

    def _stop_deadline(self) -> float | None:
        return None if self._stop_at is None else self._stop_at + 0.85 * self.settings.stop_timeout_s

    def _drain_deadline(self) -> float | None:
        return None if self._stop_at is None else self._stop_at + 0.6 * self.settings.stop_timeout_s

    def _prepare(self, q: QueuedFrame) -> None:
        ctx = self.context  # read once per frame, in seq order: a reload switches at one seq
        if ctx.profile is None and not self._warned_identity:
            self._warned_identity = True
            log.warning("no calibration profile configured: using identity calibration (uncorrected frames)")
        prepare_frame(q, ctx)

    def _provenance(self, ctx: ProcessingContext) -> Any:
        from edge.results import Provenance

        return Provenance(
            bundle=str(self.model_info.get("bundle", "")),
            precision=str(self.model_info.get("precision", "fp32")),
            backend=str(self.model_info.get("backend", "")),
            calibration=ctx.calibration_id,
        )

    def _state(self) -> dict[str, Any]:
        from edge.results import RESULTS_PROTOCOL_VERSION

        ctx = self._ctx
        acq = self.acquisition
        return {
            "state": self.state_name,
            "version": self.state_version,
            "protocol": RESULTS_PROTOCOL_VERSION,
            "model": dict(self.model_info),
            "calibration": ctx.calibration_id if ctx else None,
            "source": acq.source_state if acq else "down",
            "mode": ("live" if acq.live else "lockstep") if acq else None,
            "verification": self.settings.verification_mode if ctx and ctx.gallery is not None else "off",
            "payloads": {
                "embedding": self.settings.publish_embedding,
                "reconstruction": self.settings.publish_reconstruction and self.settings.reconstruction,
            },
        }

    def _scanner(self) -> str:
        acq = self.acquisition
        return (acq.scanner if acq is not None and acq.scanner else None) or self.settings.scanner

    def compose(self) -> list[Stage]:
        """Build the stage graph: acquisition → FrameQueue → inference → Outbox → publisher."""
        from edge.results import ResultPublisher

        s = self.settings
        max_batch = int(getattr(self.runner, "max_batch", 1) or 1)
        outbox = Outbox(maxsize=max(16, 4 * max_batch))
        # The policy follows the source, known once it opens (in its own thread): see `_run`.
        self.frames = FrameQueue(s.queue_size, block_when_full=False)
        self.acquisition = AcquisitionStage(
            self._open_source,
            self.frames,
            outbox,
            self.stats,
            s,
            self.stop_event,
            self.metrics,
            self._stop_deadline,
            self._prepare,
            self._open_recorder,
        )
        self.inference = InferenceStage(
            self.runner,
            self.frames,
            outbox,
            self.stats,
            s,
            self._provenance,
            self.metrics,
            self.upstream_done,
            self.stop_event,
            self._stop_deadline,
            self._drain_deadline,
            max_batch,
            self.heartbeat,
        )

        def make_publisher() -> ResultPublisher:
            assert self.acquisition is not None
            return ResultPublisher(
                s.endpoint,
                self._scanner(),
                hwm=s.hwm,
                lockstep=not self.acquisition.live,
                publish_embedding=s.publish_embedding,
                publish_reconstruction=s.publish_reconstruction,
                binder=self._binder,
                ipc_mode=s.ipc_mode,
                ipc_group=s.ipc_group,
            )

        self.publisher = PublisherStage(
            make_publisher,
            outbox,
            self.stats,
            s,
            self._state,
            self.metrics,
            self.infer_done,
            self._stop_deadline,
            self._scanner,
            lambda: self.state_version,
        )
        self._stages = [self.acquisition, self.inference, self.publisher]
        return self._stages

    # -- lifecycle ----------------------------------------------------------------------------

    def _set_state(self, name: str, detail: str = "") -> None:
        if self.tracker.set(name, detail):
            self.state_version += 1

    def _warm_up(self) -> None:
        x = np.zeros((1, 1, 64, 64), dtype=np.float32)
        enc = self.runner.encode(x)
        if self.settings.reconstruction:
            self.runner.reconstruct(enc, np.zeros(1, dtype=np.int64))

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        # Handlers only set events: the main loop does the work (sockets, files) outside them.
        for sig, fn in (
            (signal.SIGTERM, self.request_stop),
            (signal.SIGINT, self.request_stop),
            (signal.SIGHUP, self.request_reload),
        ):
            old[sig] = signal.signal(sig, lambda _s, _f, fn=fn: fn())
        return old

    def run(self) -> RunSummary:
        """Start up (STATUS per step, READY when all is up), stream until done, stop cleanly."""
        t_start = time.monotonic()
        old_handlers = self._install_signals()
        try:
            return self._run(t_start)
        except BaseException:
            self._set_state("failed")
            self.stop_event.set()
            raise
        finally:
            if self.pinger is not None:
                self.pinger.stop()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)

    def _run(self, t_start: float) -> RunSummary:
        from edge.sdnotify import WatchdogPinger

        self.tracker.status("loading calibration and gallery")
        self._ctx = self._load_context(0, None)
        self._set_state("warming_up", "warm-up inference")
        self._warm_up()
        self.compose()
        assert self.acquisition and self.inference and self.publisher and self.frames is not None
        self.tracker.status("opening source")
        self.acquisition.start()
        self.acquisition.ready.wait()
        if self.acquisition.error is not None:
            raise self.acquisition.error
        if self.acquisition.source_profile is not None and self._ctx.profile is None:
            # No profile configured, but the source carries one (a recording's, R-REC-2, or the
            # simulator's true maps). No frame has been conditioned yet: acquisition waits for `go`.
            self._source_profile, origin = self.acquisition.source_profile
            self._ctx = self._load_context(0, self._source_profile)
            log.info(
                "no calibration profile configured: using %s (profile %s)", origin, self._ctx.calibration_id
            )
        self.metrics.calibration(self._ctx.calibration_id)
        if self.settings.queue_policy != "auto":
            self.acquisition.live = self.settings.queue_policy == "drop_oldest"
        self.frames.block_when_full = not self.acquisition.live
        self.tracker.status("binding results socket")
        self.publisher.start()
        self.publisher.ready.wait()
        if self.publisher.error is not None:
            self.stop_event.set()
            self.acquisition.join(timeout=self.settings.stop_timeout_s)
            raise self.publisher.error
        self.inference.start()
        self.acquisition.go.set()
        endpoint = self.publisher.publisher.bound_endpoint
        mode = "live" if self.acquisition.live else "lockstep"
        # READY=1 only now: model loaded + warmed up, source open, socket bound (R-SYS-1).
        self._set_state("ready", f"publishing on {endpoint} ({mode} source)")
        self._notify.ready()
        self.ready.set()
        self._ready_at = time.monotonic()
        on_ping = self.metrics_impl.watchdog_pings.inc if self.metrics_impl is not None else None
        self.pinger = WatchdogPinger(
            self.notifier, self.heartbeat, max_age_s=self.settings.heartbeat_timeout_s, on_ping=on_ping
        )
        self.pinger.start()
        if self.on_ready is not None:
            self.on_ready(self)
        self._main_loop()
        return self._summary(t_start, endpoint)

    def _main_loop(self) -> None:
        assert self.acquisition and self.inference and self.publisher
        acq, inf, pub = self.acquisition, self.inference, self.publisher
        last_status = time.monotonic()
        hard_deadline: float | None = None
        while True:
            now = time.monotonic()
            if self.stop_event.is_set() and self._stop_at is None:
                self._stop_at = now
                hard_deadline = now + self.settings.stop_timeout_s
                self._set_state("stopping", "draining queued frames")
                self._notify.stopping()
            if acq.done.is_set():
                self.upstream_done.set()
            if inf.done.is_set():
                self.infer_done.set()
            if pub.done.is_set() or (hard_deadline is not None and now >= hard_deadline):
                break
            if acq.done.is_set() and self._stop_at is None:
                # Finite source ended, --max-frames reached, or the source failed: a normal stop
                # that still lets inference and publisher finish what is queued.
                self.stop_event.set()
                continue
            if self.reload_event.is_set():
                self.reload_event.clear()
                self._reload()
            if self._stop_at is None:
                self._update_state(acq, pub, now)
                if now - last_status >= 10.0 and self.state_name == "ready":
                    last_status = now
                    self.tracker.status(self._streaming_status())
            time.sleep(0.05)
        for st in self._stages:
            st.join(timeout=max(0.0, (hard_deadline or time.monotonic()) - time.monotonic()))
        for st in self._stages:
            if st.is_alive():
                log.error("stage %s did not stop within the stop timeout; exiting anyway", st.stage_name)
        # Anything still queued after the stages gave up is counted, never silently lost.
        if self.frames is not None and not inf.is_alive():
            left = self.frames.drain()
            if left:
                inf.count_drop("shutdown", len(left))
        self._set_state("stopped")

    def _update_state(self, acq: AcquisitionStage, pub: PublisherStage, now: float) -> None:
        src = acq.source_state
        self.metrics.source_state(src)
        last = acq.last_frame_t
        # Silence counts from the last frame, or from READY when none has come yet.
        silent = now - (last if last is not None else self._ready_at)
        hung = self.heartbeat.age_s > self.settings.heartbeat_timeout_s and not self.inference.done.is_set()
        if hung:
            self._set_state("degraded", "inference not responding")
        elif src in ("down", "stalled") or silent > self.settings.stalled_after_s:
            self._set_state("stalled", f"source {src}, no frame for {silent:.0f} s")
        elif (
            not acq.live
            and self.frames is not None
            and len(self.frames) >= self.settings.queue_size
            and (pub.publisher is not None and pub.publisher.blocked_s > 0)
        ):
            self._set_state("blocked", "downstream backpressure")
        else:
            self._set_state("ready", self._streaming_status() if last is not None else "waiting for frames")

    def _streaming_status(self) -> str:
        s = self.stats
        with s.lock:
            return f"{s.frames_in} frames in, {s.published} published, {sum(s.dropped.values())} dropped"

    def _reload(self) -> None:
        prev = self.state_name
        self._set_state("reloading", "gallery and calibration")
        self._notify.reloading()
        try:
            new = self._load_context(self.context.generation + 1, self._source_profile)
        except Exception as exc:
            # Keep streaming with what we have; the message names files, never identities.
            log.error("reload failed, keeping the current calibration and gallery: %s", exc)
            if self.publisher is not None:
                self.publisher.outbox.put_nowait(
                    "event",
                    (
                        "error",
                        {
                            "stage": "reload",
                            "reason": "reload_failed",
                            "seq": None,
                            "message": type(exc).__name__,
                        },
                    ),
                )
        else:
            self._ctx = new  # one reference swap: batches after it use `new`, none is half-switched
            self.metrics.calibration(new.calibration_id)
            log.info(
                "reloaded: calibration %s, gallery %s",
                new.calibration_id,
                "loaded" if new.gallery is not None else "none",
            )
        self._notify.ready()
        self._set_state(prev if prev not in ("reloading", "starting") else "ready")

    def _summary(self, t_start: float, endpoint: str) -> RunSummary:
        s = self.stats
        with s.lock:
            lat = s.latency_ms.values()
            stage = {k: float(np.median(v.values())) for k, v in s.stage_ms.items() if len(v)}
            return RunSummary(
                frames_in=s.frames_in,
                published=s.published,
                dropped=dict(s.dropped),
                malformed=dict(s.malformed),
                errors=s.errors,
                partial=s.partial,
                latency_mean_ms=float(lat.mean()) if lat.size else None,
                latency_p50_ms=float(np.percentile(lat, 50)) if lat.size else None,
                latency_p99_ms=float(np.percentile(lat, 99)) if lat.size else None,
                stage_p50_ms=stage,
                mean_batch=s.batched_frames / s.batches if s.batches else None,
                duration_s=time.monotonic() - t_start,
                endpoint=endpoint,
                exit_reason=self.acquisition.exit_reason if self.acquisition else "error",
            )


class _SafeNotifier:
    """Wraps the Notifier so a vanished NOTIFY_SOCKET never stops the pipeline."""

    def __init__(self, notifier: Any) -> None:
        self._n = notifier

    def _send(self, method: str, *args: Any) -> None:
        with contextlib.suppress(OSError):
            getattr(self._n, method)(*args)

    def status(self, text: str) -> None:
        self._send("status", text)

    def ready(self) -> None:
        self._send("ready")

    def reloading(self) -> None:
        self._send("reloading")

    def stopping(self) -> None:
        self._send("stopping")


# ---------------------------------------------------------------------------------------------
# Helpers


def prepare_frame(q: QueuedFrame, ctx: ProcessingContext) -> None:
    """Calibrate and condition one frame with `ctx` (the one shared function); errors are kept on `q`."""
    from calibration.conditioning import calibrate_and_condition

    q.ctx = ctx
    t0 = time.perf_counter()
    try:
        x = np.asarray(calibrate_and_condition(q.frame.data, ctx.profile, ctx.params), dtype=np.float32)
        if x.shape != (64, 64):
            raise ValueError(f"conditioning gave shape {x.shape}, the model needs (64, 64)")
        q.x = x
    except Exception as exc:
        q.error = exc
    q.condition_ms = (time.perf_counter() - t0) * 1e3


def _new_result(q: QueuedFrame, prov: Any, now: float) -> Any:
    from edge.results import FrameResult

    h = q.frame.header
    r = FrameResult(
        scanner=h.scanner,
        seq=h.seq,
        t_capture_ns=h.t_capture_ns,
        status="ok",
        provenance=prov,
        t_received_mono=q.t_received,
    )
    r.latency_ms["queue"] = (now - q.t_received) * 1e3
    return r


def _posture_names(runner: Any) -> tuple[str, ...]:
    bundle = getattr(runner, "bundle", None)
    names = getattr(bundle, "postures", None)
    return tuple(names) if names else POSTURES


def _take(enc: Any, rows: list[int]) -> Any:
    """Return the encoder output restricted to `rows` (embedding, logits and every skip feature)."""
    idx = np.asarray(rows)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(enc):
        v = getattr(enc, f.name)
        if isinstance(v, np.ndarray):
            changes[f.name] = v[idx]
        elif isinstance(v, dict):
            changes[f.name] = {k: a[idx] for k, a in v.items()}
    return dataclasses.replace(enc, **changes)


def profile_from_source(source: Any) -> tuple[Any, str] | None:
    """Return (profile, origin) when the source carries its own calibration, else None.

    See `calibration.profile.profile_carried_by` (shared with `thzedge enroll`). A bad
    attachment must not stop streaming: it is logged and identity calibration follows.
    """
    from calibration.profile import profile_carried_by

    try:
        return profile_carried_by(source)
    except Exception as exc:
        log.warning("the source's calibration cannot be used (%s): %s", type(exc).__name__, exc)
    return None


def _short(item: Any) -> str:
    return str(getattr(item, "message", "") or "")[:200]


# ---------------------------------------------------------------------------------------------
# Building a daemon from the config file and the `thzedge run` flags


@dataclass(frozen=True)
class RunOptions:
    """The `thzedge run` flags; None means "from the config file"."""

    source: str
    model: Path | None = None
    config: Path | None = None
    backend: str | None = None
    publish: str | None = None
    record: Path | None = None
    max_frames: int | None = None
    reconstruction: bool = True


def run_daemon(
    opts: RunOptions,
    notifier: Any | None = None,
    on_ready: Callable[[Daemon], None] | None = None,
) -> RunSummary:
    """Load config, model, calibration and gallery, then stream until done; return the summary.

    Raises ConfigError (exit 78) for a bad config, SourceUnavailableError (69) for a source that
    cannot be opened, BundleError for a bad model bundle.
    """
    from edge.bundle import Bundle, demo_bundle_path
    from edge.config import apply_overrides, load_config, log_start_warnings
    from edge.observability import DaemonMetrics, health_from, serve_http
    from edge.runner import Runner
    from edge.sdnotify import Notifier
    from scanner_io.errors import BundleError, CalibrationError, ConfigError

    cfg = load_config(opts.config)
    overrides: dict[str, dict[str, Any]] = {}
    if opts.backend is not None:
        overrides["model"] = {"backend": opts.backend}
    if opts.model is not None:
        overrides.setdefault("model", {})["bundle"] = str(opts.model)
    if opts.publish is not None:
        overrides["publisher"] = {"endpoint": opts.publish}
    if overrides:
        cfg = apply_overrides(cfg, **overrides)
    log_start_warnings(cfg, log)
    src = cfg.resolve_source(opts.source)
    uri, queue_policy = split_queue_mode(src.uri)  # a bad mode= fails before the model loads
    if opts.max_frames is not None and opts.max_frames < 1:
        raise ConfigError(f"--max-frames {opts.max_frames}: expected a positive number of frames")

    notifier = notifier if notifier is not None else Notifier()
    metrics = DaemonMetrics()
    bundle_path = cfg.model.bundle
    if bundle_path is None:
        bundle_path = demo_bundle_path()
        log.warning(
            "no model given (--model or [model] bundle): using the bundled demo model %s; it was "
            "trained on simulated scans only and is not fit for real faces",
            bundle_path,
        )
    with contextlib.suppress(OSError):
        notifier.status("starting: loading model")
    try:
        bundle = Bundle.open(bundle_path)
        runner = Runner.from_bundle(bundle, backend=cfg.model.backend, precision=cfg.model.precision)
    except BundleError as exc:
        # A missing or broken bundle, or a precision it lacks, does not heal on a restart: exit 78
        # so systemd stops retrying (RestartPreventExitStatus=78).
        raise ConfigError(f"model: {exc}") from None
    if cfg.model.max_batch is not None:
        runner.max_batch = min(runner.max_batch, cfg.model.max_batch)
    backend_name = str(getattr(runner.backend, "name", cfg.model.backend))
    model_info = {"bundle": bundle.sha256, "precision": cfg.model.precision, "backend": backend_name}
    metrics.set_build_info(
        version=_version(), bundle=bundle.sha256[:12], backend=backend_name, precision=cfg.model.precision
    )

    verification = cfg.verification

    def load_context(generation: int, source_profile: Any | None = None) -> ProcessingContext:
        from calibration.conditioning import ConditioningParams
        from calibration.profile import CalibrationProfile

        if generation > 0:
            security.reload()  # SIGHUP: client certificates too (R-SEC-3)

        try:
            profile = CalibrationProfile.load(src.calibration) if src.calibration is not None else None
        except CalibrationError as exc:
            # At start-up a missing or foreign profile is a configuration error (exit 78, no
            # restart loop); on SIGHUP the caller keeps the current profile instead.
            raise ConfigError(f"[sources] calibration: {exc}") from None
        if profile is None:
            profile = source_profile  # None, or what the source carries (see Daemon._run)
        base = profile.conditioning if profile is not None else ConditioningParams()
        params = src.conditioning.apply(base)
        gallery = None
        if verification.gallery is not None and verification.mode != "off":
            from edge.gallery import Gallery

            gallery = Gallery.load(
                verification.gallery, bundle, threshold=verification.threshold, precision=cfg.model.precision
            )
        return ProcessingContext(
            profile=profile,
            params=params,
            calibration_id=profile.profile_id if profile is not None else "identity",
            gallery=gallery,
            generation=generation,
        )

    def open_src() -> Any:
        from scanner_io.sources import open_source

        return open_source(uri, names=cfg.source_names())

    open_recorder = None
    if opts.record is not None:
        record_path = opts.record

        def open_recorder(carried: Any | None) -> Any:
            from calibration.profile import CalibrationProfile
            from scanner_io.recording import Recorder, default_manifest

            profile = CalibrationProfile.load(src.calibration) if src.calibration is not None else carried
            return Recorder(record_path, manifest=default_manifest(source=src.uri), calibration=profile)

    from edge.security import EndpointSecurity
    from scanner_io.sources import zmq_context

    # Starts the ZAP authenticator (CURVE) before anything binds; ipc files get 0600 (R-SEC-2, R-NEW-2).
    try:
        security = EndpointSecurity.from_config(
            zmq_context(), cfg.publisher, insecure_dev=cfg.daemon.insecure_dev
        )
    except BaseException:  # e.g. a bad CURVE key file: do not leak the loaded model's sessions
        runner.close()
        raise

    settings = DaemonSettings(
        endpoint=cfg.publisher.endpoint,
        scanner=opts.source if opts.source in cfg.sources else "scanner",
        hwm=cfg.publisher.hwm,
        queue_size=cfg.daemon.queue_size,
        max_age_s=cfg.daemon.max_age_s,
        stop_timeout_s=cfg.daemon.stop_timeout_s,
        heartbeat_timeout_s=cfg.daemon.heartbeat_timeout_s,
        stalled_after_s=cfg.daemon.stalled_after_s,
        max_frames=opts.max_frames,
        reconstruction=opts.reconstruction,
        publish_embedding=cfg.privacy.publish_embedding,
        publish_reconstruction=cfg.privacy.publish_reconstruction,
        verification_mode=verification.mode,
        ipc_mode=cfg.publisher.ipc_mode,
        ipc_group=cfg.publisher.ipc_group,
        queue_policy=queue_policy,
    )
    daemon = Daemon(
        settings,
        runner,
        open_src,
        load_context,
        notifier=notifier,
        metrics=metrics,
        open_recorder=open_recorder,
        binder=security.bind,
        model_info=model_info,
        on_ready=on_ready,
    )
    server = None
    try:
        if cfg.metrics.enabled:
            server = serve_http(
                cfg.metrics.bind,
                metrics,
                health_from(daemon.tracker, daemon.heartbeat, cfg.daemon.heartbeat_timeout_s),
            )
        return daemon.run()
    finally:
        if server is not None:
            server.close()
        security.close()
        with contextlib.suppress(Exception):
            runner.close()


def split_queue_mode(uri: str) -> tuple[str, str]:
    """Take the daemon's own `mode=live|lockstep` parameter off a tcp:// or ipc:// source URI.

    A ZeroMQ source is live by default (drop oldest when inference falls behind). With
    `mode=lockstep` the daemon's queue blocks instead, the PULL socket stops reading and the
    scanner (e.g. `thzedge scanner serve --rate max`) blocks in turn: nothing is dropped end to
    end. Returns (URI without the parameter, queue policy).
    """
    from urllib.parse import parse_qsl, urlencode

    from scanner_io.errors import ConfigError

    if not uri.startswith(("tcp://", "ipc://")) or "?" not in uri:
        return uri, "auto"
    base, _, query = uri.partition("?")
    params = parse_qsl(query, keep_blank_values=True)
    modes = [v for k, v in params if k == "mode"]
    if not modes:
        return uri, "auto"
    if modes[-1] not in ("live", "lockstep"):
        raise ConfigError(f"source {uri!r}: mode={modes[-1]!r}; expected mode=live or mode=lockstep")
    rest = [(k, v) for k, v in params if k != "mode"]
    return base + ("?" + urlencode(rest) if rest else ""), "block" if modes[
        -1
    ] == "lockstep" else "drop_oldest"


def _version() -> str:
    from edge import __version__

    return __version__
