"""The daemon: the stage graph (`Daemon.compose`) and its lifecycle (`Daemon.run`).

```
 acquire ──► FrameQueue ──► infer ──► post-process ──► Outbox ──► publish
 (acquire.py) (queues.py)   (infer.py) (postprocess.py) (queues.py) (publish.py)
```

`Daemon.run()` is the main loop: it starts the stages, sends sd_notify STATUS/READY/WATCHDOG/
STOPPING, applies SIGHUP reloads, reports stalls, and on SIGTERM/SIGINT (which only set an
event) lets the stages drain inside `stop_timeout_s`. Every frame that entered is accounted
for: published, or dropped with a reason (`RunSummary.unaccounted` is 0 on a clean run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from calibration.profile import ProfileChoice
from edge.fleet.golden import require_canary
from edge.observability import DaemonMetrics, StateTracker
from edge.pipeline.acquire import AcquisitionStage, OpenRecorder, OpenSource
from edge.pipeline.context import DaemonSettings, ModelInfo, ProcessingContext
from edge.pipeline.infer import InferenceStage
from edge.pipeline.metrics import Metrics
from edge.pipeline.postprocess import PostProcessor
from edge.pipeline.publish import Binder, PublisherStage
from edge.pipeline.queues import Event, FrameQueue, Outbox
from edge.pipeline.scoring import TruthScorer
from edge.pipeline.stage import Pipeline, Stage
from edge.pipeline.stats import RunSummary, Stats
from edge.quarantine import Quarantine
from edge.runner import ModelRunner
from edge.sdnotify import Heartbeat, Notifier, WatchdogPinger
from scanner_io.errors import CanaryError, InternalError, ThzEdgeError
from scanner_io.sources import QueuePolicy

log = logging.getLogger("thzedge.daemon")

# Loads calibration and gallery: generation 0 at start-up, +1 per reload; given what the source carries.
LoadContext = Callable[[int, ProfileChoice | None], ProcessingContext]
SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class _SafeNotifier:
    """Wraps the Notifier so a vanished NOTIFY_SOCKET never stops the pipeline."""

    def __init__(self, notifier: Notifier) -> None:
        self._n = notifier

    def status(self, text: str) -> None:
        with contextlib.suppress(OSError):
            self._n.status(text)

    def ready(self) -> None:
        with contextlib.suppress(OSError):
            self._n.ready()

    def reloading(self) -> None:
        with contextlib.suppress(OSError):
            self._n.reloading()

    def stopping(self) -> None:
        with contextlib.suppress(OSError):
            self._n.stopping()


class Daemon:
    """Wires the stages (`compose`), runs the main loop and returns a `RunSummary`.

    Collaborators are passed in (a runner, a source factory, a context loader), so tests can run
    the real loop in-process to completion with `max_frames`; `edge.pipeline.assemble.run_daemon`
    builds them from the config.
    """

    def __init__(
        self,
        settings: DaemonSettings,
        runner: ModelRunner,
        open_source: OpenSource,
        load_context: LoadContext,
        notifier: Notifier | None = None,
        metrics: DaemonMetrics | None = None,
        open_recorder: OpenRecorder | None = None,
        binder: Binder | None = None,
        model: ModelInfo | None = None,
        on_ready: Callable[[Daemon], None] | None = None,
        scorer: TruthScorer | None = None,
        quarantine: Quarantine | None = None,
    ) -> None:
        self.settings = settings
        self._quarantine = quarantine
        self.runner = runner
        self._open_source = open_source
        self._load_context = load_context
        self._open_recorder = open_recorder
        self._binder = binder
        self.notifier = notifier if notifier is not None else Notifier(env={})
        self.metrics = Metrics(metrics)
        self._notify = _SafeNotifier(self.notifier)  # the pinger gets the raw one: it has its own guard
        self.tracker = StateTracker(metrics, self._notify, log)
        self.heartbeat = Heartbeat()  # stamped by the inference loop; gates WATCHDOG=1
        self.model = model or ModelInfo()
        self.on_ready = on_ready
        self.scorer = scorer
        self.stats = Stats()
        self.stop_event = threading.Event()  # set by SIGTERM/SIGINT or `request_stop`
        self.reload_event = threading.Event()  # set by SIGHUP or `request_reload`
        self.ready = threading.Event()
        self.pinger: WatchdogPinger | None = None
        self.pipe: Pipeline | None = None
        self._state_version = 0  # counts state changes, so the publisher announces each one
        self._ready_at = time.monotonic()
        self._source_profile: ProfileChoice | None = None  # calibration the source carries
        self.acquire: AcquisitionStage | None = None
        self.infer: InferenceStage | None = None
        self.publish: PublisherStage | None = None

    # -- control, callable from any thread or a signal handler -----------------------------

    def request_stop(self) -> None:
        """Stop accepting frames; the stages drain and the run ends within `stop_timeout_s`."""
        self.stop_event.set()

    def request_reload(self) -> None:
        """Reload gallery and calibration at the next main-loop turn."""
        self.reload_event.set()

    @property
    def state_name(self) -> str:
        """The lifecycle state (starting, ready, stalled, …)."""
        return str(self.tracker.state)

    # -- wiring -------------------------------------------------------------------------------

    def compose(self, processing: ProcessingContext) -> list[Stage]:
        """Build the stage graph: acquire → FrameQueue → infer → Outbox → publish."""
        s = self.settings
        frames = FrameQueue(s.queue_size, block_when_full=False)  # the policy follows the source: `_run`
        outbox = Outbox(maxsize=max(16, 4 * max(1, int(self.runner.max_batch))))
        pipe = Pipeline(
            settings=s,
            model=self.model,
            processing=processing,
            tracker=self.tracker,
            frames=frames,
            outbox=outbox,
            metrics=self.metrics,
            stats=self.stats,
            heartbeat=self.heartbeat,
            stop=self.stop_event,
            state_version=self._state_version,
            scorer=self.scorer,
        )
        self.pipe = pipe
        # source → decode+validate, seq gaps → calibrate+condition → frames
        self.acquire = AcquisitionStage(pipe, self._open_source, self._open_recorder, self._quarantine)
        # frames → encoder + decoders (edge.runner.infer_isolated) → post-process → outbox
        post = PostProcessor(pipe, self.runner.postures)
        self.infer = InferenceStage(pipe, self.runner, post)
        # outbox → results socket
        self.publish = PublisherStage(pipe, upstream=self.acquire, binder=self._binder)
        return [self.acquire, self.infer, self.publish]

    # -- lifecycle ----------------------------------------------------------------------------

    def _set_state(self, name: str, detail: str = "") -> None:
        if self.tracker.set(name, detail):
            self._state_version += 1
            if self.pipe is not None:
                self.pipe.state_version = self._state_version

    def _warm_up(self) -> None:
        x = np.zeros((1, 1, 64, 64), dtype=np.float32)
        enc = self.runner.encode(x)
        if self.settings.reconstruction:
            self.runner.reconstruct(enc, np.zeros(1, dtype=np.int64))

    def _canary(self, golden: Path) -> None:
        """Replay the canary through all three tasks; on a mismatch stay unready and exit 79 (R-NEW-12)."""
        self._set_state("warming_up", "canary replay")
        try:
            report = require_canary(self.runner, golden, self.model)
        except CanaryError as exc:
            # STATUS says why; `run` keeps this detail when it marks the daemon failed.
            self._set_state("failed", str(exc)[:300])
            raise
        log.info("canary passed: %d frames (%s)", report.frames, report.mode)

    def _install_signals(self) -> dict[int, SignalHandler]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old: dict[int, SignalHandler] = {}

        # Handlers only set events: the main loop does the work (sockets, files) outside them.
        def stop(_sig: int, _frame: FrameType | None) -> None:
            self.request_stop()

        def reload(_sig: int, _frame: FrameType | None) -> None:
            self.request_reload()

        for sig, handler in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, reload)):
            old[sig] = signal.signal(sig, handler)
        return old

    def run(self) -> RunSummary:
        """Start up (STATUS per step, READY when all is up), stream until done, stop cleanly."""
        t_start = time.monotonic()
        old_handlers = self._install_signals()
        try:
            return self._run(t_start)
        except BaseException:
            if self.state_name != "failed":
                self._set_state("failed")
            self.stop_event.set()
            raise
        finally:
            if self.pinger is not None:
                self.pinger.stop()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)

    def _wait_for_subscriber(self, pub: PublisherStage) -> None:
        """Hold a lockstep source until a first subscriber joins ([publisher] wait_subscriber_s).

        A lockstep run loses nothing to a subscriber that is connected, but what is sent before a
        subscription arrives never reaches it; a replay can end before a consumer started with
        it has joined. Waiting is bounded: after the timeout the run starts anyway (logged).
        """
        wait_s = self.settings.wait_subscriber_s
        self.tracker.status(f"waiting up to {wait_s:g} s for a first subscriber")
        end = time.monotonic() + wait_s
        while not pub.joined.wait(self.settings.poll_s):
            if self.stop_event.is_set() or pub.done.is_set():  # stopped, or the publisher failed
                return
            if time.monotonic() >= end:
                log.warning("no subscriber joined within %g s: starting the lockstep source anyway", wait_s)
                return

    def _run(self, t_start: float) -> RunSummary:
        self.tracker.status("loading calibration and gallery")
        ctx = self._load_context(0, None)
        self._set_state("warming_up", "warm-up inference")
        self._warm_up()
        if self.settings.canary is not None:
            self._canary(self.settings.canary)
        acq, inf, pub = self.compose(ctx)
        pipe = self.pipe
        assert isinstance(acq, AcquisitionStage) and pipe is not None
        self.tracker.status("opening source")
        acq.start()
        acq.ready.wait()
        if acq.error is not None:
            raise acq.error
        if acq.source_profile is not None and ctx.profile is None:
            # No profile configured, but the source carries one (a recording's, R-REC-2, or the
            # simulator's true maps). No frame has been conditioned yet: acquisition waits for `go`.
            self._source_profile = acq.source_profile
            pipe.processing = self._load_context(0, self._source_profile)
            log.info(
                "no calibration profile configured: using %s (profile %s)",
                self._source_profile.origin,
                pipe.processing.calibration_id,
            )
        self.metrics.calibration(pipe.processing.calibration_id)
        if self.settings.queue_policy is not QueuePolicy.auto:
            acq.live = self.settings.queue_policy is QueuePolicy.drop_oldest
        pipe.frames.block_when_full = not acq.live
        self.tracker.status("binding results socket")
        pub.start()
        pub.ready.wait()
        if pub.error is not None:
            self.stop_event.set()
            acq.join(timeout=self.settings.stop_timeout_s)
            raise pub.error
        inf.start()
        # A lockstep source may wait for a first subscriber; that wait is after READY: the daemon
        # is ready to serve it.
        hold = not acq.live and self.settings.wait_subscriber_s > 0
        if not hold:
            acq.go.set()
        assert self.publish is not None and self.publish.publisher is not None
        endpoint = self.publish.publisher.bound_endpoint
        mode = "live" if acq.live else "lockstep"
        # READY=1 only now: model loaded + warmed up, source open, socket bound (R-SYS-1).
        fallback = f"; {self.model.backend}: {self.model.fallback}" if self.model.fallback else ""
        self._set_state("ready", f"publishing on {endpoint} ({mode} source{fallback})")
        self._notify.ready()
        self.ready.set()
        self._ready_at = time.monotonic()
        self.pinger = WatchdogPinger(
            self.notifier,
            self.heartbeat,
            max_age_s=self.settings.heartbeat_timeout_s,
            on_ping=self.metrics.watchdog_ping,
        )
        self.pinger.start()
        if hold:
            self._wait_for_subscriber(self.publish)
            self._ready_at = time.monotonic()  # a source is silent from here on, not while held
            acq.go.set()
        if self.on_ready is not None:
            self.on_ready(self)
        self._main_loop(pipe)
        if isinstance(acq.error, ThzEdgeError):
            # The stream cannot go on (a profile for other frames, a source that cannot recover):
            # exit with the error's code, so systemd tells a bad config from a crash.
            raise acq.error
        for stage in (acq, inf, pub):
            if stage.error is not None:
                # A stage died of a bug mid-stream: not a clean end (exit 0 would keep systemd's
                # Restart=on-failure from restarting the service). The summary was logged.
                log.error("run ended early: %s", self._streaming_status())
                raise InternalError(
                    f"stage {stage.stage_name} failed: {type(stage.error).__name__}: {stage.error}"
                ) from stage.error
        summary = self.stats.summary(
            time.monotonic() - t_start, endpoint, acq.exit_reason, self.model.precision, self.model.backend
        )
        if acq.recording_error is not None:
            summary = dataclasses.replace(summary, recording_error=str(acq.recording_error))
        return summary

    def _main_loop(self, pipe: Pipeline) -> None:
        acq, inf, pub = self.acquire, self.infer, self.publish
        assert acq is not None and inf is not None and pub is not None
        last_status = time.monotonic()
        while True:
            now = time.monotonic()
            if self.stop_event.is_set() and pipe.clock.stop_at is None:
                pipe.clock.stop_at = now
                self._set_state("stopping", "draining queued frames")
                self._notify.stopping()
            # Set here from the stages' `done`, not handed the stages' own events: the loop
            # enters `stopping` (STOPPING=1) before it lets inference and the publisher finish.
            if acq.done.is_set():
                pipe.upstream_done.set()
            if inf.done.is_set():
                pipe.infer_done.set()
            hard_deadline = pipe.clock.hard_deadline()
            if pub.done.is_set() or (hard_deadline is not None and now >= hard_deadline):
                break
            if acq.done.is_set() and pipe.clock.stop_at is None:
                # Finite source ended, --max-frames reached, or the source failed: a normal stop
                # that still lets inference and publisher finish what is queued.
                self.stop_event.set()
                continue
            if self.reload_event.is_set():
                self.reload_event.clear()
                self._reload(pipe)
            if pipe.clock.stop_at is None:
                self._update_state(pipe, now)
                if now - last_status >= self.settings.status_interval_s:
                    # State changes send STATUS themselves; this refreshes the counts in between.
                    last_status = now
                    ready = self.state_name == "ready"
                    self.tracker.status(self._streaming_status() if ready else self.tracker.detail)
            time.sleep(0.05)
        end = pipe.clock.hard_deadline() or time.monotonic()
        stages: list[Stage] = [acq, inf, pub]
        for st in stages:
            st.join(timeout=max(0.0, end - time.monotonic()))
        for st in stages:
            if st.is_alive():
                log.error("stage %s did not stop within the stop timeout; exiting anyway", st.stage_name)
        # Anything still queued after the stages gave up is counted, never silently lost.
        if not inf.is_alive():
            left = pipe.frames.drain()
            if left:
                pipe.count_drop("shutdown", len(left))
        self._set_state("stopped")

    def _update_state(self, pipe: Pipeline, now: float) -> None:
        acq, inf, pub = self.acquire, self.infer, self.publish
        assert acq is not None and inf is not None and pub is not None
        src = acq.source_state
        self.metrics.source_state(src)
        last = acq.last_frame_t
        # Silence counts from the last frame, or from READY when none has come yet.
        silent = now - (last if last is not None else self._ready_at)
        hung = self.heartbeat.age_s > self.settings.heartbeat_timeout_s and not inf.done.is_set()
        if hung:
            self._set_state("degraded", "inference not responding")
        elif src in ("down", "stalled") or silent > self.settings.stalled_after_s:
            since = f"no frame for {silent:.0f} s" if last is not None else "no frame yet"
            self._set_state("stalled", f"source {src}, {since}")
        elif (alarm := acq.calibration_alarm) is not None:
            # R-CAL-3 / R-NEW-11: still streaming (and ready), but not to be trusted blindly.
            self._set_state("degraded", alarm[:200])
        elif (
            not acq.live
            and len(pipe.frames) >= self.settings.queue_size
            and (pub.publisher is not None and pub.publisher.blocked_s > 0)
        ):
            self._set_state("blocked", "downstream backpressure")
        elif acq.recording_error is not None:
            # Streaming goes on; the operator frees space and restarts to record again.
            self._set_state("degraded", f"recording stopped ({acq.recording_error.reason}); still publishing")
        else:
            self._set_state("ready", self._streaming_status() if last is not None else "waiting for frames")

    def _streaming_status(self) -> str:
        s = self.stats
        with s.lock:
            return f"{s.frames_in} frames in, {s.published} published, {sum(s.dropped.values())} dropped"

    def _reload(self, pipe: Pipeline) -> None:
        prev = self.state_name
        self._set_state("reloading", "gallery and calibration")
        self._notify.reloading()
        try:
            new = self._load_context(pipe.processing.generation + 1, self._source_profile)
        except Exception as exc:
            # Keep streaming with what we have; the message names files, never identities.
            log.error("reload failed, keeping the current calibration and gallery: %s", exc)
            body = {"stage": "reload", "reason": "reload_failed", "seq": None, "message": type(exc).__name__}
            pipe.outbox.put_nowait(Event("error", body))
        else:
            pipe.processing = new  # one reference swap: batches after it use `new`, none is half-switched
            self.metrics.calibration(new.calibration_id)
            log.info(
                "reloaded: calibration %s, gallery %s",
                new.calibration_id,
                "loaded" if new.gallery is not None else "none",
            )
        self._notify.ready()
        self._set_state(prev if prev not in ("reloading", "starting") else "ready")
