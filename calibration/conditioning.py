"""Calibrate and condition a raw scanner frame into the model input (THE one function).

`calibrate_and_condition` is used by the daemon, enrolment, evaluation, INT8 calibration and
the simulator's dataset writer alike, so every stage sees identical tensors (DESIGN.md):

    raw counts ──calibrate──► power ──condition──► dB ─► ROI crop ─► 64×64 bilinear ─► [0,1]
               (dark, gain,          (10·log10,   (fixed size round the head,
                bad pixels)           floor)       clamped to the frame)

The research crops are 8-bit PNGs of the dB image divided by 255 (research-model.md §4), so by
default the output is quantised to the same 1/255 steps: a crop loaded from a dataset PNG and
the same frame conditioned live are bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from scanner_io.errors import CalibrationError, DataError

if TYPE_CHECKING:
    from calibration.profile import CalibrationProfile

__all__ = [
    "ConditioningParams",
    "HeadWeights",
    "Roi",
    "calibrate",
    "condition",
    "condition_with_roi",
    "find_roi",
    "head_weights",
    "calibrate_and_condition",
    "power_to_db",
]

# Roi = (x, y, width, height) in raw-frame pixels.
Roi = tuple[int, int, int, int]


@dataclass(frozen=True)
class ConditioningParams:
    """How corrected power becomes the model input: dB range, head ROI, output size."""

    # dB range mapped linearly onto [0, 1]; power below db_min (noise floor) clips to 0.
    db_min: float = 10.0
    db_max: float = 46.0
    # Square crop side in raw pixels, centred on the detected head and clamped to the frame.
    crop_size: int = 88
    out_size: int = 64
    # A fixed ROI (x, y, w, h) switches head detection off (a gate scanner with a chin rest).
    roi: Roi | None = None
    # Head detection: a cell of the block-averaged power counts as "head" from this level up,
    # ramping to full weight over roi_softness_db, so the centroid moves smoothly, not by jumps.
    roi_threshold_db: float = 17.0
    roi_softness_db: float = 4.0
    roi_block: int = 4
    # Round to 1/255 like the research 8-bit PNG crops.
    quantize: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.db_min) and math.isfinite(self.db_max)) or self.db_max <= self.db_min:
            problems.append(f"db_max ({self.db_max}) must be greater than db_min ({self.db_min})")
        if self.crop_size < 2:
            problems.append(f"crop_size must be >= 2 pixels, got {self.crop_size}")
        if self.out_size < 2:
            problems.append(f"out_size must be >= 2 pixels, got {self.out_size}")
        if self.roi is not None and (len(self.roi) != 4 or self.roi[2] < 1 or self.roi[3] < 1):
            problems.append(f"roi must be (x, y, w, h) with w, h >= 1, got {self.roi}")
        if self.roi_softness_db <= 0:
            problems.append(f"roi_softness_db must be > 0, got {self.roi_softness_db}")
        if self.roi_block < 1:
            problems.append(f"roi_block must be >= 1, got {self.roi_block}")
        if problems:
            raise CalibrationError("invalid conditioning parameters: " + "; ".join(problems))
        if self.roi is not None:
            object.__setattr__(self, "roi", tuple(int(v) for v in self.roi))

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict (stored in calibration profiles)."""
        d = asdict(self)
        d["roi"] = list(self.roi) if self.roi is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConditioningParams:
        """Build from a dict; an unknown key is an error naming the valid keys."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise CalibrationError(f"unknown conditioning key(s) {unknown}; valid keys are {sorted(known)}")
        kw = dict(d)
        if kw.get("roi") is not None:
            kw["roi"] = tuple(kw["roi"])
        return cls(**kw)


def _check_raw(raw: np.ndarray) -> None:
    if not isinstance(raw, np.ndarray) or raw.ndim != 2:
        shape = getattr(raw, "shape", None)
        raise DataError(f"expected a 2-D raw frame, got shape {shape}")
    if raw.shape[0] < 2 or raw.shape[1] < 2:
        raise DataError(f"raw frame {raw.shape} is too small to condition (need at least 2×2)")


def calibrate(raw: np.ndarray, profile: CalibrationProfile | None, temp_c: float | None = None) -> np.ndarray:
    """Return float32 corrected power: (raw − dark) · gain, bad pixels replaced by neighbours.

    `temp_c` is the frame header's sensor temperature: a temperature-compensated profile
    (format 3) subtracts the dark at that temperature; other profiles ignore it.

    Bad pixels take the median of the valid pixels in their 5×5 neighbourhood (the index
    tables are precomputed once per profile, so this stays vectorised and fast).
    """
    _check_raw(raw)
    power = raw.astype(np.float32, copy=True)
    if raw.dtype.kind == "f":
        np.nan_to_num(power, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    if profile is None:
        return power
    if tuple(raw.shape) != tuple(profile.shape):
        raise CalibrationError(
            f"frame shape {tuple(raw.shape)} does not match calibration profile {profile.profile_id} "
            f"for {tuple(profile.shape)} (scanner {profile.scanner}); use the profile made for this scanner"
        )
    power -= profile.dark_at(temp_c)
    power *= profile.gain
    repair = profile.repair_table
    if repair is not None:
        bad_idx, nbr_idx, nbr_valid, counts, fallback = repair
        flat = power.reshape(-1)
        vals = flat[nbr_idx]
        vals[~nbr_valid] = np.inf
        vals.sort(axis=1)
        rows = np.arange(len(bad_idx))
        safe = np.maximum(counts, 1)
        med = 0.5 * (vals[rows, (safe - 1) // 2] + vals[rows, safe // 2])
        # A pixel with no valid neighbour at all (a big cluster) takes the frame median.
        if fallback:
            med = np.where(counts > 0, med, np.median(flat))
        flat[bad_idx] = med
    return power


def power_to_db(power: np.ndarray, params: ConditioningParams) -> np.ndarray:
    """Return 10·log10(power) in float32, floored half a step below db_min so log stays finite."""
    floor = np.float32(10.0 ** ((params.db_min - 1.0) / 10.0))
    db = np.maximum(power, floor).astype(np.float32, copy=False)
    np.log10(db, out=db)
    db *= np.float32(10.0)
    return db


def head_weights(power: np.ndarray, params: ConditioningParams) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (weight, dB, block): the soft "is head" weight of each block of block-averaged power.

    One definition of "head found" for the ROI finder and the frame-quality check
    (calibration.quality): blocks of `roi_block`² pixels, in dB, weighted by
    clip((dB − roi_threshold_db) / roi_softness_db, 0, 1).
    """
    h, w = power.shape
    b = params.roi_block
    hb, wb = h // b, w // b
    if hb >= 1 and wb >= 1 and b > 1:
        blocks = _block_mean(power[: hb * b, : wb * b], b)
    else:
        b, blocks = 1, power
    db = np.maximum(blocks, 1e-3)
    np.log10(db, out=db)
    db *= 10.0
    weight = db - params.roi_threshold_db
    weight /= params.roi_softness_db
    np.clip(weight, 0.0, 1.0, out=weight)
    return weight, db, b


# numpy sums runs shorter than this one by one, left to right (longer ones pairwise), which is
# the order `_block_mean` reproduces.
_SEQUENTIAL_SUM_MAX = 8


def _block_mean(a: np.ndarray, b: int) -> np.ndarray:
    """Return the mean of each b×b block of `a`, bit-identical to `reshape(...).mean(axis=(1, 3))`.

    That numpy reduction is slow on small blocks (an iterator step per element). It sums each
    block row left to right, then the block rows top to bottom, then divides: the same float
    operations in the same order, done here as whole-array adds.
    """
    hb, wb = a.shape[0] // b, a.shape[1] // b
    v = a.reshape(hb, b, wb, b)
    if b >= _SEQUENTIAL_SUM_MAX or v.dtype != np.float32:
        return v.mean(axis=(1, 3))
    rows = v[:, :, :, 0] + v[:, :, :, 1]
    for d in range(2, b):
        rows += v[:, :, :, d]
    out = rows[:, 0] + rows[:, 1]
    for r in range(2, b):
        out += rows[:, r]
    out /= np.float32(b * b)
    return out


# What `head_weights` returns: block weights, block dB map, block side.
HeadWeights = tuple[np.ndarray, np.ndarray, int]


def find_roi(power: np.ndarray, params: ConditioningParams, heads: HeadWeights | None = None) -> Roi:
    """Return the crop (x, y, w, h) round the head: soft-thresholded centroid of block power.

    Block-averaging first makes the rule robust to speckle and hot pixels; the centroid of a
    nearly binary mask barely depends on where the bright specular glints fall, so a concealed
    and an unconcealed capture of the same pose get (almost) the same crop. With nothing above
    the threshold the crop is centred on the frame. Deterministic: no state, no randomness.
    `heads` is `head_weights(power, params)` when the caller has it already (the no-head check).
    """
    h, w = power.shape
    cw = min(params.crop_size, w)
    ch = min(params.crop_size, h)
    if params.roi is not None:
        x, y, rw, rh = params.roi
        rw, rh = min(rw, w), min(rh, h)
        return (int(np.clip(x, 0, w - rw)), int(np.clip(y, 0, h - rh)), rw, rh)
    weight, _, b = heads if heads is not None else head_weights(power, params)
    hb, wb = weight.shape
    total = float(weight.sum())
    if total <= 0.0:
        cx, cy = w / 2.0, h / 2.0
    else:
        cy = float((weight.sum(axis=1) * (np.arange(hb) + 0.5)).sum()) / total * b
        cx = float((weight.sum(axis=0) * (np.arange(wb) + 0.5)).sum()) / total * b
    # Python min/max, not np.clip: the same integers, without numpy's per-call cost.
    x0 = min(max(round(cx - cw / 2.0), 0), w - cw)
    y0 = min(max(round(cy - ch / 2.0), 0), h - ch)
    return (x0, y0, cw, ch)


def condition_with_roi(
    power: np.ndarray, params: ConditioningParams, roi: Roi | None = None, heads: HeadWeights | None = None
) -> tuple[np.ndarray, Roi]:
    """Condition corrected power and return (image, roi); `roi` given overrides detection.

    The override lets a paired capture (the unconcealed reconstruction target) be cut at the
    same place as its concealed input, so the pair stays pixel-aligned.
    """
    _check_raw(power)
    if roi is None:
        roi = find_roi(power, params, heads)
    x, y, rw, rh = roi
    crop = power[y : y + rh, x : x + rw]
    if crop.shape[0] < 1 or crop.shape[1] < 1:
        raise DataError(f"ROI {roi} lies outside the frame {power.shape}")
    db = power_to_db(crop, params)
    n = params.out_size
    if db.shape != (n, n):
        db = cv2.resize(db, (n, n), interpolation=cv2.INTER_LINEAR)
    scale = np.float32(1.0 / (params.db_max - params.db_min))
    out = db  # a fresh float32 array (power_to_db or the resize made it): worked on in place
    out -= np.float32(params.db_min)
    out *= scale
    np.clip(out, 0.0, 1.0, out=out)
    if params.quantize:
        # Same rounding as writing an 8-bit PNG and reading it back with /255.
        out *= np.float32(255.0)
        np.rint(out, out=out)
        out /= np.float32(255.0)
    return out, roi


def condition(power: np.ndarray, params: ConditioningParams, heads: HeadWeights | None = None) -> np.ndarray:
    """Return the float32 [out_size, out_size] model input in [0, 1] from corrected power."""
    return condition_with_roi(power, params, heads=heads)[0]


def calibrate_and_condition(
    raw: np.ndarray,
    profile: CalibrationProfile | None,
    params: ConditioningParams | None = None,
    temp_c: float | None = None,
) -> np.ndarray:
    """Return the 64×64 float32 [0,1] model input for one raw frame (THE shared function).

    `params` defaults to the profile's conditioning, or to `ConditioningParams()` without a
    profile (then no dark/gain/bad-pixel correction is applied). `temp_c`: the frame's sensor
    temperature, for a temperature-compensated profile.
    """
    if params is None:
        params = profile.conditioning if profile is not None else ConditioningParams()
    return condition(calibrate(raw, profile, temp_c), params)
