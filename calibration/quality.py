"""Is there a head in this frame? A cheap check before the model sees it.

A frame with no head in it — the shutter closed (blank), the reference reflector or a wall
filling the field (flat), the sensor saturated, or nothing above the head-detection threshold —
must not come out as `ok` with a posture. `assess_frame` says `no_face` and why, from the same
block-averaged dB map the ROI finder uses (calibration.conditioning.head_weights), so "head found"
means the same thing in both places.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibration.conditioning import ConditioningParams, HeadWeights, head_weights
from scanner_io.choices import Choice

__all__ = ["FrameQuality", "FrameStatus", "QualityLimits", "NoFaceReason", "assess_frame"]


class FrameStatus(Choice):
    """Whether a frame is worth running the model on."""

    OK = "ok"
    NO_FACE = "no_face"


class NoFaceReason(Choice):
    """Why a frame has no face (a metric label)."""

    SATURATED = "saturated"
    BLANK = "blank"  # nothing above the head threshold anywhere, or a frozen/constant frame
    FLAT = "flat"  # a uniform field (reference reflector, wall)
    TOO_SMALL = "too_small"  # some return, but far less than a head


@dataclass(frozen=True)
class QualityLimits:
    """When a frame counts as having no head (fractions of the frame's blocks / pixels)."""

    max_saturated: float = 0.05
    min_head_fraction: float = 0.03  # simulated heads cover ≈ 10–19 % of a 128×128 frame
    max_head_fraction: float = 0.6
    flat_max_spread_db: float = 1.5  # interquartile spread of the lit blocks
    min_raw_std: float = 1.0  # counts: below this the sensor delivers a constant frame


@dataclass(frozen=True)
class FrameQuality:
    """The verdict on one frame and the figures behind it."""

    status: FrameStatus
    reason: NoFaceReason | None
    head_fraction: float
    saturated: float
    # Interquartile dB spread of the lit blocks; measured only for a frame lit enough to be a
    # uniform field (head fraction above the limit), None otherwise.
    spread_db: float | None

    @property
    def ok(self) -> bool:
        """True when the frame has a head in it."""
        return self.status is FrameStatus.OK


def assess_frame(
    raw: np.ndarray,
    power: np.ndarray,
    params: ConditioningParams | None = None,
    full_scale: float = 65535.0,
    limits: QualityLimits | None = None,
    heads: HeadWeights | None = None,
) -> FrameQuality:
    """Say whether a frame has a head in it (`raw` counts for saturation, `power` calibrated).

    `heads` is `head_weights(power, params)` when the caller computed it (it conditions the frame
    with the same map).
    """
    params = params or ConditioningParams()
    lim = limits or QualityLimits()
    saturated = float(np.count_nonzero(raw >= full_scale)) / raw.size if np.isfinite(full_scale) else 0.0
    weight, db, _ = heads if heads is not None else head_weights(power, params)
    head = float(weight.mean())
    spread = None
    if head > lim.max_head_fraction:  # only such a frame can be a uniform field
        lit = db[weight > 0.5]
        spread = float(np.subtract(*np.percentile(lit, [75, 25]))) if lit.size >= 4 else 0.0
    reason: NoFaceReason | None = None
    if saturated > lim.max_saturated:
        reason = NoFaceReason.SATURATED
    elif head <= 0.0 or _constant(raw, lim.min_raw_std):
        reason = NoFaceReason.BLANK
    elif spread is not None and spread <= lim.flat_max_spread_db:
        reason = NoFaceReason.FLAT
    elif head < lim.min_head_fraction:
        reason = NoFaceReason.TOO_SMALL
    elif head > lim.max_head_fraction:
        reason = NoFaceReason.FLAT
    status = FrameStatus.OK if reason is None else FrameStatus.NO_FACE
    return FrameQuality(status, reason, head, saturated, spread)


def _constant(raw: np.ndarray, min_std: float) -> bool:
    """True when the frame's standard deviation is below `min_std` (a frozen sensor).

    Cheap for the usual frame: a range of r over n pixels forces a std of at least r/sqrt(2n),
    so only a frame with a small range needs its std computed.
    """
    lo, hi = float(raw.min()), float(raw.max())
    if hi - lo >= min_std * float(np.sqrt(2.0 * raw.size)):
        return False
    return float(raw.std()) < min_std
