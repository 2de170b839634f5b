"""From the configuration and the `thzedge run` flags to a running daemon (`run_daemon`).

`settings_from_config` builds `DaemonSettings` from the config sections each field names;
`ContextLoader` loads calibration, conditioning and gallery at start-up and on every SIGHUP;
`run_daemon` loads the model, secures the results endpoint, serves metrics and runs the daemon.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from calibration.conditioning import ConditioningParams
from calibration.profile import ProfileChoice, resolve_profile
from edge import __version__
from edge.bundle import Bundle, demo_bundle_path
from edge.config import (
    Config,
    SourceConfig,
    VerificationConfig,
    apply_overrides,
    load_config,
    log_start_warnings,
)
from edge.gallery import Gallery, VerificationMode
from edge.observability import DaemonMetrics, health_from, serve_http
from edge.pipeline.acquire import profile_from_source
from edge.pipeline.context import DaemonSettings, ModelInfo, ProcessingContext
from edge.pipeline.daemon import Daemon
from edge.pipeline.stats import RunSummary
from edge.runner import Runner
from edge.sdnotify import Notifier
from edge.security import EndpointSecurity
from scanner_io.errors import BundleError, CalibrationError, ConfigError, DataError
from scanner_io.recording import Recorder, default_manifest
from scanner_io.sources import FrameSource, QueuePolicy, open_source, split_queue_mode, zmq_context

__all__ = ["ContextLoader", "RunOptions", "profile_from_source", "run_daemon", "settings_from_config"]

log = logging.getLogger("thzedge.daemon")


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


def settings_from_config(
    cfg: Config,
    *,
    scanner: str = "scanner",
    max_frames: int | None = None,
    reconstruction: bool = True,
    queue_policy: QueuePolicy = QueuePolicy.auto,
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
    ) -> None:
        self.src = src
        self.verification = verification
        self.bundle = bundle
        self.precision = precision
        self.security = security

    def profile(self, carried: ProfileChoice | None) -> ProfileChoice:
        """The profile that conditions the stream: configured, else what the source carries, else none."""
        try:
            return resolve_profile(self.src.calibration, carried=carried)
        except CalibrationError as exc:
            raise ConfigError(f"[sources] calibration: {exc}") from None

    def __call__(self, generation: int, carried: ProfileChoice | None) -> ProcessingContext:
        """Load generation `generation` of the processing context."""
        if generation > 0:
            self.security.reload()  # SIGHUP: client certificates too (R-SEC-3)
        choice = self.profile(carried)
        base = choice.profile.conditioning if choice.profile is not None else ConditioningParams()
        gallery = None
        v = self.verification
        if v.gallery is not None and VerificationMode(v.mode) is not VerificationMode.off:
            try:
                gallery = Gallery.load(
                    v.gallery, self.bundle, threshold=v.threshold, precision=self.precision
                )
            except DataError as exc:
                # A corrupt gallery does not heal on a restart: at start-up it is exit 78.
                raise ConfigError(f"[verification] gallery: {exc}") from None
        return ProcessingContext(
            profile=choice.profile,
            params=self.src.conditioning.apply(base),
            calibration_id=choice.calibration_id,
            gallery=gallery,
            generation=generation,
        )


def _open_bundle(cfg: Config) -> tuple[Bundle, Runner]:
    bundle_path = cfg.model.bundle
    if bundle_path is None:
        bundle_path = demo_bundle_path()
        log.warning(
            "no model given (--model or [model] bundle): using the bundled demo model %s; it was "
            "trained on simulated scans only and is not fit for real faces",
            bundle_path,
        )
    try:
        bundle = Bundle.open(bundle_path)
        runner = Runner.from_bundle(bundle, backend=cfg.model.backend, precision=cfg.model.precision)
    except BundleError as exc:
        # A missing or broken bundle, or a precision it lacks, does not heal on a restart: exit 78
        # so systemd stops retrying (RestartPreventExitStatus=78).
        raise ConfigError(f"model: {exc}") from None
    if cfg.model.max_batch is not None:
        runner.max_batch = min(runner.max_batch, cfg.model.max_batch)
    return bundle, runner


def _config_for(opts: RunOptions) -> Config:
    cfg = load_config(opts.config)
    overrides: dict[str, dict[str, Any]] = {}
    if opts.backend is not None:
        overrides["model"] = {"backend": opts.backend}
    if opts.model is not None:
        overrides.setdefault("model", {})["bundle"] = str(opts.model)
    if opts.publish is not None:
        overrides["publisher"] = {"endpoint": opts.publish}
    return apply_overrides(cfg, **overrides) if overrides else cfg


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
    src = cfg.resolve_source(opts.source)
    uri, queue_policy = split_queue_mode(src.uri)  # a bad mode= fails before the model loads
    if opts.max_frames is not None and opts.max_frames < 1:
        raise ConfigError(f"--max-frames {opts.max_frames}: expected a positive number of frames")
    settings = settings_from_config(
        cfg,
        scanner=opts.source if opts.source in cfg.sources else "scanner",
        max_frames=opts.max_frames,
        reconstruction=opts.reconstruction,
        queue_policy=queue_policy,
    )

    notifier = notifier if notifier is not None else Notifier()
    metrics = DaemonMetrics()
    with contextlib.suppress(OSError):
        notifier.status("starting: loading model")
    bundle, runner = _open_bundle(cfg)
    model = ModelInfo(bundle=bundle.sha256, precision=cfg.model.precision, backend=runner.backend.name)
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
    load_context = ContextLoader(src, cfg.verification, bundle, cfg.model.precision, security)

    def open_src() -> FrameSource:
        return open_source(uri, names=cfg.source_names())

    open_recorder = None
    if opts.record is not None:
        record_path = opts.record

        def open_recorder(carried: ProfileChoice | None) -> Recorder:
            profile = load_context.profile(carried).profile
            return Recorder(record_path, manifest=default_manifest(source=src.uri), calibration=profile)

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
