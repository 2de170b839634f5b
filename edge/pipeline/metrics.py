"""The pipeline's metrics calls: forwarded to `DaemonMetrics`, and never allowed to break a stage."""

from __future__ import annotations

import logging
from collections.abc import Callable

from edge.observability import DaemonMetrics, Stage
from edge.results import FrameResult
from edge.telemetry import install_jetson_telemetry

log = logging.getLogger("thzedge.daemon")
# (result latency key, metric stage label) of every stage, read once: this runs per result.
_STAGE_KEYS: tuple[tuple[str, str], ...] = tuple((s.value, s.metric) for s in Stage)


def start_device_telemetry(impl: DaemonMetrics) -> Callable[[], None]:
    """Add a Jetson's tegrastats gauges to the daemon's registry (none elsewhere); returns the stop call."""
    telemetry = install_jetson_telemetry(impl.registry)
    return telemetry.close if telemetry is not None else lambda: None


class Metrics:
    """Forwards pipeline counts to `DaemonMetrics` (when there is one); never identity, score or image."""

    def __init__(self, impl: DaemonMetrics | None = None) -> None:
        self.impl = impl

    def _do(self, fn: Callable[[DaemonMetrics], object]) -> None:
        if self.impl is None:
            return
        try:
            fn(self.impl)
        except Exception as exc:  # metrics must never break the pipeline
            log.debug("metrics: %s: %s", type(exc).__name__, exc)

    def received(self) -> None:
        """Count one frame from the source."""
        self._do(lambda m: m.frame_received())

    def malformed(self, reason: str) -> None:
        """Count one rejected message (also counted as dropped{reason="malformed"})."""
        self._do(lambda m: m.malformed(reason))

    def dropped(self, reason: str, n: int = 1) -> None:
        """Count `n` dropped frames under `reason`."""
        self._do(lambda m: m.dropped(reason, n))

    def processed(self) -> None:
        """Count one frame that went through inference."""
        self._do(lambda m: m.frames_processed.inc())

    def published(self, r: FrameResult, t_publish_ns: int | None = None) -> None:
        """Count a published result and observe its stage times and end-to-end latency."""

        def go(m: DaemonMetrics) -> None:
            m.published(r.status)
            # One observation per metric stage and frame: verify + reconstruct add up to `postprocess`.
            seconds: dict[str, float] = {}
            for key, metric in _STAGE_KEYS:
                ms = r.latency_ms.get(key)
                if ms is not None:
                    seconds[metric] = seconds.get(metric, 0.0) + ms / 1e3
            for label, s in seconds.items():
                m.observe_stage(label, s)
            if t_publish_ns is not None and t_publish_ns >= r.t_capture_ns:
                m.end_to_end_latency.observe((t_publish_ns - r.t_capture_ns) / 1e9)

        self._do(go)

    def task_error(self, task: str) -> None:
        """Count one per-frame task failure."""
        self._do(lambda m: m.task_errors.labels(task).inc())

    def queue_depth(self, n: int) -> None:
        """Record the frames waiting for inference."""
        self._do(lambda m: m.queue_depth.set(n))

    def batch_size(self, n: int) -> None:
        """Observe one inference batch's size."""
        self._do(lambda m: m.batch_size.observe(n))

    def source_state(self, state: str) -> None:
        """Record the source state."""
        self._do(lambda m: m.set_source_state(state))

    def calibration(self, profile_id: str, stale: bool = False) -> None:
        """Record the active calibration profile id and whether it is outside its envelope."""
        self._do(lambda m: m.set_calibration(profile_id, stale))

    def input_drift(self, drifted: bool) -> None:
        """Record whether the input monitor sees drift against the profile (R-NEW-11)."""
        self._do(lambda m: m.input_drift.set(1 if drifted else 0))

    def no_face(self, reason: str) -> None:
        """Count one frame with no head in it, by reason (blank, flat, saturated, too_small)."""
        self._do(lambda m: m.no_face.labels(reason).inc())

    def watchdog_ping(self) -> None:
        """Count one WATCHDOG=1 sent to systemd."""
        self._do(lambda m: m.watchdog_pings.inc())

    def source_recreated(self, n: int = 1) -> None:
        """Count `n` acquisition sockets recreated after the scanner was lost."""
        self._do(lambda m: m.source_recreated.inc(n))

    def recording_bad_chunks(self, n: int = 1) -> None:
        """Count `n` chunks of a replayed recording skipped (corrupt, tampered or missing)."""
        self._do(lambda m: m.recording_bad_chunks.inc(n))

    def recording(self, on: bool) -> None:
        """Record whether raw frames are being recorded."""
        self._do(lambda m: m.recording.set(1 if on else 0))

    def recorder_failed(self, reason: str) -> None:
        """Count one recording stopped by a storage failure (`reason`: the errno name)."""
        self._do(lambda m: m.recorder_failures.labels(reason).inc())
