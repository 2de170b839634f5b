"""From the configuration and the `thzedge run` flags to a running daemon (`run_daemon`).

`settings_from_config` builds `DaemonSettings` from the config sections each field names;
`ContextLoader` loads calibration, conditioning and gallery at start-up and on every SIGHUP;
`run_daemon` loads the model, secures the results endpoint, serves metrics and runs the daemon.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from calibration.active import active_profile_path
from calibration.conditioning import ConditioningParams
from calibration.profile import CalibrationProfile, ProfileChoice, resolve_profile
from edge import __version__
from edge.bundle import Bundle, Precision, demo_bundle_path
from edge.config import (
    DEFAULT_METRICS_PORT,
    CalibrationConfig,
    Config,
    ModelPrecision,
    SourceConfig,
    VerificationConfig,
    apply_overrides,
    load_config,
    log_start_warnings,
    split_host_port,
)
from edge.fleet.golden import bundle_canary
from edge.gallery import Gallery, VerificationMode
from edge.observability import DaemonMetrics, health_from, serve_http
from edge.pipeline.acquire import profile_from_source
from edge.pipeline.context import DaemonSettings, ModelInfo, ProcessingContext, stream_context
from edge.pipeline.daemon import Daemon
from edge.pipeline.metrics import start_device_telemetry
from edge.pipeline.scoring import TruthScorer
from edge.pipeline.stats import RunSummary
from edge.quarantine import Quarantine
from edge.runner import Runner
from edge.sdnotify import Notifier
from edge.security import EndpointSecurity, source_curve_keys
from edge.signing import verify_bundle_signature
from edge.storage import Sweeper, recording_policy, storage_key_from_config
from edge.templates import load_template_key
from scanner_io.codec import MAX_PAYLOAD_BYTES
from scanner_io.errors import BundleError, CalibrationError, ConfigError, DataError, UsageError
from scanner_io.frame import ALLOWED_DTYPES
from scanner_io.recording import Recorder, default_manifest
from scanner_io.sources import (
    FrameSource,
    QueuePolicy,
    is_scanner_uri,
    open_source,
    split_queue_mode,
    zmq_context,
)

__all__ = [
    "ContextLoader",
    "RunOptions",
    "profile_from_source",
    "refuse_uncalibrated",
    "run_daemon",
    "settings_from_config",
    "stream_profile",
]

log = logging.getLogger("thzedge.daemon")


@dataclass(frozen=True)
class RunOptions:
    """The `thzedge run` flags; None means "from the config file"."""

    source: str
    model: Path | None = None
    config: Path | None = None
    backend: str | None = None
    precision: str | None = None
    publish: str | None = None
    record: Path | None = None
    max_frames: int | None = None
    reconstruction: bool = True
    record_results: Path | None = None
    metrics_bind: str | None = None  # HOST:PORT, or "off"
    calibration: Path | None = None  # profile directory for the source (overrides the config's)
    score: bool = False  # score the published results against the simulator's truth


def settings_from_config(
    cfg: Config,
    *,
    scanner: str = "scanner",
    max_frames: int | None = None,
    reconstruction: bool = True,
    queue_policy: QueuePolicy = QueuePolicy.auto,
    record_results: Path | None = None,
) -> DaemonSettings:
    """Build the daemon's settings: each field the config names (`cfg.<section>.<name>`), the rest given."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(DaemonSettings):
        where = f.metadata.get("config")
        if where is None:
            continue
        section, name = where
        value = getattr(getattr(cfg, section), name)
        if isinstance(f.default, Enum):  # a choice read as its string value becomes its enum
            value = type(f.default)(value)
        values[f.name] = value
    return DaemonSettings(
        **values,
        scanner=scanner,
        max_frames=max_frames,
        reconstruction=reconstruction,
        queue_policy=queue_policy,
        record_results=record_results,
    )


class ContextLoader:
    """Loads what a reload may change for one source: calibration, conditioning, gallery.

    Generation 0 is start-up: a missing or foreign profile (or gallery) is a configuration
    error (exit 78, no restart loop). On SIGHUP (generation > 0) the client allow-list is
    re-read too, and a failure keeps the current context (the daemon catches it).
    """

    def __init__(
        self,
        src: SourceConfig,
        verification: VerificationConfig,
        bundle: Bundle,
        precision: str,
        security: EndpointSecurity,
        calibration: CalibrationConfig | None = None,
    ) -> None:
        self.src = src
        self.verification = verification
        self.bundle = bundle
        self.precision = precision
        self.security = security
        self.calibration = calibration or CalibrationConfig()
        # Start-up loads generation 0 twice when the source carries the profile (before and
        # after the source opens): its gallery is read from disk once. A reload always reads it.
        self._startup_gallery: tuple[Gallery | None] | None = None

    def profile(self, carried: ProfileChoice | None) -> ProfileChoice:
        """The profile that conditions the stream (`stream_profile`)."""
        return stream_profile(self.src, self.calibration, carried)

    def __call__(self, generation: int, carried: ProfileChoice | None) -> ProcessingContext:
        """Load generation `generation` of the processing context."""
        if generation > 0:
            self.security.reload()  # SIGHUP: client certificates too (R-SEC-3)
        choice = self.profile(carried)
        if choice.profile is not None:
            log.info(
                "calibration profile %s (%s): %s",
                choice.calibration_id,
                choice.origin,
                choice.profile.dark_model(),
            )
        if generation == 0 and self._startup_gallery is not None:
            (gallery,) = self._startup_gallery
        else:
            gallery = self._load_gallery()
            if generation == 0:
                self._startup_gallery = (gallery,)
        ctx = stream_context(choice, self.src, self.calibration, gallery, generation)
        assert ctx.params is not None  # stream_context always sets them
        _check_model_input(ctx.params, self.bundle, choice)
        return ctx

    def _load_gallery(self) -> Gallery | None:
        v = self.verification
        if v.gallery is None or VerificationMode(v.mode) is VerificationMode.off:
            return None
        key = load_template_key(v.template_key) if v.template_key is not None else None
        try:
            return Gallery.load(
                v.gallery, self.bundle, threshold=v.threshold, precision=self.precision, template_key=key
            )
        except DataError as exc:
            # A corrupt gallery does not heal on a restart: at start-up it is exit 78.
            raise ConfigError(f"[verification] gallery: {exc}") from None


# `auto` leaves the fp32 reference only for a variant at least this much faster per frame, so
# timing noise on a busy host does not flip the choice between near-equal variants.
AUTO_MIN_GAIN = 0.15
AUTO_ROUNDS = 5  # timed batches per variant, interleaved so a load change hits every variant alike


def time_variants(runners: dict[str, Runner], reconstruct: bool) -> dict[str, float]:
    """Best-of-rounds ms per frame of each runner on one full batch of a fixed probe input."""
    batch = max(1, min(r.max_batch for r in runners.values()))
    x = np.random.default_rng(0).random((batch, 1, 64, 64), dtype=np.float32)
    best = dict.fromkeys(runners, float("inf"))
    for r in runners.values():
        r.infer(x, reconstruct=reconstruct)  # warm-up: first runs allocate
    for _ in range(AUTO_ROUNDS):
        for p, r in runners.items():
            t0 = time.perf_counter()
            r.infer(x, reconstruct=reconstruct)
            best[p] = min(best[p], (time.perf_counter() - t0) * 1e3 / batch)
    return best


def choose_precision(timings: dict[str, float]) -> str:
    """The fastest variant; fp32 unless another is at least AUTO_MIN_GAIN faster per frame."""
    fastest = min(timings, key=lambda p: timings[p])
    ref = timings.get(Precision.fp32.value)
    if ref is not None and timings[fastest] > ref * (1.0 - AUTO_MIN_GAIN):
        return Precision.fp32.value
    return fastest


def _open_runner(cfg: Config, bundle: Bundle, reconstruct: bool) -> Runner:
    """Load the pinned precision, or with `auto` time the gate-passed variants and keep the fastest."""

    def load(precision: str) -> Runner:
        runner = Runner.from_bundle(
            bundle,
            backend=cfg.model.backend,
            precision=precision,
            engine_cache=cfg.model.engine_cache,
            dla_core=cfg.model.dla_core,
        )
        if cfg.model.max_batch is not None:
            runner.max_batch = min(runner.max_batch, cfg.model.max_batch)
        return runner

    if cfg.model.precision is not ModelPrecision.auto:
        return load(cfg.model.precision.value)
    candidates = bundle.gate_passed_precisions()
    runners: dict[str, Runner] = {}
    try:
        for p in candidates:
            try:
                runners[p] = load(p)
            except BundleError as exc:
                if p == Precision.fp32.value:
                    raise
                # A variant this backend cannot run (e.g. no engine for it) is no candidate.
                log.info("precision auto: %s skipped: %s", p, exc)
        if len(runners) == 1:
            return runners.popitem()[1]
        timings = time_variants(runners, reconstruct)
        chosen = choose_precision(timings)
        log.info(
            "precision auto: %s on %s (%s ms/frame at batch %d)",
            chosen,
            runners[chosen].backend.name,
            ", ".join(f"{p} {ms:.3f}" for p, ms in timings.items()),
            runners[chosen].max_batch,
        )
        return runners.pop(chosen)
    finally:
        for r in runners.values():
            r.close()


def _check_model_input(params: ConditioningParams, bundle: Bundle, choice: ProfileChoice) -> None:
    """R-NEW-10: the conditioning must produce what the model was trained on (its input side).

    Conditioning always maps to [0, 1] float32; the crop side is the profile's (or an override's)
    and must be the encoder input's, else every frame would fail at inference.
    """
    spatial = [d for d in bundle.input_spec.shape[-2:] if isinstance(d, int)]
    if spatial and any(d != params.out_size for d in spatial):
        raise ConfigError(
            f"{choice.origin} ({choice.calibration_id}) conditions frames to {params.out_size}x"
            f"{params.out_size}, but the model bundle takes {spatial[0]}x{spatial[-1]}; set "
            f"[sources.NAME.conditioning] out_size = {spatial[0]} or rebuild the profile"
        )


def stream_profile(
    src: SourceConfig, calibration: CalibrationConfig, carried: ProfileChoice | None = None
) -> ProfileChoice:
    """The profile that conditions a source's stream: `[sources.NAME] calibration`, else the
    profile `thzedge calibrate activate` made current for NAME, else what the source carries,
    else none (`calibration.profile.resolve_profile`). Read again on every SIGHUP."""
    try:
        active = None
        if src.calibration is None and src.name is not None:
            active = active_profile_path(src.name, calibration.state_dir)
        return resolve_profile(src.calibration, carried=carried, active=active)
    except CalibrationError as exc:
        where = f"[sources.{src.name}] calibration" if src.name is not None else "--calibration"
        raise ConfigError(f"{where}: {exc}") from None


# A scanner link accepts frames up to this many times its profile's (float32) frame bytes.
FRAME_BOUND_HEADROOM = 4


def bound_frame_bytes(uri: str, profile: CalibrationProfile | None) -> str:
    """A scanner URI with `max_frame_bytes` set to the largest frame its profile accepts.

    The profile fixes the frame shape (a frame of another shape stops the daemon, exit 78), and
    float32 is the widest wire dtype, so no valid frame is larger; libzmq then drops a peer that
    sends a bigger part before allocating it (docs/protocol.md, "Memory per message"). The bound
    is FRAME_BOUND_HEADROOM times that, so frames of up to twice the profile's height and width
    still arrive and meet the shape check (exit 78, saying what is wrong) instead of a silent
    disconnect loop. A URI that sets `max_frame_bytes` itself, or a link without a profile, is
    left as it is.
    """
    if profile is None or not is_scanner_uri(uri) or "max_frame_bytes=" in uri:
        return uri
    widest = max(np.dtype(d).itemsize for d in ALLOWED_DTYPES)
    limit = min(FRAME_BOUND_HEADROOM * int(np.prod(profile.shape)) * widest, MAX_PAYLOAD_BYTES)
    return f"{uri}{'&' if '?' in uri else '?'}max_frame_bytes={limit}"


def refuse_uncalibrated(
    src: SourceConfig, uri: str, calibration: CalibrationConfig, profile: CalibrationProfile | None
) -> None:
    """R-CAL-1 / R-NEW-10: a live scanner link without a profile does not start (exit 78).

    `profile` is the one `stream_profile` chose for the source. Frames over tcp:// or ipc:// carry
    no calibration of their own; without a profile the model would see uncorrected frames and
    publish confident nonsense. `allow_uncalibrated` publishes them marked `uncalibrated` instead.
    """
    if not is_scanner_uri(uri) or profile is not None:
        return
    if calibration.allow_uncalibrated:
        log.warning("source %s has no calibration profile: results are published `uncalibrated`", uri)
        return
    name = src.name or "NAME"
    raise ConfigError(
        f"source {src.name or uri} is a live scanner link with no calibration profile; calibrate it "
        f"(thzedge calibrate capture/build/activate --scanner {name}), or give one with "
        f"--calibration DIR or [sources.{name}] calibration, or set [calibration] "
        "allow_uncalibrated = true to publish results marked `uncalibrated`"
    )


def _open_bundle(cfg: Config, reconstruct: bool = True) -> tuple[Bundle, Runner]:
    bundle_path = cfg.model.bundle
    if bundle_path is None:
        bundle_path = demo_bundle_path()
        log.warning(
            "no model given (--model or [model] bundle): using the bundled demo model %s; it was "
            "trained on simulated scans only and is not fit for real faces",
            bundle_path,
        )
    if cfg.model.trusted_keys_dir is not None:
        # Before any graph is parsed: an unsigned or wrongly signed bundle never reaches ONNX Runtime.
        signer = verify_bundle_signature(bundle_path, cfg.model.trusted_keys_dir)
        log.info("bundle %s is signed by trusted key %s", bundle_path, signer)
    try:
        bundle = Bundle.open(bundle_path)
        runner = _open_runner(cfg, bundle, reconstruct)
    except BundleError as exc:
        # A missing or broken bundle, or a precision it lacks, does not heal on a restart: exit 78
        # so systemd stops retrying (RestartPreventExitStatus=78).
        raise ConfigError(f"model: {exc}") from None
    return bundle, runner


def _config_for(opts: RunOptions) -> Config:
    cfg = load_config(opts.config)
    overrides: dict[str, dict[str, Any]] = {}
    if opts.backend is not None:
        overrides["model"] = {"backend": opts.backend}
    if opts.model is not None:
        overrides.setdefault("model", {})["bundle"] = str(opts.model)
    if opts.precision is not None:
        overrides.setdefault("model", {})["precision"] = opts.precision
    if opts.metrics_bind is not None:
        off = opts.metrics_bind == "off"
        if not off:
            try:
                split_host_port(opts.metrics_bind)
            except ConfigError:
                raise UsageError(
                    f"--metrics-bind {opts.metrics_bind!r}: expected HOST:PORT such as "
                    f"127.0.0.1:{DEFAULT_METRICS_PORT}, or off"
                ) from None
        overrides["metrics"] = {"enabled": not off, **({} if off else {"bind": opts.metrics_bind})}
    if opts.publish is not None:
        overrides["publisher"] = {"endpoint": opts.publish}
    return apply_overrides(cfg, **overrides) if overrides else cfg


def _quarantine(cfg: Config) -> Quarantine | None:
    """The store of the last rejected messages, when `[storage] quarantine_dir` is set (R-NEW-17)."""
    s = cfg.storage
    if s.quarantine_dir is None:
        return None
    key = storage_key_from_config(cfg)
    return Quarantine(s.quarantine_dir, key, s.quarantine_frames, int(s.quarantine_max_mb * 1024 * 1024))


def run_daemon(
    opts: RunOptions,
    notifier: Notifier | None = None,
    on_ready: Callable[[Daemon], None] | None = None,
) -> RunSummary:
    """Load config, model, calibration and gallery, then stream until done; return the summary.

    Raises ConfigError (exit 78) for a bad config, SourceUnavailableError (69) for a source that
    cannot be opened, BundleError for a bad model bundle.
    """
    cfg = _config_for(opts)
    log_start_warnings(cfg, log)
    # Galleries and recordings (read and written) use this key from here on (R-SEC-7).
    storage_key = storage_key_from_config(cfg)
    src = cfg.resolve_source(opts.source)
    if opts.calibration is not None:
        src = dataclasses.replace(src, calibration=opts.calibration)
    uri, queue_policy = split_queue_mode(src.uri)  # a bad mode= fails before the model loads
    # A live link's profile, read once here, before the model loads: it must exist (or be waived)
    # and it bounds the message size. The stream's context reads it again on each (re)load.
    link_profile = stream_profile(src, cfg.calibration).profile if is_scanner_uri(uri) else None
    refuse_uncalibrated(src, uri, cfg.calibration, link_profile)
    uri = bound_frame_bytes(uri, link_profile)
    if opts.max_frames is not None and opts.max_frames < 1:
        raise ConfigError(f"--max-frames {opts.max_frames}: expected a positive number of frames")
    settings = settings_from_config(
        cfg,
        scanner=opts.source if opts.source in cfg.sources else "scanner",
        max_frames=opts.max_frames,
        reconstruction=opts.reconstruction,
        queue_policy=queue_policy,
        record_results=opts.record_results,
    )

    notifier = notifier if notifier is not None else Notifier()
    metrics = DaemonMetrics()
    with contextlib.suppress(OSError):
        notifier.status("starting: loading model")
    bundle, runner = _open_bundle(cfg, opts.reconstruction)
    if settings.canary is None and (carried := bundle_canary(bundle.path)) is not None:
        settings = dataclasses.replace(settings, canary=carried)  # the bundle's own canary (R-NEW-12)
    precision = runner.backend.precision  # the one `auto` chose, or the pinned one
    model = ModelInfo(
        bundle=bundle.sha256,
        precision=precision,
        backend=runner.backend.name,
        fallback=runner.backend.fallback_reason or "",
    )
    metrics.set_build_info(
        version=__version__, bundle=bundle.sha256[:12], backend=model.backend, precision=model.precision
    )
    # Starts the ZAP authenticator (CURVE) before anything binds; ipc files get 0600 (R-SEC-2, R-NEW-2).
    try:
        security = EndpointSecurity.from_config(
            zmq_context(), cfg.publisher, insecure_dev=cfg.daemon.insecure_dev
        )
    except BaseException:  # e.g. a bad CURVE key file: do not leak the loaded model's sessions
        runner.close()
        raise
    load_context = ContextLoader(
        src, cfg.verification, bundle, precision, security, calibration=cfg.calibration
    )

    curve = source_curve_keys(src)

    def open_src() -> FrameSource:
        return open_source(uri, names=cfg.source_names(), curve=curve)

    open_recorder = None
    if opts.record is not None:
        record_path = opts.record

        if storage_key is None:
            log.warning("recording %s WITHOUT encryption: no storage key configured (R-SEC-7)", record_path)
        policy = recording_policy(cfg)

        def open_recorder(carried: ProfileChoice | None) -> Recorder:
            profile = load_context.profile(carried).profile
            return Recorder(
                record_path,
                manifest=default_manifest(source=src.uri),
                calibration=profile,
                key=storage_key,
                policy=policy,
            )

    daemon = Daemon(
        settings,
        runner,
        open_src,
        load_context,
        notifier=notifier,
        metrics=metrics,
        open_recorder=open_recorder,
        binder=security,  # callable; its `revocations` make the publisher rebind
        model=model,
        on_ready=on_ready,
        scorer=TruthScorer() if opts.score else None,
        quarantine=_quarantine(cfg),
    )
    server = None
    sweeper = Sweeper(cfg) if cfg.storage.sweep_dir is not None else None
    stop_telemetry = start_device_telemetry(metrics)
    try:
        if sweeper is not None:
            sweeper.start()  # retention enforced while the daemon runs (R-SEC-7)
        if cfg.metrics.enabled:
            server = serve_http(
                cfg.metrics.bind,
                metrics,
                health_from(daemon.tracker, daemon.heartbeat, cfg.daemon.heartbeat_timeout_s),
            )
        summary = daemon.run()
        if daemon.scorer is not None:
            summary = dataclasses.replace(summary, score=daemon.scorer.report())
        return summary
    finally:
        if sweeper is not None:
            sweeper.stop()
        if server is not None:
            server.close()
        stop_telemetry()
        security.close()
        with contextlib.suppress(Exception):
            runner.close()
