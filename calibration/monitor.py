"""Watch the input stream against its calibration, frame by frame, cheaply (R-NEW-11).

Per frame, on a fixed sample of good pixels of `raw − dark`: the dark level and the noise floor
from the lower quantiles (the background dominates them even with a head in the frame), and
the bright level (p99 of corrected power, dB) — each smoothed with an exponential average and
compared with a reference learned over the first frames (or given). Over the whole frame, a
persistence filter finds pixels the profile calls good that are now hot (far above all four
neighbours in most recent frames) or flickering (near full scale now and then). Drift beyond
the configured limits is flagged with a reason; the monitor never stops a stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from calibration.profile import CalibrationProfile

__all__ = ["InputMonitor", "MonitorSettings", "MonitorState"]

_Z25, _Z10 = 0.6745, 1.2816  # standard-normal quantiles at 25 % and 10 %


@dataclass(frozen=True)
class MonitorSettings:
    """Limits and time constants of the input monitor."""

    sample_pixels: int = 4096  # good pixels the level statistics look at
    warmup_frames: int = 50  # frames that set the reference when none is given
    time_constant_frames: float = 50.0  # exponential averaging of the statistics
    dark_drift_limit_dn: float = 15.0
    noise_ratio_limit: float = 1.3  # noise floor relative to the reference
    level_drift_limit_db: float = 1.5  # bright level (p99 of corrected power)
    spike_dn: float = 1000.0  # a candidate hot pixel is this far above all four neighbours
    hot_persistence: float = 0.9  # … in this fraction of recent frames (exponential average)
    flicker_fraction: float = 0.9  # a flicker candidate reaches this fraction of full scale
    flicker_count: float = 3.0  # decayed count of near-full-scale spikes that flags a flicker
    persistence_frames: float = 30.0  # memory of the persistence filter (a new hot pixel shows in ≈ 70)
    full_scale: float = 65535.0
    seed: int = 0


@dataclass(frozen=True)
class MonitorState:
    """What the monitor says after a frame: smoothed figures, flags and reasons."""

    frames: int
    dark_offset_dn: float
    noise_dn: float
    level_db: float
    reference: tuple[float, float, float] | None  # (dark offset, noise, level dB)
    new_hot: int
    new_flickering: int
    drifted: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)


class InputMonitor:
    """Per-frame input statistics against a calibration profile; `update(raw)` costs ≈ 100 µs.

    `reference=(dark offset DN, noise DN, level dB)` fixes the reference; by default it is the
    mean over the first `warmup_frames` (a fresh profile is activated on a healthy sensor).
    """

    def __init__(
        self,
        profile: CalibrationProfile,
        settings: MonitorSettings | None = None,
        reference: tuple[float, float, float] | None = None,
    ) -> None:
        self.settings = s = settings or MonitorSettings()
        self.profile = profile
        good = ~profile.bad_pixels
        flat_good = np.flatnonzero(good.reshape(-1))
        n = min(s.sample_pixels, len(flat_good))
        rng = np.random.default_rng(s.seed)
        self._idx = np.sort(rng.choice(flat_good, n, replace=False)) if n else flat_good
        self._dark_s = profile.dark.reshape(-1)[self._idx]
        self._gain_s = profile.gain.reshape(-1)[self._idx]
        self._dark = profile.dark
        self._good = good
        self._alpha = 1.0 / max(s.time_constant_frames, 1.0)
        self._decay = np.float32(1.0 - 1.0 / max(s.persistence_frames, 1.0))
        self._hot_score = np.zeros(profile.shape, np.float32)
        self._flicker_score = np.zeros(profile.shape, np.float32)
        self._ema: list[float] | None = None
        self._warm: list[tuple[float, float, float]] = []
        self.reference = reference
        self.frames = 0

    def _levels(self, raw: np.ndarray) -> tuple[float, float, float]:
        r = raw.reshape(-1)[self._idx].astype(np.float32) - self._dark_s
        n = len(r)
        k10, k25, k99 = int(0.10 * (n - 1)), int(0.25 * (n - 1)), int(0.99 * (n - 1))
        part = np.partition(r, (k10, k25, k99))  # three order statistics, cheaper than percentile
        q10, q25, q99 = part[k10], part[k25], part[k99]
        noise = max(float(q25 - q10) / (_Z10 - _Z25), 0.0)
        offset = float(q25) + _Z25 * noise
        level = 10.0 * math.log10(max(float(q99) * float(np.median(self._gain_s)), 1.0))
        return offset, noise, level

    def _pixels(self, raw: np.ndarray) -> tuple[int, int]:
        s = self.settings
        r = raw.astype(np.float32) - self._dark
        nb = np.full_like(r, -np.inf)
        # Largest of the four neighbours; a lone hot pixel stands above all of them.
        np.maximum(nb[1:, :], r[:-1, :], out=nb[1:, :])
        np.maximum(nb[:-1, :], r[1:, :], out=nb[:-1, :])
        np.maximum(nb[:, 1:], r[:, :-1], out=nb[:, 1:])
        np.maximum(nb[:, :-1], r[:, 1:], out=nb[:, :-1])
        cand = (r - nb) > s.spike_dn
        spike = (
            cand & (raw >= s.flicker_fraction * s.full_scale) & (nb < 0.5 * s.flicker_fraction * s.full_scale)
        )
        # Hot: the fraction of recent frames a pixel stood out (exponential average, from 0, so a
        # pixel must stand out for a while before it counts). Flickering: a decayed count of
        # near-full-scale spikes, which speckle on a face does not reach.
        self._hot_score *= self._decay
        self._hot_score += (1.0 - self._decay) * cand
        self._flicker_score *= self._decay
        self._flicker_score += spike
        hot = self._good & (self._hot_score >= s.hot_persistence)
        flick = self._good & ~hot & (self._flicker_score >= s.flicker_count)
        return int(hot.sum()), int(flick.sum())

    def update(self, raw: np.ndarray, temp_c: float | None = None) -> MonitorState:
        """Take one raw frame (the profile's shape) and return the monitor's state after it.

        `temp_c` (the header's sensor temperature) lets a temperature-compensated profile's dark
        follow the sensor, so a warm-up it corrects is not reported as drift.
        """
        dark = self.profile.dark_at(temp_c)
        if dark is not self._dark:
            self._dark = dark
            self._dark_s = dark.reshape(-1)[self._idx]
        s = self.settings
        self.frames += 1
        levels = self._levels(raw)
        if self._ema is None:
            self._ema = list(levels)
        else:
            a = self._alpha
            self._ema = [(1 - a) * e + a * v for e, v in zip(self._ema, levels, strict=True)]
        if self.reference is None:
            self._warm.append(levels)
            if len(self._warm) >= s.warmup_frames:
                self.reference = tuple(float(v) for v in np.mean(self._warm, axis=0))  # type: ignore[assignment]
                self._warm = []
        new_hot, new_flicker = self._pixels(raw)
        reasons = []
        off, noise, level = self._ema
        if self.reference is not None:
            r_off, r_noise, r_level = self.reference
            if abs(off - r_off) > s.dark_drift_limit_dn:
                reasons.append(f"dark level drifted {off - r_off:+.1f} DN (limit {s.dark_drift_limit_dn:g})")
            if r_noise > 0 and noise / r_noise > s.noise_ratio_limit:
                reasons.append(
                    f"noise floor {noise / r_noise:.2f}× the reference (limit {s.noise_ratio_limit:g}×)"
                )
            if abs(level - r_level) > s.level_drift_limit_db:
                reasons.append(
                    f"signal level drifted {level - r_level:+.2f} dB (limit {s.level_drift_limit_db:g})"
                )
        if new_hot:
            reasons.append(f"{new_hot} new hot pixels")
        if new_flicker:
            reasons.append(f"{new_flicker} new flickering pixels")
        return MonitorState(
            frames=self.frames,
            dark_offset_dn=off,
            noise_dn=noise,
            level_db=level,
            reference=self.reference,
            new_hot=new_hot,
            new_flickering=new_flicker,
            drifted=bool(reasons),
            reasons=tuple(reasons),
        )
