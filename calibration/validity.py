"""Where a calibration profile is valid: its scanner, acquisition settings, temperature and age.

A profile is measured on one scanner (serial), at one resolution and acquisition settings, at
one sensor temperature, at one time. `ValidityEnvelope` records that, with the allowed
temperature excursion and maximum age; `check_stream_match` says whether a frame header belongs
to the scanner and settings the profile was made for (a mismatch is a hard error for the daemon,
R-CAL-1), `check_envelope` whether the profile is still fresh (stale: R-CAL-3 flags and goes on).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scanner_io.errors import CalibrationError
from scanner_io.frame import FrameHeader

if TYPE_CHECKING:
    from calibration.profile import CalibrationProfile

__all__ = [
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_DELTA_T_C",
    "EnvelopeVerdict",
    "StreamMatch",
    "ValidityEnvelope",
    "check_envelope",
    "check_stream_match",
]

DEFAULT_MAX_DELTA_T_C = 2.0  # dark moves ≈ 10 counts/°C: 2 °C is about 1.5× the read noise
DEFAULT_MAX_AGE_S = 30 * 24 * 3600.0  # a month; a technician rechecks monthly


@dataclass(frozen=True)
class ValidityEnvelope:
    """The conditions a profile was measured under and how far from them it stays valid."""

    scanner: str
    shape: tuple[int, int]
    dtype: str
    settings: Mapping[str, Any]
    sensor_temp_c: float | None
    captured_ns: int
    max_delta_t_c: float = DEFAULT_MAX_DELTA_T_C
    max_age_s: float = DEFAULT_MAX_AGE_S

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        object.__setattr__(self, "settings", dict(self.settings))
        if not (self.max_delta_t_c > 0 and self.max_age_s > 0):
            raise CalibrationError(
                f"validity envelope needs max_delta_t_c > 0 and max_age_s > 0, got "
                f"{self.max_delta_t_c} and {self.max_age_s}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict stored in profile.json."""
        return {
            "scanner": self.scanner,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "settings": dict(self.settings),
            "sensor_temp_c": self.sensor_temp_c,
            "captured_ns": int(self.captured_ns),
            "max_delta_t_c": float(self.max_delta_t_c),
            "max_age_s": float(self.max_age_s),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ValidityEnvelope:
        """Build from the stored dict; a missing key is a CalibrationError naming it."""
        try:
            return cls(
                scanner=str(d["scanner"]),
                shape=tuple(d["shape"]),
                dtype=str(d["dtype"]),
                settings=dict(d.get("settings", {})),
                sensor_temp_c=None if d.get("sensor_temp_c") is None else float(d["sensor_temp_c"]),
                captured_ns=int(d["captured_ns"]),
                max_delta_t_c=float(d.get("max_delta_t_c", DEFAULT_MAX_DELTA_T_C)),
                max_age_s=float(d.get("max_age_s", DEFAULT_MAX_AGE_S)),
            )
        except KeyError as exc:
            raise CalibrationError(f"validity envelope lacks field {exc}") from exc

    @classmethod
    def from_header(
        cls,
        header: FrameHeader,
        sensor_temp_c: float | None = None,
        max_delta_t_c: float = DEFAULT_MAX_DELTA_T_C,
        max_age_s: float = DEFAULT_MAX_AGE_S,
    ) -> ValidityEnvelope:
        """Return the envelope of a capture whose frames carry `header` (temperature: their mean)."""
        temp = sensor_temp_c if sensor_temp_c is not None else header.sensor_temp_c
        return cls(
            scanner=header.scanner,
            shape=(int(header.shape[0]), int(header.shape[1])),
            dtype=header.dtype,
            settings=dict(header.settings),
            sensor_temp_c=temp,
            captured_ns=int(header.t_capture_ns),
            max_delta_t_c=max_delta_t_c,
            max_age_s=max_age_s,
        )


@dataclass(frozen=True)
class StreamMatch:
    """Whether a stream's frames fit a profile; `reason` says what differs (empty when it fits)."""

    ok: bool
    reason: str = ""
    differences: tuple[str, ...] = field(default_factory=tuple)


def check_stream_match(profile: CalibrationProfile, header: FrameHeader) -> StreamMatch:
    """Check a frame header's scanner serial, resolution, dtype and settings against the profile.

    A profile without an envelope (format 1) only knows its scanner and shape, so only those
    are compared. Settings are compared key by key over the union of keys.
    """
    diffs: list[str] = []
    if header.scanner != profile.scanner:
        diffs.append(f"scanner {header.scanner!r} (profile is for {profile.scanner!r})")
    shape = tuple(int(v) for v in header.shape)
    if shape != tuple(profile.shape):
        diffs.append(f"resolution {shape} (profile is for {tuple(profile.shape)})")
    env = profile.envelope
    if env is not None:
        if header.dtype != env.dtype:
            diffs.append(f"dtype {header.dtype} (profile measured {env.dtype})")
        for key in sorted(set(env.settings) | set(header.settings)):
            want, got = env.settings.get(key), header.settings.get(key)
            if want != got:
                diffs.append(f"setting {key}={got!r} (profile measured {want!r})")
    if not diffs:
        return StreamMatch(True)
    reason = (
        f"calibration profile {profile.profile_id} does not fit this stream: "
        + "; ".join(diffs)
        + "; calibrate this scanner at these settings (thzedge calibrate capture/build)"
    )
    return StreamMatch(False, reason, tuple(diffs))


@dataclass(frozen=True)
class EnvelopeVerdict:
    """Whether a profile is inside its validity envelope now; `reasons` say why it is stale."""

    stale: bool
    reasons: tuple[str, ...] = ()
    delta_t_c: float | None = None
    age_s: float | None = None

    @property
    def reason(self) -> str:
        """All reasons as one line (empty when fresh)."""
        return "; ".join(self.reasons)


def check_envelope(
    profile: CalibrationProfile, sensor_temp_c: float | None, now_ns: int | None = None
) -> EnvelopeVerdict:
    """Check the sensor temperature and the profile's age against its validity envelope.

    A profile without an envelope cannot be checked and is reported stale with that reason, so
    a hand-made or format-1 profile never passes silently as fresh.
    """
    env = profile.envelope
    if env is None:
        return EnvelopeVerdict(
            True,
            (
                "the profile has no validity envelope (not made by `calibrate build`: the simulator's, "
                "a hand-made one or one from before format 2)",
            ),
        )
    now_ns = time.time_ns() if now_ns is None else now_ns
    reasons = []
    age = (now_ns - env.captured_ns) / 1e9
    if age > env.max_age_s:
        reasons.append(f"profile is {age / 86400:.1f} days old (valid for {env.max_age_s / 86400:.1f})")
    dt = None
    if sensor_temp_c is not None and env.sensor_temp_c is not None and math.isfinite(sensor_temp_c):
        dt = float(sensor_temp_c - env.sensor_temp_c)
        if abs(dt) > env.max_delta_t_c:
            reasons.append(
                f"sensor at {sensor_temp_c:.2f} °C, {dt:+.2f} °C from calibration "
                f"({env.sensor_temp_c:.2f} °C, allowed ±{env.max_delta_t_c:g} °C)"
            )
    return EnvelopeVerdict(bool(reasons), tuple(reasons), dt, age)
