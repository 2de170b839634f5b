"""Record a calibration capture (dark or flat) from a source and check it is usable.

A capture is an MCAP recording made exactly as `thzedge record` makes one (scanner_io's
Recorder), with the capture's kind and level in its manifest. Before anyone builds a profile
from it, `check_capture` looks at the frames: the right kind of scene (a "dark" capture with
signal in it is refused), not saturated, and still (no motion from frame to frame). The
verdict is one line with the figures.

Everything here is numpy only, so capturing works on a device without the `calibrate` extra.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scanner_io.choices import Choice
from scanner_io.errors import DataError
from scanner_io.frame import Frame, FrameHeader

if TYPE_CHECKING:
    from scanner_io.sources import CurveClientKeys

__all__ = [
    "CaptureCheck",
    "CaptureKind",
    "CaptureLimits",
    "CaptureSet",
    "capture_set_from_frames",
    "check_capture",
    "full_scale",
    "read_capture",
    "read_frames",
    "record_capture",
]

REFUSED_SUFFIX = "-refused.mcap"


class CaptureKind(Choice):
    """What a calibration capture looks at."""

    DARK = "dark"  # shutter closed / absorber: the dark signal
    FLAT = "flat"  # uniform reference reflector


@dataclass(frozen=True)
class CaptureLimits:
    """When a capture is refused (fractions of the ADC full scale, or noise units)."""

    dark_max_median: float = 0.10  # a dark frame's median stays below 10 % of full scale
    # and no frame has bright structure: p99 − median within 5 robust σ of its own spread (a
    # dark frame's fixed pattern is ≈ Gaussian, 2.5σ; a face or a lit scene has a heavy tail)
    dark_max_structure: float = 5.0
    flat_min_median: float = 0.05  # a flat's median is at least 5 % of full scale
    flat_min_uniform: float = 0.90  # and 90 % of pixels lie within ±50 % of that median
    max_saturated: float = 0.01  # pixels at full scale (stuck pixels are far fewer)
    max_motion: float = 6.0  # p99 of the frame-to-frame change in units of its robust σ
    min_frames: int = 4


@dataclass(frozen=True)
class CaptureSet:
    """The frames of one capture, as float32 [N, H, W], with their headers."""

    kind: CaptureKind
    level: float | None
    frames: np.ndarray
    headers: tuple[FrameHeader, ...]
    path: Path | None = None

    @property
    def mean_temp_c(self) -> float | None:
        """Mean sensor temperature over the frames (None if the scanner reports none)."""
        temps = [h.sensor_temp_c for h in self.headers if h.sensor_temp_c is not None]
        return float(np.mean(temps)) if temps else None

    @property
    def full_scale(self) -> float:
        """The ADC ceiling of these frames (65535 for uint16)."""
        return full_scale(self.headers[0].dtype)


def full_scale(dtype: str) -> float:
    """Return the largest value a raw frame of `dtype` can hold (float frames: +inf)."""
    if dtype == "uint16":
        return 65535.0
    if dtype == "uint8":
        return 255.0
    return float("inf")


@dataclass(frozen=True)
class CaptureCheck:
    """Whether a capture is usable, with the figures that decided it."""

    ok: bool
    kind: CaptureKind
    frames: int
    median: float
    structure: float
    uniform: float
    saturated: float
    motion: float
    temp_range: tuple[float, float] | None
    full_scale: float
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def line(self) -> str:
        """One line: verdict and figures."""
        fs = self.full_scale
        pct = (lambda v: f"{100 * v / fs:.1f} %") if np.isfinite(fs) else (lambda v: "n/a")
        temp = f", sensor {self.temp_range[0]:.2f}–{self.temp_range[1]:.2f} °C" if self.temp_range else ""
        figures = (
            f"{self.frames} frames, median {self.median:.0f} ({pct(self.median)} of full scale), "
            f"p99−median {self.structure:.1f}σ, {100 * self.uniform:.1f} % uniform, "
            f"{100 * self.saturated:.2f} % saturated, frame-to-frame change {self.motion:.1f}σ{temp}"
        )
        if self.ok:
            return f"{self.kind} capture usable: {figures}"
        return f"{self.kind} capture refused ({'; '.join(self.reasons)}): {figures}"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "ok": self.ok,
            "kind": str(self.kind),
            "frames": self.frames,
            "median": self.median,
            "structure": self.structure,
            "uniform": self.uniform,
            "saturated": self.saturated,
            "motion": self.motion,
            "temp_range": list(self.temp_range) if self.temp_range else None,
            "reasons": list(self.reasons),
        }


def _structure(frame: np.ndarray) -> float:
    """(p99 − median) of one frame in units of its robust spatial σ (≈ 2.3 for pure noise)."""
    med = float(np.median(frame))
    sigma = 1.4826 * float(np.median(np.abs(frame - med)))
    return (float(np.percentile(frame, 99)) - med) / max(sigma, 1e-6)


def _motion(frames: np.ndarray) -> float:
    """p99 of the frame-to-frame change in units of its robust σ (≈ 2.6 for a still scene).

    Each frame is first scaled to the stack's median level, so a source-power fluctuation (the
    whole frame brighter) is not taken for motion; a moving scene changes some pixels a lot.
    """
    if len(frames) < 2:
        return 0.0
    med = np.median(frames.reshape(len(frames), -1), axis=1)
    scale = np.where(med > 0, np.median(med) / np.maximum(med, 1e-9), 1.0).astype(np.float32)
    norm = frames * scale[:, None, None]
    ratios = []
    for i in range(1, len(norm)):
        d = (norm[i] - norm[i - 1]).reshape(-1)
        mad = float(np.median(np.abs(d - np.median(d))))
        sigma = 1.4826 * mad
        if sigma <= 0:
            continue
        ratios.append(float(np.percentile(np.abs(d), 99)) / sigma)
    return float(np.median(ratios)) if ratios else 0.0


def check_capture(capture: CaptureSet, limits: CaptureLimits | None = None) -> CaptureCheck:
    """Check a capture is the right kind, unsaturated and still; never raises for a bad one."""
    limits = limits or CaptureLimits()
    frames = capture.frames
    fs = capture.full_scale
    n = len(frames)
    reasons = []
    if n < limits.min_frames:
        reasons.append(f"only {n} frames, need at least {limits.min_frames}")
    if n == 0:
        return CaptureCheck(False, capture.kind, 0, 0.0, 0.0, 0.0, 0.0, 0.0, None, fs, tuple(reasons))
    mean_frame = np.median(frames, axis=0) if n > 1 else frames[0]
    median = float(np.median(mean_frame))
    structure = max(_structure(f) for f in frames)
    uniform = float(np.mean(np.abs(mean_frame - median) <= 0.5 * max(abs(median), 1e-9)))
    saturated = float(np.mean(frames >= fs)) if np.isfinite(fs) else 0.0
    motion = _motion(frames)
    temps = [h.sensor_temp_c for h in capture.headers if h.sensor_temp_c is not None]
    temp_range = (float(min(temps)), float(max(temps))) if temps else None
    scale = fs if np.isfinite(fs) else max(float(np.max(mean_frame)), 1.0)
    if capture.kind is CaptureKind.DARK:
        if median > limits.dark_max_median * scale or structure > limits.dark_max_structure:
            reasons.append("there is signal in it: close the shutter or cover the aperture with the absorber")
    else:
        if median < limits.flat_min_median * scale:
            reasons.append("too little signal for a flat: is the reference reflector in place and lit?")
        elif uniform < limits.flat_min_uniform:
            reasons.append(
                f"not uniform ({100 * uniform:.0f} % of pixels near the median, need "
                f"{100 * limits.flat_min_uniform:.0f} %): fill the field with the reference reflector"
            )
    if saturated > limits.max_saturated:
        reasons.append(f"{100 * saturated:.1f} % of pixels saturated: lower the level")
    if motion > limits.max_motion:
        reasons.append(f"the scene moved (frame-to-frame change {motion:.1f}σ > {limits.max_motion:g}σ)")
    return CaptureCheck(
        ok=not reasons,
        kind=capture.kind,
        frames=n,
        median=median,
        structure=structure,
        uniform=uniform,
        saturated=saturated,
        motion=motion,
        temp_range=temp_range,
        full_scale=fs,
        reasons=tuple(reasons),
    )


def capture_set_from_frames(
    kind: CaptureKind | str, frames: Sequence[Frame], level: float | None = None, path: Path | None = None
) -> CaptureSet:
    """Stack frames into a CaptureSet; frames of different shapes or scanners are a DataError."""
    if not frames:
        raise DataError(f"the {kind} capture holds no frame")
    first = frames[0].header
    for f in frames:
        h = f.header
        if (h.scanner, tuple(h.shape), h.dtype) != (first.scanner, tuple(first.shape), first.dtype):
            raise DataError(
                f"capture {path or ''} mixes scanners or shapes ({first.scanner} {tuple(first.shape)} "
                f"and {h.scanner} {tuple(h.shape)}); capture one scanner at a time"
            )
    stack = np.stack([np.asarray(f.data, dtype=np.float32) for f in frames])
    return CaptureSet(CaptureKind(kind), level, stack, tuple(f.header for f in frames), path)


def read_capture(path: str | Path, max_frames: int = 4096) -> CaptureSet:
    """Read a capture MCAP written by `record_capture`; its kind and level come from the manifest."""
    from scanner_io.recording import MANIFEST_NAME, RecordingReader

    reader = RecordingReader(path)
    frames: list[Frame] = []
    for item in reader:
        if isinstance(item.item, Frame):
            frames.append(item.item)
            if len(frames) >= max_frames:
                break
    manifest = reader.metadata.get(MANIFEST_NAME, {})
    kind = manifest.get("capture_kind")
    if kind not in CaptureKind.values():
        raise DataError(
            f"{path} is not a calibration capture (no capture_kind in its manifest); "
            "record it with thzedge calibrate capture"
        )
    level_raw = manifest.get("capture_level")
    level = None if level_raw in (None, "null") else float(json.loads(level_raw))
    return capture_set_from_frames(kind, frames, level, Path(path))


@dataclass(frozen=True)
class CaptureResult:
    """What `record_capture` wrote and what the check said."""

    path: Path
    check: CaptureCheck
    seconds: float


def capture_file_name(kind: CaptureKind, level: float | None) -> str:
    """Return the capture's file name stem: dark-<time>, flat-L<level>-<time>."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    lvl = f"-L{level:g}" if kind is CaptureKind.FLAT and level is not None else ""
    return f"{kind}{lvl}-{stamp}"


def record_capture(
    source_uri: str,
    kind: CaptureKind | str,
    frames: int,
    out_dir: str | Path,
    level: float | None = None,
    limits: CaptureLimits | None = None,
    progress: Callable[[int], None] | None = None,
    stop: Any | None = None,
    timeout_s: float = 60.0,
    curve: CurveClientKeys | None = None,
) -> CaptureResult:
    """Record `frames` frames of a calibration scene into OUT_DIR/<kind>….mcap and check them.

    A capture that fails its check is kept, renamed `…-refused.mcap` (`calibrate build` of a
    directory skips it), so nothing recorded is lost and nothing unusable is built from.
    """
    from scanner_io.recording import Recorder, default_manifest, record_source
    from scanner_io.sources import open_source

    kind = CaptureKind(kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = capture_file_name(kind, level)
    path = out / f"{stem}.mcap"
    n = 1
    while path.exists() or path.with_name(path.name + ".part").exists():  # never overwrite a capture
        n += 1
        path = out / f"{stem}-{n}.mcap"
    t0 = time.monotonic()
    src = open_source(source_uri, curve=curve)
    try:
        manifest = default_manifest(
            source=source_uri,
            extra={"capture_kind": str(kind), "capture_level": level, "frames_requested": frames},
        )
        recorder = Recorder(path, manifest=manifest)
        summary = record_source(
            src, recorder, frames=frames, duration_s=timeout_s, stop=stop, progress=progress
        )
    finally:
        src.close()
    if summary.frames == 0:
        Path(summary.path).unlink(missing_ok=True)
        raise DataError(f"{source_uri} delivered no frame in {timeout_s:g} s: is the scanner sending?")
    capture = read_capture(path)
    check = check_capture(capture, limits)
    if summary.frames < frames:
        short = f"only {summary.frames} of {frames} frames arrived ({summary.stopped_by})"
        check = replace(check, ok=False, reasons=(*check.reasons, short))
    if not check.ok:
        refused = path.with_name(path.name[: -len(".mcap")] + REFUSED_SUFFIX)
        path.rename(refused)
        path = refused
    return CaptureResult(path, check, time.monotonic() - t0)


def read_frames(
    source_uri: str, frames: int, timeout_s: float = 30.0, curve: CurveClientKeys | None = None
) -> list[Frame]:
    """Read `frames` frames from a source (malformed messages skipped); a DataError if too few came."""
    from scanner_io.sources import MalformedFrame, open_source

    src = open_source(source_uri, curve=curve)
    got: list[Frame] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < frames and time.monotonic() < deadline:
            item = src.read(0.2)
            if item is None:
                if src.exhausted:
                    break
                continue
            if not isinstance(item, MalformedFrame):
                got.append(item)
    finally:
        src.close()
    if len(got) < frames:
        raise DataError(f"{source_uri} delivered {len(got)} of {frames} frames in {timeout_s:g} s")
    return got
