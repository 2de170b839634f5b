"""Daemon metrics (Prometheus), `/healthz` + `/readyz`, and state transitions in logs and STATUS.

`DaemonMetrics` keeps every series on its own `CollectorRegistry`, so several daemons (or tests)
in one process do not collide. Labels are only ever stage, reason, status, task and state
names: never an identity, score, embedding or image (R-SEC-5). `serve_http` exposes the
registry and the health endpoints on 127.0.0.1 unless told otherwise (R-SEC-4).

`StateTracker` makes each state transition (starting, warming_up, ready, degraded, stalled,
blocked, reloading, stopping) visible in three places at once (R-OBS-1): the `state` gauge, a
log line carrying a stable `MESSAGE_ID`, and systemd's STATUS.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest

from edge.config import split_host_port
from scanner_io.choices import Choice
from scanner_io.codec import DECODE_REASONS
from scanner_io.errors import ConfigError, ResourceBusyError

log = logging.getLogger("thzedge.daemon")

# Known reasons are pre-created at 0 so dashboards and alerts see the series before the first drop.
DROP_REASONS = ("queue_full", "stale", "malformed", "upstream_gap", "task_error", "shutdown")


class Stage(Choice):
    """A timed step of the frame's way: its key in a result's `latency_ms` (docs/protocol.md) and
    the `stage` label it is observed under in `thzedge_stage_duration_seconds` (`metric`).

    The metric is coarser than the result: encoder time is `infer`; gallery verification and the
    decoders together are `postprocess`.
    """

    metric: str

    def __new__(cls, key: str, metric: str) -> Stage:
        member = str.__new__(cls, key)
        member._value_ = key
        member.metric = metric
        return member

    queue = ("queue", "queue_wait")
    condition = ("condition", "condition")
    encoder = ("encode", "infer")  # not `encode`: that name is str.encode
    verify = ("verify", "postprocess")
    reconstruct = ("reconstruct", "postprocess")
    publish = ("publish", "publish")


# The `stage` labels of thzedge_stage_duration_seconds, in the order of the frame's way.
STAGE_METRICS: tuple[str, ...] = tuple(dict.fromkeys(s.metric for s in Stage))
RESULT_STATUSES = ("ok", "partial", "error", "no_face", "uncalibrated")
SOURCE_STATES = ("up", "stalled", "down", "ended", "failed")
DAEMON_STATES = (
    "starting",
    "warming_up",
    "ready",
    "degraded",
    "stalled",
    "blocked",
    "reloading",
    "stopping",
    "stopped",
    "failed",
)
# Once ready, the daemon stays ready through degraded/stalled/blocked/reloading (it still serves).
NOT_READY_STATES = ("starting", "warming_up", "stopping", "stopped", "failed")
# Stage latencies on CPU run from ~0.1 ms (decode) to ~100 ms (a CPU batch); end to end up to seconds.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# Stable journal MESSAGE_IDs per event type (systemd convention: 128-bit, lowercase hex), derived
# from fixed names so they never change between releases.
_MSGID_NS = uuid.UUID("6f1c3a52-8d6e-4b1f-9a57-3e2f0c4d5b61")


def message_id(event: str) -> str:
    """Return the stable 128-bit MESSAGE_ID (32 hex digits) for an event name like `state.ready`."""
    return uuid.uuid5(_MSGID_NS, event).hex


class DaemonMetrics:
    """Every metric the daemon exports, on one private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames_received = Counter(
            "thzedge_frames_received_total", "Frames delivered by the source (valid or not).", registry=r
        )
        self.frames_processed = Counter(
            "thzedge_frames_processed_total", "Frames that went through inference.", registry=r
        )
        self.results_published = Counter(
            "thzedge_results_published_total", "Result messages published.", ["status"], registry=r
        )
        self.frames_dropped = Counter(
            "thzedge_frames_dropped_total",
            "Frames dropped without a result, by reason.",
            ["reason"],
            registry=r,
        )
        self.frames_malformed = Counter(
            "thzedge_frames_malformed_total",
            "Messages rejected by the frame decoder.",
            ["reason"],
            registry=r,
        )
        self.task_errors = Counter(
            "thzedge_task_errors_total",
            "Per-frame task failures (result published as partial).",
            ["task"],
            registry=r,
        )
        self.stage_latency = Histogram(
            "thzedge_stage_duration_seconds",
            "Time per frame in each pipeline stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.end_to_end_latency = Histogram(
            "thzedge_end_to_end_latency_seconds",
            "Capture timestamp to publish.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "thzedge_batch_size", "Frames per inference batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("thzedge_queue_depth", "Frames waiting for inference.", registry=r)
        self.source_state = Enum(
            "thzedge_source_state", "State of the frame source.", states=list(SOURCE_STATES), registry=r
        )
        self.source_up = Gauge("thzedge_source_up", "1 while the source delivers frames.", registry=r)
        self.source_last_frame_age = Gauge(
            "thzedge_source_last_frame_age_seconds", "Seconds since the last frame arrived.", registry=r
        )
        self.state = Enum("thzedge_state", "Daemon lifecycle state.", states=list(DAEMON_STATES), registry=r)
        self.ready = Gauge("thzedge_ready", "1 once the daemon is ready to stream.", registry=r)
        self.calibration_stale = Gauge(
            "thzedge_calibration_stale",
            "1 when the calibration profile is outside its validity envelope.",
            registry=r,
        )
        self.calibration_info = Info("thzedge_calibration", "Active calibration profile.", registry=r)
        self.input_drift = Gauge(
            "thzedge_input_drift",
            "1 while the input monitor sees the stream drift from its calibration profile (R-NEW-11).",
            registry=r,
        )
        self.no_face = Counter(
            "thzedge_no_face_frames_total",
            "Frames with no head in them (published `no_face`, the model not run), by reason.",
            ["reason"],
            registry=r,
        )
        self.build_info = Info("thzedge_build", "Version, model bundle and backend in use.", registry=r)
        self.watchdog_pings = Counter(
            "thzedge_watchdog_pings_total", "WATCHDOG=1 sent to systemd.", registry=r
        )
        self.source_recreated = Counter(
            "thzedge_source_recreated_total",
            "Acquisition sockets recreated because the scanner was lost and did not reconnect.",
            registry=r,
        )
        self.recording_bad_chunks = Counter(
            "thzedge_replay_bad_chunks_total",
            "Chunks of a replayed recording skipped: corrupt, failed authentication, or missing.",
            registry=r,
        )
        self.recording = Gauge(
            "thzedge_recording", "1 while raw frames are being recorded (--record), else 0.", registry=r
        )
        self.recorder_failures = Counter(
            "thzedge_recorder_failures_total",
            "Recordings stopped by a storage failure (disk full, I/O error), by errno name.",
            ["reason"],
            registry=r,
        )

        for reason in DROP_REASONS:
            self.frames_dropped.labels(reason)
        for reason in DECODE_REASONS:
            self.frames_malformed.labels(reason)
        for status in RESULT_STATUSES:
            self.results_published.labels(status)
        for stage in STAGE_METRICS:
            self.stage_latency.labels(stage)
        self.state.state("starting")
        self.source_state.state("down")
        self._last_frame = time.monotonic()
        self.source_last_frame_age.set_function(lambda: time.monotonic() - self._last_frame)

    # Convenience calls for the pipeline; the metric objects above stay public for anything else.

    def frame_received(self) -> None:
        """Count one frame from the source and reset the last-frame age."""
        self.frames_received.inc()
        self._last_frame = time.monotonic()

    def dropped(self, reason: str, n: int = 1) -> None:
        """Count `n` frames dropped for `reason` (queue_full, stale, upstream_gap, …)."""
        self.frames_dropped.labels(reason).inc(n)

    def malformed(self, reason: str) -> None:
        """Count one message rejected by the decoder (received, and also counted as dropped)."""
        self.frames_received.inc()  # "delivered by the source (valid or not)"; the age stays
        self.frames_malformed.labels(reason).inc()
        self.frames_dropped.labels("malformed").inc()

    def published(self, status: str = "ok") -> None:
        """Count one published result by status (ok, partial, error)."""
        self.results_published.labels(status).inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one frame's time in a pipeline stage."""
        self.stage_latency.labels(stage).observe(seconds)

    def set_source_state(self, state: str) -> None:
        """Record the source state (up, stalled, down, ended)."""
        self.source_state.state(state)
        self.source_up.set(1 if state == "up" else 0)

    def set_build_info(self, **values: str) -> None:
        """Record version, bundle sha256, backend, precision (no person-linked values)."""
        self.build_info.info({k: str(v) for k, v in values.items()})

    def set_calibration(self, profile_id: str, stale: bool = False) -> None:
        """Record the active calibration profile id and whether it is stale."""
        self.calibration_info.info({"profile_id": profile_id})
        self.calibration_stale.set(1 if stale else 0)

    def render(self) -> bytes:
        """Return the registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Return one sample's value by name (e.g. `thzedge_frames_dropped_total`), 0 if absent."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v


@dataclass(frozen=True)
class Health:
    """What `/healthz` and `/readyz` report."""

    alive: bool  # process up and the main loop's heartbeat fresh
    ready: bool  # READY=1 was sent (model loaded and warmed up, source open, sockets bound)
    state: str = "starting"
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def health_from(
    tracker: StateTracker, heartbeat: Any | None = None, max_age_s: float = 10.0
) -> Callable[[], Health]:
    """Return a health function: alive while `heartbeat` (edge.sdnotify.Heartbeat) is fresh."""

    def health() -> Health:
        age = heartbeat.age_s if heartbeat is not None else 0.0
        alive = age < max_age_s and tracker.state not in ("stopped", "failed")
        return Health(
            alive=alive,
            ready=tracker.ready,
            state=tracker.state,
            detail=tracker.detail,
            extra={"heartbeat_age_s": round(age, 3)},
        )

    return health


class MetricsServer:
    """A running HTTP server for /metrics, /healthz and /readyz; `close()` stops it."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        host, port = httpd.server_address[:2]
        self.host = host.decode() if isinstance(host, bytes) else str(host)
        self.port = int(port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_http(
    bind: str | tuple[str, int],
    metrics: DaemonMetrics,
    health_fn: Callable[[], Health] | None = None,
) -> MetricsServer:
    """Serve /metrics, /healthz and /readyz on `bind` ("127.0.0.1:9464"; port 0 picks one)."""
    host, port = split_host_port(bind) if isinstance(bind, str) else bind

    def default_health() -> Health:
        return Health(alive=True, ready=bool(metrics.value("thzedge_ready")))

    check_health = health_fn if health_fn is not None else default_health

    class Handler(BaseHTTPRequestHandler):
        server_version = "thzedge"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                try:
                    health = check_health()
                except Exception as exc:  # a failing health check is itself unhealthy
                    health = Health(alive=False, ready=False, state="failed", detail=type(exc).__name__)
                ok = health.alive if path == "/healthz" else health.alive and health.ready
                body = json.dumps({"ok": ok, **health.to_dict()}).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b'{"error": "not found"}', "application/json")

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            # Scrapes every few seconds would flood the journal; keep them at debug.
            log.debug("http %s", format % args)

    family_host = host
    server_cls = ThreadingHTTPServer
    if ":" in family_host:  # IPv6 literal

        class V6Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6

        server_cls = V6Server
    server_cls.daemon_threads = True
    try:
        httpd = server_cls((host, port), Handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            # Another process (often the previous instance, still stopping) holds it: exit 69,
            # which systemd's Restart=on-failure retries, unlike a configuration error (78).
            raise ResourceBusyError(
                f"[metrics] cannot bind {host}:{port}: the address is in use by another process"
            ) from None
        raise ConfigError(
            f"[metrics] cannot bind {host}:{port}: {exc.strerror}; choose another bind"
        ) from None
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True, name="thzedge-metrics-http"
    )
    thread.start()
    server = MetricsServer(httpd, thread)
    log.info("metrics on %s/metrics (health: /healthz, /readyz)", server.url)
    return server


class StateTracker:
    """One place for lifecycle transitions: metrics gauge, MESSAGE_ID log line, systemd STATUS."""

    def __init__(
        self,
        metrics: DaemonMetrics | None = None,
        notifier: Any | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.metrics = metrics
        self.notifier = notifier
        self.log = logger or log
        self.state = "starting"
        self.ready = False  # True from the first `ready` until stopping (stalled/blocked stay ready)
        self.detail = ""
        self.since = time.monotonic()
        self._lock = threading.Lock()

    def set(self, state: str, detail: str = "", level: int = logging.INFO) -> bool:
        """Enter `state` (one of DAEMON_STATES); return False when it was already the state.

        The detail goes to STATUS and the log; it must carry no identity, score or image. STATUS
        is sent on a change only: the daemon calls this every main-loop turn, and refreshes
        STATUS on its own schedule with `status()` (docs/daemon.md: every 10 s).
        """
        if state not in DAEMON_STATES:
            raise ValueError(f"unknown daemon state {state!r}; expected one of {', '.join(DAEMON_STATES)}")
        with self._lock:
            changed = state != self.state
            self.state, self.detail = state, detail
            if changed:
                self.since = time.monotonic()
        if state == "ready":
            self.ready = True
        elif state in NOT_READY_STATES:
            self.ready = False
        if self.metrics is not None:
            self.metrics.state.state(state)
            self.metrics.ready.set(1 if self.ready else 0)
        status = f"{state}: {detail}" if detail else state
        if changed and self.notifier is not None:
            self.notifier.status(status)
        if changed:
            event = f"state.{state}"
            mid = message_id(event)
            # The id is in the text (journald keeps stderr lines verbatim) and in `extra` for a
            # structured handler to lift into the MESSAGE_ID= field.
            self.log.log(
                level,
                "%s [event=%s MESSAGE_ID=%s]",
                status,
                event,
                mid,
                extra={"MESSAGE_ID": mid, "EVENT": event},
            )
        return changed

    def status(self, text: str) -> None:
        """Update STATUS without a transition (e.g. `streaming 24.8 fps, 0 drops`)."""
        self.detail = text
        if self.notifier is not None:
            self.notifier.status(f"{self.state}: {text}")
