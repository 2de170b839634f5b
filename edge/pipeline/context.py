"""What travels through the pipeline: settings, a queued frame, and the reloadable context.

`DaemonSettings` says how the loop behaves (built from the config by
`edge.pipeline.assemble.settings_from_config`); `ProcessingContext` is everything a SIGHUP may
change (calibration, conditioning, gallery), swapped as one reference; `QueuedFrame` is a frame
on its way from acquisition to inference, carrying the context it was conditioned with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.conditioning import ConditioningParams, calibrate, condition, head_weights
from calibration.guard import GuardSettings, StreamGuard
from calibration.profile import CalibrationProfile, ProfileChoice
from calibration.quality import FrameQuality, QualityLimits, assess_frame
from edge.config import CalibrationConfig, SourceConfig
from edge.gallery import Gallery, VerificationMode
from scanner_io.frame import Frame
from scanner_io.sources import QueuePolicy, is_scanner_uri


def _from(section: str, name: str) -> dict[str, tuple[str, str]]:
    """Field metadata naming the config attribute (`cfg.<section>.<name>`) a setting comes from."""
    return {"config": (section, name)}


@dataclass(frozen=True)
class DaemonSettings:
    """How the loop behaves; fields marked with a config attribute are read from the config file."""

    endpoint: str = field(metadata=_from("publisher", "endpoint"))
    scanner: str = "scanner"  # instance name used on event topics until a frame names its scanner
    hwm: int = field(default=100, metadata=_from("publisher", "hwm"))
    queue_size: int = field(default=8, metadata=_from("daemon", "queue_size"))
    # Frames waiting longer than this in the daemon are dropped as stale; 0 = off.
    max_age_s: float = field(default=2.0, metadata=_from("daemon", "max_age_s"))
    stop_timeout_s: float = field(default=5.0, metadata=_from("daemon", "stop_timeout_s"))
    heartbeat_timeout_s: float = field(default=10.0, metadata=_from("daemon", "heartbeat_timeout_s"))
    stalled_after_s: float = field(default=5.0, metadata=_from("daemon", "stalled_after_s"))
    max_frames: int | None = None
    reconstruction: bool = True
    publish_embedding: bool = field(default=False, metadata=_from("privacy", "publish_embedding"))
    publish_reconstruction: bool = field(default=False, metadata=_from("privacy", "publish_reconstruction"))
    publish_input: bool = field(default=False, metadata=_from("privacy", "publish_input"))
    # `run --record-results FILE`: results as plottable MCAP channels (edge/results_mcap.py);
    # identities and reconstructions in it only with [privacy] record_results.
    record_results: Path | None = None
    record_biometric: bool = field(default=False, metadata=_from("privacy", "record_results"))
    verification_mode: VerificationMode = field(
        default=VerificationMode.auto, metadata=_from("verification", "mode")
    )
    visit_frames: int = field(default=8, metadata=_from("verification", "visit_frames"))
    visit_threshold: float | None = field(default=None, metadata=_from("verification", "visit_threshold"))
    visit_identify_threshold: float | None = field(
        default=None, metadata=_from("verification", "visit_identify_threshold")
    )
    state_interval_s: float = 0.5
    # systemd STATUS= between state changes (docs/daemon.md): one line every 10 s, not per frame.
    status_interval_s: float = 10.0
    poll_s: float = 0.05
    ipc_mode: int = field(default=0o600, metadata=_from("publisher", "ipc_mode"))
    ipc_group: str | None = field(default=None, metadata=_from("publisher", "ipc_group"))
    wait_subscriber_s: float = field(default=0.0, metadata=_from("publisher", "wait_subscriber_s"))
    # auto: follow the source (live → drop oldest, lockstep replay → block).
    queue_policy: QueuePolicy = QueuePolicy.auto
    # A live source's frames that do not fit the profile: refused at start-up (exit 78) unless allowed.
    allow_uncalibrated: bool = field(default=False, metadata=_from("calibration", "allow_uncalibrated"))
    match_wait_s: float = field(default=5.0, metadata=_from("calibration", "match_wait_s"))
    canary: Path | None = field(default=None, metadata=_from("daemon", "canary"))


@dataclass(frozen=True)
class ModelInfo:
    """Which model runs: stamped on every result's provenance and on the `state` event."""

    bundle: str = ""  # manifest sha256
    precision: str = "fp32"
    backend: str = ""
    fallback: str = ""  # why `auto` runs this backend, not TensorRT (empty: it is what was asked for)

    def to_dict(self) -> dict[str, str]:
        """Return the JSON-ready form (the `model` field of the `state` event)."""
        return {"bundle": self.bundle, "precision": self.precision, "backend": self.backend}


@dataclass(frozen=True)
class ProcessingContext:
    """Everything a reload may change, swapped as one reference so a switch happens at one seq."""

    profile: CalibrationProfile | None
    params: ConditioningParams | None
    calibration_id: str
    gallery: Gallery | None = None  # carries the verification threshold
    generation: int = 0
    guard: StreamGuard | None = None  # the profile's running checks (fit, envelope, drift)
    # Whether frames must be calibrated to count as `ok`: true for a live scanner link, whose
    # frames carry no calibration of their own (R-NEW-10); a replay or the simulator may run bare.
    require_profile: bool = False
    quality: QualityLimits | None = None  # the no-head check; None: every frame goes to the model


def stream_context(
    choice: ProfileChoice,
    src: SourceConfig,
    calibration: CalibrationConfig,
    gallery: Gallery | None = None,
    generation: int = 0,
) -> ProcessingContext:
    """The context one source's frames are prepared with: profile, conditioning and its checks.

    The daemon's `ContextLoader` and every replay of a recording (`edge.fleet.replay`) build it
    here, so a replayed frame is prepared exactly as it was live.
    """
    base = choice.profile.conditioning if choice.profile is not None else ConditioningParams()
    guard = None
    if choice.profile is not None:
        guard = StreamGuard(choice.profile, GuardSettings(monitor_every=calibration.monitor_every))
    return ProcessingContext(
        profile=choice.profile,
        params=src.conditioning.apply(base),
        calibration_id=choice.calibration_id,
        gallery=gallery,
        generation=generation,
        guard=guard,
        require_profile=is_scanner_uri(src.uri),
        quality=QualityLimits() if calibration.frame_quality else None,
    )


@dataclass
class QueuedFrame:
    """A frame in the queue: arrival time (host monotonic) and, once prepared, its model input.

    `prepare` runs in the acquisition thread, so conditioning overlaps inference; the context it
    used travels with the frame, so a reload switches calibration (and gallery) at exactly one seq.
    """

    frame: Frame
    t_received: float
    x: np.ndarray | None = None  # [64, 64] float32 model input
    ctx: ProcessingContext | None = None
    error: BaseException | None = None  # conditioning failed
    condition_ms: float = 0.0
    # False: conditioned without a profile that fits this frame (published `uncalibrated`).
    calibrated: bool = True
    quality: FrameQuality | None = None  # not ok: no head in the frame (published `no_face`)

    def prepare(self, ctx: ProcessingContext) -> None:
        """Calibrate, check for a head and condition the frame with `ctx`; keep an error.

        A frame the profile does not fit (another serial, resolution or settings) is conditioned
        without it and marked uncalibrated: its result is never `ok`.
        """
        self.ctx = ctx
        t0 = time.perf_counter()
        profile = ctx.profile
        if profile is not None and ctx.guard is not None and not ctx.guard.fit(self.frame.header).ok:
            profile = None
            self.calibrated = False
        elif profile is None and ctx.require_profile:
            self.calibrated = False
        params = ctx.params
        if params is None:
            params = ctx.profile.conditioning if ctx.profile is not None else ConditioningParams()
        try:
            raw = self.frame.data
            power = calibrate(raw, profile, self.frame.header.sensor_temp_c)
            heads = None
            # The no-head check reads corrected power: on uncorrected frames its verdict means nothing.
            if ctx.quality is not None and self.calibrated and profile is not None:
                heads = head_weights(power, params)  # once: the check and the ROI finder share it
                quality = assess_frame(
                    raw, power, params, full_scale=_full_scale(raw), limits=ctx.quality, heads=heads
                )
                if not quality.ok:
                    self.quality = quality
            x = np.asarray(condition(power, params, heads), dtype=np.float32)
            if x.shape != (64, 64):
                raise ValueError(f"conditioning gave shape {x.shape}, the model needs (64, 64)")
            self.x = x
        except Exception as exc:
            self.error = exc
        self.condition_ms = (time.perf_counter() - t0) * 1e3


def _full_scale(raw: np.ndarray) -> float:
    """The saturation level of a raw frame's dtype (integer sensors); no level for floats."""
    return float(np.iinfo(raw.dtype).max) if np.issubdtype(raw.dtype, np.integer) else float("inf")
