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

from calibration.conditioning import ConditioningParams, calibrate_and_condition
from calibration.profile import CalibrationProfile
from edge.gallery import Gallery, VerificationMode
from scanner_io.frame import Frame
from scanner_io.sources import QueuePolicy


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
    verification_mode: VerificationMode = field(
        default=VerificationMode.auto, metadata=_from("verification", "mode")
    )
    state_interval_s: float = 0.5
    poll_s: float = 0.05
    ipc_mode: int = field(default=0o600, metadata=_from("publisher", "ipc_mode"))
    ipc_group: str | None = field(default=None, metadata=_from("publisher", "ipc_group"))
    # auto: follow the source (live → drop oldest, lockstep replay → block).
    queue_policy: QueuePolicy = QueuePolicy.auto
    canary: Path | None = field(default=None, metadata=_from("daemon", "canary"))


@dataclass(frozen=True)
class ModelInfo:
    """Which model runs: stamped on every result's provenance and on the `state` event."""

    bundle: str = ""  # manifest sha256
    precision: str = "fp32"
    backend: str = ""

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

    def prepare(self, ctx: ProcessingContext) -> None:
        """Calibrate and condition the frame with `ctx` (the one shared function); keep an error."""
        self.ctx = ctx
        t0 = time.perf_counter()
        try:
            x = np.asarray(
                calibrate_and_condition(self.frame.data, ctx.profile, ctx.params), dtype=np.float32
            )
            if x.shape != (64, 64):
                raise ValueError(f"conditioning gave shape {x.shape}, the model needs (64, 64)")
            self.x = x
        except Exception as exc:
            self.error = exc
        self.condition_ms = (time.perf_counter() - t0) * 1e3
