"""The publisher stage: owns the results socket; sends results and events, welcomes joiners.

The other stages hand it results and events through the `Outbox`, so no socket is ever shared
between threads. It announces the daemon's `state` to each subscriber that joins, on every
state change and every `state_interval_s`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from edge.gallery import VerificationMode
from edge.pipeline.acquire import AcquisitionStage
from edge.pipeline.queues import Event
from edge.pipeline.stage import Pipeline, Stage
from edge.results import RESULTS_PROTOCOL_VERSION, FrameResult, ResultPublisher
from edge.results_mcap import ResultsRecorder

Binder = Callable[[zmq.Socket, str], str]  # edge.security.EndpointSecurity (callable: bind)

log = logging.getLogger("thzedge.daemon")
# At most this long, within the stop deadline, the last messages get to reach subscribers on stop.
FLUSH_ON_STOP_S = 1.0


class PublisherStage(Stage):
    """Owns the results socket: sends results and events, welcomes joiners with the state."""

    def __init__(self, pipe: Pipeline, upstream: AcquisitionStage, binder: Binder | None = None) -> None:
        super().__init__("publish", pipe)
        self.upstream = upstream  # the source's scanner name, state and mode
        self._binder = binder
        self.publisher: ResultPublisher | None = None
        self.recorder: ResultsRecorder | None = None
        self._drops_reported = 0
        self._last_state = 0.0
        self._state_version = -1
        self._revocations = getattr(binder, "revocations", 0)
        self.joined = threading.Event()  # set once a first subscription has arrived

    def scanner(self) -> str:
        """The scanner name for event topics: the stream's, else the instance name."""
        return self.upstream.scanner or self.pipe.settings.scanner

    def state(self) -> dict[str, Any]:
        """The `state` event body: lifecycle, model, calibration, source, mode and payloads."""
        pipe, s = self.pipe, self.pipe.settings
        ctx = pipe.processing
        return {
            "state": pipe.tracker.state,
            "version": pipe.state_version,
            "protocol": RESULTS_PROTOCOL_VERSION,
            "model": pipe.model.to_dict(),
            "calibration": ctx.calibration_id,
            "source": self.upstream.source_state,
            "mode": "live" if self.upstream.live else "lockstep",
            "verification": str(s.verification_mode if ctx.gallery is not None else VerificationMode.off),
            "payloads": {
                "embedding": s.publish_embedding,
                "reconstruction": s.publish_reconstruction and s.reconstruction,
                "input": s.publish_input,
            },
        }

    def setup(self) -> None:
        """Bind the results socket (in this thread: it is used only here)."""
        s = self.pipe.settings
        self.publisher = ResultPublisher(
            s.endpoint,
            self.scanner(),
            hwm=s.hwm,
            lockstep=not self.upstream.live,
            publish_embedding=s.publish_embedding,
            publish_reconstruction=s.publish_reconstruction,
            publish_input=s.publish_input,
            binder=self._binder,
            ipc_mode=s.ipc_mode,
            ipc_group=s.ipc_group,
        )
        if s.record_results is not None:
            self.recorder = ResultsRecorder(s.record_results, biometric=s.record_biometric)

    def loop(self) -> None:
        """Send until inference is done and the outbox is empty."""
        pipe = self.pipe
        pub = self.publisher
        assert pub is not None  # bound by setup
        deadline = pipe.clock.publish_deadline
        while True:
            now = time.monotonic()
            revocations = getattr(self._binder, "revocations", 0)
            if revocations != self._revocations:
                self._revocations = revocations
                pub.rebind()  # a revoked client still connected is cut off here
                log.info("results socket rebound after a CURVE key was revoked")
            joins = pub.poll_subscriptions()
            if joins:
                self.joined.set()
            pub.scanner = self.scanner()
            version = pipe.state_version
            if (
                joins
                or now - self._last_state >= pipe.settings.state_interval_s
                or version != self._state_version
            ):
                # Built only when sent: this loop runs once per result.
                pub.publish_event("state", self.state(), deadline)
                self._last_state = now
                self._state_version = version
            for body in pipe.outbox.take_drop_events(now):
                pub.publish_event("drop", body, deadline)
            item = pipe.outbox.get(pipe.settings.poll_s)
            if item is None:
                if pipe.infer_done.is_set() and pipe.outbox.qsize() == 0:
                    for body in pipe.outbox.take_drop_events(time.monotonic(), force=True):
                        pub.publish_event("drop", body, deadline)
                    return
                continue
            if isinstance(item, Event):
                pub.publish_event(item.kind, item.body, deadline)
            else:
                for r in item:
                    self._send_result(pub, r)

    def _send_result(self, pub: ResultPublisher, r: FrameResult) -> None:
        pipe = self.pipe
        with pipe.stats.lock:
            dropped_total = sum(pipe.stats.dropped.values())
        r.dropped_since_last = dropped_total - self._drops_reported
        self._drops_reported = dropped_total
        t_pub = pub.publish_result(r, pipe.clock.publish_deadline)
        if t_pub is None:
            pipe.count_drop("shutdown")
            return
        with pipe.stats.lock:
            pipe.stats.published += 1
            total = r.latency_ms.get("total")
            if total is not None:
                pipe.stats.latency_ms.append(total)
            for k, v in r.latency_ms.items():
                ring = pipe.stats.stage_ms.get(k)
                if ring is not None:
                    ring.append(v)
        pipe.metrics.published(r, t_pub)
        if self.recorder is not None:
            self.recorder.write(r, t_pub)
        if pipe.scorer is not None:
            try:
                pipe.scorer.published(r)
            except Exception as exc:  # scoring is a test aid: it never stops the results stream
                log.warning("scoring seq %d failed: %s", r.seq, type(exc).__name__)

    def teardown(self) -> None:
        """Announce `stopped`, let what was sent reach subscribers (bounded), close the socket."""
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                st = self.state()
                st["state"] = "stopped"
                deadline = self.pipe.clock.hard_deadline()
                left = FLUSH_ON_STOP_S if deadline is None else deadline - time.monotonic()
                self.publisher.publish_last_event("state", st, min(FLUSH_ON_STOP_S, left))
            self.publisher.close()
        if self.recorder is not None:
            self.recorder.close()
