"""The acquisition stage: owns the source (and the recorder), counts what it rejects, feeds the queue.

Decoding and validation happen inside the source; a rejected message is counted as
`malformed{reason}` and announced as an `error` event. Missing seqs are `upstream_gap` drops by
the one `scanner_io.seq.SeqTracker` rule. Each accepted frame is calibrated + conditioned here
(`QueuedFrame.prepare`), so that work overlaps inference.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from calibration.profile import ProfileChoice, resolve_profile
from edge.pipeline.context import QueuedFrame
from edge.pipeline.queues import Event
from edge.pipeline.stage import Pipeline, Stage
from edge.quarantine import Quarantine
from scanner_io.codec import MalformedFrame
from scanner_io.errors import ConfigError, SourceUnavailableError, StorageError
from scanner_io.frame import Frame
from scanner_io.ratelog import RateLimitedLog
from scanner_io.recording import Recorder
from scanner_io.seq import SeqTracker
from scanner_io.sources import FrameSource, ZmqSource

log = logging.getLogger("thzedge.daemon")

OpenSource = Callable[[], FrameSource]
# Opens the recorder once the source is open, given the profile the stream is conditioned with.
OpenRecorder = Callable[[ProfileChoice | None], Recorder]


def profile_from_source(source: FrameSource) -> ProfileChoice | None:
    """Return the calibration the source carries (a recording's, the simulator's), else None.

    A bad attachment must not stop streaming: it is logged and identity calibration follows.
    """
    try:
        choice = resolve_profile(None, source)
    except Exception as exc:
        log.warning("the source's calibration cannot be used (%s): %s", type(exc).__name__, exc)
        return None
    return choice if choice.profile is not None else None


def _dims(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


class AcquisitionStage(Stage):
    """Owns the source: reads frames, counts malformed ones and gaps, feeds the queue."""

    def __init__(
        self,
        pipe: Pipeline,
        open_source: OpenSource,
        open_recorder: OpenRecorder | None = None,
        quarantine: Quarantine | None = None,
    ) -> None:
        super().__init__("acquire", pipe)
        self.quarantine = quarantine  # keeps the last rejected messages, sealed (R-NEW-17)
        self.go = threading.Event()  # set once the daemon has its final context and a bound socket
        self._open_source = open_source
        self._open_recorder = open_recorder
        self.source: FrameSource | None = None
        self.recorder: Recorder | None = None
        self.source_profile: ProfileChoice | None = None
        self.live = True
        self.exit_reason = "running"
        self.last_frame_t: float | None = None
        self.scanner: str | None = None
        self._seqs = SeqTracker()
        self._warned_identity = False
        self._recreated = 0  # source sockets recreated so far (scanner lost without a reconnect)
        self._bad_chunks = 0  # replayed recording chunks skipped so far (counted in metrics)
        self._flood_log = RateLimitedLog(log)  # a flood of junk must not flood the journal
        # Set when the recorder failed (disk full, I/O error): recording stopped, streaming goes on.
        self.recording_error: StorageError | None = None
        # What the calibration checks say now (R-CAL-3, R-NEW-11): reasons, or None when fine.
        self.stale: str | None = None
        self.drift: str | None = None
        self._unfit_warned: set[str] = set()
        self._early: list[Frame | MalformedFrame] = []  # read before READY, processed first
        self._watched: object = None  # the guard the flags above belong to

    def setup(self) -> None:
        """Open the source, read the calibration it carries, check a live stream fits its profile,
        open the recorder."""
        self.source = self._open_source()
        if self.quarantine is not None and isinstance(self.source, ZmqSource):
            self.source.keep_rejected = True
        self.live = self.source.live
        # Read here, in the thread that owns the source, before any frame is read.
        self.source_profile = profile_from_source(self.source)
        if self.live:
            self._check_fit_before_ready()
        if self._open_recorder is not None:
            # The recording carries the profile this stream is conditioned with, also when it is
            # the source's own (the simulator's maps), so its replay conditions frames alike.
            self.recorder = self._open_recorder(self.source_profile)
            self.pipe.metrics.recording(True)

    def _check_fit_before_ready(self) -> None:
        """R-CAL-1: wait (bounded) for a live source's first frame; refuse a profile that does not fit.

        What is read here is kept and processed first once streaming starts, so nothing is lost.
        No frame within `match_wait_s` (an idle scanner): the first frame is checked when it comes,
        and frames that do not fit are published `uncalibrated`.
        """
        s, ctx = self.pipe.settings, self.pipe.processing
        if ctx.profile is None or ctx.guard is None or s.match_wait_s <= 0:
            return
        assert self.source is not None
        deadline = time.monotonic() + s.match_wait_s
        while time.monotonic() < deadline and not self.pipe.stop.is_set():
            item = self.source.read(min(s.poll_s, max(deadline - time.monotonic(), 0.0)))
            if item is None:
                continue
            self._early.append(item)
            if isinstance(item, Frame):
                match = ctx.guard.fit(item.header)
                if not match.ok and not s.allow_uncalibrated:
                    raise ConfigError(
                        f"{match.reason}; or set [calibration] allow_uncalibrated = true to publish "
                        "its results marked `uncalibrated`"
                    )
                return
            if len(self._early) >= 64:  # only rejected messages so far: stop holding them
                return

    @property
    def source_state(self) -> str:
        """The source's state (up, stalled, down, ended); down before it opens."""
        return str(self.source.state) if self.source is not None else "down"

    def loop(self) -> None:
        """Read until the source ends, `max_frames` is reached or the pipeline stops."""
        pipe, s = self.pipe, self.pipe.settings
        assert self.source is not None  # opened by setup
        limit = s.max_frames
        # Frames are read only once the daemon has its final context and a bound results socket.
        while not self.go.wait(s.poll_s):
            if pipe.stop.is_set():
                self.exit_reason = "stopped"
                return
        while not pipe.stop.is_set():
            if limit is not None and pipe.stats.frames_in >= limit:
                self._count_bad_chunks()
                self.exit_reason = "max_frames"
                return
            item = self._early.pop(0) if self._early else self.source.read(s.poll_s)
            if item is None:
                self._record(lambda r: r.tick())  # a quiet stream still reaches the disk
                self._count_bad_chunks()
                if self.source.exhausted:
                    self.exit_reason = "source_ended"
                    return
                self._watch_source()
                continue
            if isinstance(item, Frame):
                self._accept(item)
            else:
                self._malformed(item)
        self._count_bad_chunks()
        self.exit_reason = "stopped"

    def _count_bad_chunks(self) -> None:
        """Count the replayed recording's skipped chunks (a replay never has a quiet turn)."""
        assert self.source is not None
        stats = getattr(self.source, "stats", None)
        bad = int(getattr(stats, "bad_chunks", 0))
        if bad > self._bad_chunks:
            self.pipe.metrics.recording_bad_chunks(bad - self._bad_chunks)
            with self.pipe.stats.lock:
                self.pipe.stats.bad_chunks = bad
            self.pipe.outbox.put_nowait(Event("source", {"state": "bad_chunks", "count": bad}))
            self._bad_chunks = bad

    def _watch_source(self) -> None:
        """On a quiet turn: count socket recreations; stop the run if the source cannot recover."""
        assert self.source is not None
        if self.source.state == "failed":
            # Exit 69 (systemd restarts us) instead of "stalled" forever with the watchdog fed.
            why = getattr(self.source, "failure", None) or "unknown"
            self.exit_reason = "source_failed"
            raise SourceUnavailableError(f"the source failed and cannot recover ({why}); restarting helps")
        stats = getattr(self.source, "stats", None)
        recreated = int(getattr(stats, "recreated", 0))
        if recreated > self._recreated:
            self.pipe.metrics.source_recreated(recreated - self._recreated)
            body = {"state": "recreated", "count": recreated}
            self.pipe.outbox.put_nowait(Event("source", body))
            self._recreated = recreated

    def _malformed(self, item: MalformedFrame) -> None:
        pipe = self.pipe
        reason, seq = item.reason, item.seq
        with pipe.stats.lock:
            pipe.stats.malformed[reason] = pipe.stats.malformed.get(reason, 0) + 1
            pipe.stats.dropped["malformed"] += 1
        pipe.metrics.malformed(reason)
        step = self._seqs.malformed(item.scanner, seq)
        if step.missing:
            pipe.count_drop("upstream_gap", step.missing, seq)
        self._flood_log.warning(reason, "malformed frame rejected: reason=%s seq=%s", reason, seq)
        self._record(lambda r: r.write_event("malformed", reason=reason, seq=seq))
        if self.quarantine is not None:
            try:
                self.quarantine.keep(item)
            except OSError as exc:  # a full disk must not stop the stream
                log.warning("quarantine: %s; rejected message not kept", exc)
        body = {"stage": "acquire", "reason": reason, "seq": seq, "message": item.message[:200]}
        pipe.outbox.put(Event("error", body), pipe.clock.publish_deadline, pipe.settings.poll_s)

    def _accept(self, frame: Frame) -> None:
        pipe = self.pipe
        now = time.monotonic()
        self.last_frame_t = now
        h = frame.header
        self.scanner = self.scanner or h.scanner
        step = self._seqs.frame(h.scanner, h.seq)
        if step.missing:
            pipe.count_drop("upstream_gap", step.missing, h.seq)
            self._flood_log.warning(
                "upstream_gap", "upstream gap: %d frame(s) missing before seq %d", step.missing, h.seq
            )
        if step.reset_from is not None:
            # The scanner restarted its counter (or repeated a seq): tracking starts afresh.
            self._flood_log.warning(
                "seq_reset", "seq %d after %d: the scanner restarted its count", h.seq, step.reset_from
            )
            body = {"state": "seq_reset", "from_seq": step.reset_from, "seq": h.seq}
            pipe.outbox.put_nowait(Event("source", body))
        with pipe.stats.lock:
            pipe.stats.frames_in += 1
        pipe.metrics.received()
        self._record(lambda r: r.write(frame))
        queued = QueuedFrame(frame, now)
        self._prepare(queued)
        self._watch(queued)
        evicted = pipe.frames.put(queued, pipe.stop, pipe.settings.poll_s)
        if evicted is not None:
            reason = "shutdown" if evicted.frame is frame else "queue_full"
            pipe.count_drop(reason, seq=evicted.frame.header.seq)
        pipe.metrics.queue_depth(len(pipe.frames))

    def _record(self, write: Callable[[Recorder], None]) -> None:
        """Hand one write to the recorder; a storage failure stops recording, never the stream."""
        if self.recorder is None:
            return
        try:
            write(self.recorder)
        except Exception as exc:
            self._recording_failed(exc)

    def _recording_failed(self, exc: Exception) -> None:
        """Stop recording after a failure: log, event, metrics; the main loop shows `degraded`."""
        pipe, recorder = self.pipe, self.recorder
        self.recorder = None
        if recorder is not None:
            with contextlib.suppress(Exception):
                recorder.close()  # after a StorageError: releases the file, keeps the .part
        if not isinstance(exc, StorageError):
            exc = StorageError(f"recording stopped: {type(exc).__name__}: {exc}", reason=type(exc).__name__)
        self.recording_error = exc
        pipe.metrics.recording(False)
        pipe.metrics.recorder_failed(exc.reason)
        log.error("%s; streaming and publishing continue", exc)
        body = {"stage": "record", "reason": "recorder_failed", "seq": None, "message": str(exc)[:200]}
        pipe.outbox.put(Event("error", body), pipe.clock.publish_deadline, pipe.settings.poll_s)

    def _prepare(self, q: QueuedFrame) -> None:
        ctx = self.pipe.processing  # read once per frame, in seq order: a reload switches at one seq
        if self.pipe.stats.frames_in == 1 and ctx.profile is not None:
            shape = tuple(q.frame.data.shape)
            if shape != tuple(ctx.profile.shape):
                # Every result would be `error`: refuse to run instead (exit 78, no restart loop).
                raise ConfigError(
                    f"calibration profile {ctx.calibration_id} is for {_dims(ctx.profile.shape)} frames "
                    f"(scanner {ctx.profile.scanner}), but the source sends {_dims(shape)}: configure "
                    "the profile made for this scanner"
                )
        if ctx.profile is None and not self._warned_identity:
            self._warned_identity = True
            log.warning("no calibration profile configured: using identity calibration (uncorrected frames)")
        q.prepare(ctx)
        if ctx.profile is not None and not q.calibrated:
            self._report_unfit(q)

    def _report_unfit(self, q: QueuedFrame) -> None:
        """Say once per profile and layout that frames do not fit the profile (they go `uncalibrated`)."""
        ctx = q.ctx
        assert ctx is not None and ctx.profile is not None and ctx.guard is not None
        match = ctx.guard.fit(q.frame.header)
        key = f"{ctx.calibration_id}:{match.reason}"
        if key in self._unfit_warned or len(self._unfit_warned) > 64:
            return
        self._unfit_warned.add(key)
        log.error("%s; results are published `uncalibrated`", match.reason)
        body = {"stage": "acquire", "reason": "calibration_mismatch", "seq": q.frame.header.seq}
        body["message"] = match.reason[:200]
        pipe = self.pipe
        pipe.outbox.put(Event("error", body), pipe.clock.publish_deadline, pipe.settings.poll_s)

    def _watch(self, q: QueuedFrame) -> None:
        """Run the profile's envelope and input checks; announce each change (metric, event, log)."""
        ctx = q.ctx
        if ctx is None or ctx.guard is None or not q.calibrated:
            return
        pipe, guard = self.pipe, ctx.guard
        if guard is not self._watched:
            # A reload brought a new profile (its metric was reset): its checks start afresh.
            self._watched, self.stale, self.drift = guard, None, None
            pipe.metrics.input_drift(False)
        verdict = guard.envelope(q.frame.header)
        stale = verdict.reason if verdict is not None and verdict.stale else None
        if stale != self.stale:
            self.stale = stale
            pipe.metrics.calibration(ctx.calibration_id, stale=stale is not None)
            self._announce("envelope", "stale" if stale else "valid", stale, q.frame.header.seq)
        state = guard.monitor(q.frame.data, q.frame.header.sensor_temp_c)
        if state is not None:
            drift = "; ".join(state.reasons) if state.drifted else None
            if drift != self.drift:
                self.drift = drift
                pipe.metrics.input_drift(drift is not None)
                self._announce("input", "drift" if drift else "steady", drift, q.frame.header.seq)

    def _announce(self, check: str, state: str, reason: str | None, seq: int) -> None:
        if reason:
            log.warning("calibration %s check: %s (seq %d); streaming continues", check, reason, seq)
        else:
            log.info("calibration %s check: %s again (seq %d)", check, state, seq)
        body = {"check": check, "state": state, "reason": reason or "", "seq": seq}
        # Waits for room like a result: a change of calibration state must not be lost.
        pipe = self.pipe
        pipe.outbox.put(Event("calibration", body), pipe.clock.publish_deadline, pipe.settings.poll_s)

    @property
    def calibration_alarm(self) -> str | None:
        """Why the calibration no longer fits the stream (stale profile, input drift), else None."""
        parts = [f"calibration stale: {self.stale}" if self.stale else ""]
        parts.append(f"input drift: {self.drift}" if self.drift else "")
        return "; ".join(p for p in parts if p) or None

    def teardown(self) -> None:
        """Close the source and the recorder."""
        if self.source is not None:
            with contextlib.suppress(Exception):
                self.source.close()
        if self.recorder is not None:
            try:
                self.recorder.close()
            except Exception as exc:  # the disk filled up while finishing the file
                self._recording_failed(exc)
            else:
                self.pipe.metrics.recording(False)
