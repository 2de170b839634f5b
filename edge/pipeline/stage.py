"""What a stage is (`Stage`, a thread) and what every stage receives (`Pipeline`)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from edge.observability import StateTracker
from edge.pipeline.context import DaemonSettings, ModelInfo, ProcessingContext
from edge.pipeline.metrics import Metrics
from edge.pipeline.queues import FrameQueue, Outbox
from edge.pipeline.scoring import TruthScorer
from edge.pipeline.stats import Stats
from edge.sdnotify import Heartbeat
from scanner_io.osthread import name_native_thread

log = logging.getLogger("thzedge.daemon")

# Shares of the stop timeout: inference stops taking queued frames at the first, and handing
# results or events to the publisher gives up at the second, so the publisher has time to send.
DRAIN_SHARE = 0.6
PUBLISH_SHARE = 0.85


class StopClock:
    """When the stop began, and the deadlines derived from it (None while running)."""

    def __init__(self, stop_timeout_s: float) -> None:
        self.stop_timeout_s = stop_timeout_s
        self.stop_at: float | None = None

    def _after(self, share: float) -> float | None:
        return None if self.stop_at is None else self.stop_at + share * self.stop_timeout_s

    def drain_deadline(self) -> float | None:
        """Inference drops what is still queued (as `shutdown`) after this."""
        return self._after(DRAIN_SHARE)

    def publish_deadline(self) -> float | None:
        """Waiting for the publisher (or a lockstep subscriber) gives up after this."""
        return self._after(PUBLISH_SHARE)

    def hard_deadline(self) -> float | None:
        """The whole run ends by this, stages finished or not."""
        return self._after(1.0)


@dataclass
class Pipeline:
    """The one object every stage receives: settings, counters, queues, stop events and deadlines.

    `processing` is swapped (one reference) by a reload; `state_version` counts state changes so
    the publisher announces each one.
    """

    settings: DaemonSettings
    model: ModelInfo
    processing: ProcessingContext
    tracker: StateTracker
    frames: FrameQueue  # acquire → infer
    outbox: Outbox  # acquire, infer → publish
    metrics: Metrics = field(default_factory=Metrics)
    stats: Stats = field(default_factory=Stats)
    heartbeat: Heartbeat = field(default_factory=Heartbeat)  # stamped by inference; gates WATCHDOG=1
    stop: threading.Event = field(default_factory=threading.Event)  # stop accepting frames
    upstream_done: threading.Event = field(default_factory=threading.Event)  # no new frames will come
    infer_done: threading.Event = field(default_factory=threading.Event)  # no new results will come
    clock: StopClock = field(init=False)
    state_version: int = 0
    scorer: TruthScorer | None = None  # `thzedge run --score`: results against simulator truth

    def __post_init__(self) -> None:
        self.clock = StopClock(self.settings.stop_timeout_s)

    def count_drop(self, reason: str, n: int = 1, seq: int | None = None) -> None:
        """Count `n` dropped frames in the run's stats and metrics; with `seq`, in a `drop` event too."""
        self.stats.drop(reason, n)
        self.metrics.dropped(reason, n)
        if seq is not None:
            self.outbox.report_drop(reason, seq, n)


class Stage(threading.Thread):
    """A named pipeline stage: `setup()` then `loop()` in its own thread, `teardown()` always."""

    def __init__(self, name: str, pipe: Pipeline) -> None:
        super().__init__(name=f"thzedge-{name}", daemon=True)
        self.stage_name = name
        self.pipe = pipe
        self.ready = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def setup(self) -> None:
        """Open what the stage owns (in its own thread: sockets stay with their creator)."""

    def loop(self) -> None:
        """Run until finished or stopped."""

    def teardown(self) -> None:
        """Close what the stage owns."""

    def run(self) -> None:
        """Set up, loop and tear down, keeping a failure on `error` for the main thread."""
        # The kernel name lets the per-stage CPU time be read from /proc (benchmarks/bench_daemon.py).
        name_native_thread(f"thz-{self.stage_name}")
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
