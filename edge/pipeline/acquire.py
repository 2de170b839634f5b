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
from scanner_io.codec import MalformedFrame
from scanner_io.errors import ConfigError, SourceUnavailableError
from scanner_io.frame import Frame
from scanner_io.ratelog import RateLimitedLog
from scanner_io.recording import Recorder
from scanner_io.seq import SeqTracker
from scanner_io.sources import FrameSource

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
        self, pipe: Pipeline, open_source: OpenSource, open_recorder: OpenRecorder | None = None
    ) -> None:
        super().__init__("acquire", pipe)
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
        self._flood_log = RateLimitedLog(log)  # a flood of junk must not flood the journal

    def setup(self) -> None:
        """Open the source, read the calibration it carries, open the recorder."""
        self.source = self._open_source()
        self.live = self.source.live
        # Read here, in the thread that owns the source, before any frame is read.
        self.source_profile = profile_from_source(self.source)
        if self._open_recorder is not None:
            # The recording carries the profile this stream is conditioned with, also when it is
            # the source's own (the simulator's maps), so its replay conditions frames alike.
            self.recorder = self._open_recorder(self.source_profile)

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
                self.exit_reason = "max_frames"
                return
            item = self.source.read(s.poll_s)
            if item is None:
                if self.recorder is not None:
                    self.recorder.tick()  # a quiet stream still reaches the disk
                if self.source.exhausted:
                    self.exit_reason = "source_ended"
                    return
                self._watch_source()
                continue
            if isinstance(item, Frame):
                self._accept(item)
            else:
                self._malformed(item)
        self.exit_reason = "stopped"

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
        if self.recorder is not None:
            with contextlib.suppress(Exception):
                self.recorder.write_event("malformed", reason=reason, seq=seq)
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
        if self.recorder is not None:
            self.recorder.write(frame)
        queued = QueuedFrame(frame, now)
        self._prepare(queued)
        evicted = pipe.frames.put(queued, pipe.stop, pipe.settings.poll_s)
        if evicted is not None:
            reason = "shutdown" if evicted.frame is frame else "queue_full"
            pipe.count_drop(reason, seq=evicted.frame.header.seq)
        pipe.metrics.queue_depth(len(pipe.frames))

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

    def teardown(self) -> None:
        """Close the source and the recorder."""
        for thing in (self.source, self.recorder):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.close()
