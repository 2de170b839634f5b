"""Check a sensor against its calibration profile on fresh frames (`thzedge calibrate check`).

On a fresh dark stack: the dark drift (median of fresh dark − profile dark over good pixels; a
temperature-compensated profile's dark at the capture's mean temperature),
the residual fixed-pattern non-uniformity after correction (EMVA DSNU of the difference) and new
bad pixels (hot, flickering, noisy, stuck where the profile had a good pixel). On a fresh flat:
the gain drift (signal against the profile's signal at the same level), the residual PRNU after
correction and new dead pixels. Always: the sensor temperature and the profile's age against its
validity envelope. Each figure is compared with warn / fail limits; the verdict is the worst.

numpy only: a check runs on a device without the `calibrate` extra.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.capture import CaptureKind, CaptureSet
from calibration.emva import nonuniformity
from calibration.profile import CalibrationProfile
from calibration.validity import check_envelope, check_stream_match
from scanner_io.choices import Choice
from scanner_io.errors import CalibrationError

__all__ = ["CheckLimits", "CheckReport", "Verdict", "check_capture_against"]


class Verdict(Choice):
    """Outcome of a calibration check; the exit code of `calibrate check` follows it."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"

    @property
    def exit_code(self) -> int:
        """0 pass, 3 warn, 4 fail (distinct from the error codes 1, 2, 65, 69, 78)."""
        return {"pass": 0, "warn": 3, "fail": 4}[self.value]


_ORDER = {Verdict.PASS: 0, Verdict.WARN: 1, Verdict.FAIL: 2}


@dataclass(frozen=True)
class CheckLimits:
    """Warn / fail limits of a check (the temperature limit is the profile's envelope)."""

    dark_drift_warn_dn: float = 10.0  # ≈ 1 °C of dark drift at 10 counts/°C
    dark_drift_fail_dn: float = 20.0
    gain_drift_warn: float = 0.03  # relative
    gain_drift_fail: float = 0.05
    residual_dsnu_warn_dn: float = 10.0
    residual_dsnu_fail_dn: float = 20.0
    residual_prnu_warn_pct: float = 1.0
    residual_prnu_fail_pct: float = 2.0
    new_bad_warn: int = 1  # new bad pixels
    new_bad_fail_fraction: float = 0.001
    temp_warn_fraction: float = 0.75  # of the envelope's ±ΔT
    spike_dn: float = 1000.0  # a hot or spiking pixel is this far above the profile's dark
    noisy_ratio: float = 3.0
    dead_ratio: float = 0.5


@dataclass(frozen=True)
class Finding:
    """One checked figure: its value, the verdict its limits give, and a phrase for humans."""

    name: str
    value: float | None
    verdict: Verdict
    text: str


@dataclass(frozen=True)
class CheckReport:
    """The outcome of `check_capture_against`: verdict, findings, figures."""

    verdict: Verdict
    kind: CaptureKind
    frames: int
    profile_id: str
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    def line(self) -> str:
        """One line: the verdict and every figure."""
        parts = [f.text for f in self.findings]
        return (
            f"calibration check {self.verdict.upper()} ({self.kind}, {self.frames} frames, "
            f"profile {self.profile_id}): " + "; ".join(parts)
        )

    def figure(self, name: str) -> float | None:
        """Return one figure's value by name (None when not measured)."""
        for f in self.findings:
            if f.name == name:
                return f.value
        return None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "verdict": str(self.verdict),
            "kind": str(self.kind),
            "frames": self.frames,
            "profile_id": self.profile_id,
            "findings": [
                {"name": f.name, "value": f.value, "verdict": str(f.verdict), "text": f.text}
                for f in self.findings
            ],
        }


def _grade(value: float, warn: float, fail: float) -> Verdict:
    v = abs(value)
    return Verdict.FAIL if v > fail else Verdict.WARN if v > warn else Verdict.PASS


def _worst(verdicts: Iterable[Verdict]) -> Verdict:
    return max(verdicts, key=lambda v: _ORDER[v], default=Verdict.PASS)


def _flat_reference(profile: CalibrationProfile, level: float | None) -> float | None:
    """The profile's signal above dark at `level` (interpolated linearly between its levels)."""
    rows = (profile.qa or {}).get("flat_signal") or []
    if level is None or not rows:
        return None
    levels = np.array([r["level"] for r in rows], float)
    signals = np.array([r["signal_dn"] for r in rows], float)
    if len(rows) == 1:
        return float(signals[0] * level / levels[0]) if levels[0] > 0 else None
    return float(np.polyval(np.polyfit(levels, signals, 1), level))


def check_capture_against(
    profile: CalibrationProfile,
    capture: CaptureSet,
    limits: CheckLimits | None = None,
    now_ns: int | None = None,
) -> CheckReport:
    """Check fresh dark or flat frames against a profile; never raises for a drifted sensor.

    A stream the profile was not made for (serial, resolution, settings) is a CalibrationError:
    there is nothing to compare.
    """
    lim = limits or CheckLimits()
    match = check_stream_match(profile, capture.headers[0])
    if not match.ok:
        raise CalibrationError(match.reason)
    frames = capture.frames.astype(np.float32, copy=False)
    n = len(frames)
    if n < 2:
        raise CalibrationError(f"a check needs at least 2 frames, got {n}")
    good = ~profile.bad_pixels
    median = np.median(frames, axis=0)
    # Spikes are taken out of the mean and σ with a simple robust clip about the median.
    mad = 1.4826 * np.median(np.abs(frames - median[None]), axis=0)
    keep = np.abs(frames - median[None]) <= np.maximum(6.0 * mad, 1.0)[None]
    cnt = np.maximum(keep.sum(axis=0), 1)
    mean = np.where(keep, frames, 0.0).sum(axis=0) / cnt
    var = np.where(keep, (frames - mean[None]) ** 2, 0.0).sum(axis=0) / np.maximum(cnt - 1, 1)
    std = np.sqrt(var)
    findings: list[Finding] = []
    qa = profile.qa or {}
    prof_noise = float((qa.get("before") or {}).get("temporal_dark_noise_dn") or np.sqrt(np.mean(var[good])))
    prof_frames = float((qa.get("frames") or {}).get("dark") or 1e9)
    new_bad = np.zeros(profile.shape, bool)
    # What the profile expects at this capture's temperature (its dark, or its dark model's).
    dark = profile.dark_at(capture.mean_temp_c)
    if capture.kind is CaptureKind.DARK:
        diff = mean - dark
        drift = float(np.median(diff[good]))
        findings.append(
            Finding(
                "dark_drift_dn",
                drift,
                _grade(drift, lim.dark_drift_warn_dn, lim.dark_drift_fail_dn),
                f"dark drift {drift:+.1f} DN "
                f"(warn {lim.dark_drift_warn_dn:g}, fail {lim.dark_drift_fail_dn:g})",
            )
        )
        noise_var = float(np.mean(var[good])) / n + prof_noise**2 / prof_frames
        dsnu = nonuniformity(diff - drift, good, noise_var)["total"]
        findings.append(
            Finding(
                "residual_dsnu_dn",
                dsnu,
                _grade(dsnu, lim.residual_dsnu_warn_dn, lim.residual_dsnu_fail_dn),
                f"residual DSNU {dsnu:.2f} DN",
            )
        )
        pop = float(np.median(std[good]))
        spikes = (frames > (dark + drift + lim.spike_dn)[None]).any(axis=0)
        new_bad |= spikes | (std > lim.noisy_ratio * max(pop, 1e-6))
        findings.append(
            Finding(
                "temporal_dark_noise_dn",
                float(np.sqrt(np.mean(var[good]))),
                Verdict.PASS,
                f"temporal dark noise {np.sqrt(np.mean(var[good])):.2f} DN (profile {prof_noise:.2f})",
            )
        )
    else:
        signal = mean - dark
        level_dn = float(np.median(signal[good]))
        ref = _flat_reference(profile, capture.level)
        if ref is not None and ref > 0:
            gd = level_dn / ref - 1.0
            findings.append(
                Finding(
                    "gain_drift",
                    gd,
                    _grade(gd, lim.gain_drift_warn, lim.gain_drift_fail),
                    f"gain drift {100 * gd:+.2f} % at level {capture.level:g} "
                    f"(warn {100 * lim.gain_drift_warn:g} %, fail {100 * lim.gain_drift_fail:g} %)",
                )
            )
        corrected = signal * profile.gain
        mu = float(np.mean(corrected[good]))
        noise_var = (float(np.mean(var[good])) / n + prof_noise**2 / prof_frames) * float(
            np.mean(profile.gain[good] ** 2)
        )
        prnu = 100.0 * nonuniformity(corrected, good, noise_var)["total"] / max(abs(mu), 1e-9)
        findings.append(
            Finding(
                "residual_prnu_pct",
                prnu,
                _grade(prnu, lim.residual_prnu_warn_pct, lim.residual_prnu_fail_pct),
                f"residual PRNU {prnu:.2f} %",
            )
        )
        new_bad |= corrected < lim.dead_ratio * float(np.median(corrected[good]))
    new_bad &= good
    count = int(new_bad.sum())
    fail_at = max(1, int(lim.new_bad_fail_fraction * new_bad.size))
    verdict = (
        Verdict.FAIL if count >= fail_at else Verdict.WARN if count >= lim.new_bad_warn else Verdict.PASS
    )
    findings.append(
        Finding("new_bad_pixels", float(count), verdict, f"{count} new bad pixels (fail at {fail_at})")
    )
    env = check_envelope(profile, capture.mean_temp_c, now_ns)
    if env.delta_t_c is not None and profile.envelope is not None:
        dt = env.delta_t_c
        lim_t = profile.envelope.max_delta_t_c
        findings.append(
            Finding(
                "delta_t_c",
                dt,
                _grade(dt, lim.temp_warn_fraction * lim_t, lim_t),
                f"sensor {dt:+.2f} °C from calibration (allowed ±{lim_t:g} °C)",
            )
        )
    age_stale = [r for r in env.reasons if "old" in r or "envelope" in r]
    if age_stale:
        findings.append(Finding("age", env.age_s, Verdict.FAIL, "; ".join(age_stale)))
    elif env.age_s is not None:
        findings.append(Finding("age", env.age_s, Verdict.PASS, f"profile {env.age_s / 86400:.1f} days old"))
    return CheckReport(
        _worst(f.verdict for f in findings), capture.kind, n, profile.profile_id, tuple(findings)
    )
