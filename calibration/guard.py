"""Does the stream still fit its calibration? Per-frame checks the daemon runs while streaming.

`StreamGuard` holds, for one calibration profile, the three checks of a running stream:
- **fit** (R-CAL-1, R-NEW-10): the frame's scanner serial, resolution, dtype and acquisition
  settings against the profile's (`check_stream_match`), cached per header layout so a steady
  stream costs one dict lookup per frame;
- **envelope** (R-CAL-3): the frame's sensor temperature and capture time against the profile's
  validity envelope (`check_envelope`), at most once per `envelope_every_s` of capture time —
  only for profiles that have an envelope (a format-1 profile cannot be checked; `checkable` says so);
- **input drift** (R-NEW-11): `InputMonitor` on every `monitor_every`-th frame.

Each check answers with a state that changes rarely; the daemon turns changes into a metric,
an event and its `/readyz` state. Nothing here stops a stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from calibration.monitor import InputMonitor, MonitorSettings, MonitorState
from calibration.profile import CalibrationProfile
from calibration.validity import EnvelopeVerdict, StreamMatch, check_envelope, check_stream_match
from scanner_io.frame import FrameHeader

__all__ = ["GuardSettings", "StreamGuard"]


@dataclass(frozen=True)
class GuardSettings:
    """How often the guard looks: envelope by capture time, the input monitor by frame count."""

    monitor_every: int = 10  # 0: no input monitoring
    envelope_every_s: float = 1.0
    monitor: MonitorSettings | None = None


def _layout(header: FrameHeader) -> tuple[Any, ...]:
    """What `check_stream_match` compares, as a hashable key."""
    settings = tuple(sorted((str(k), repr(v)) for k, v in header.settings.items()))
    return (header.scanner, tuple(int(v) for v in header.shape), header.dtype, settings)


class StreamGuard:
    """The running checks of one profile against the frames it conditions (one thread uses it)."""

    def __init__(self, profile: CalibrationProfile, settings: GuardSettings | None = None) -> None:
        self.profile = profile
        self.settings = s = settings or GuardSettings()
        self._fits: dict[tuple[Any, ...], StreamMatch] = {}
        self._next_envelope_ns: int | None = None
        self._envelope: EnvelopeVerdict | None = None
        self._monitor = InputMonitor(profile, s.monitor) if s.monitor_every > 0 else None
        self._frames = 0
        self.drift: MonitorState | None = None  # the monitor's last state

    @property
    def checkable(self) -> bool:
        """True when the profile has a validity envelope to check frames against."""
        return self.profile.envelope is not None

    def fit(self, header: FrameHeader) -> StreamMatch:
        """Whether frames with this header fit the profile (cached per layout; bounded)."""
        key = _layout(header)
        found = self._fits.get(key)
        if found is None:
            found = check_stream_match(self.profile, header)
            if len(self._fits) >= 64:  # a scanner cycling through settings must not grow this
                self._fits.clear()
            self._fits[key] = found
        return found

    def envelope(self, header: FrameHeader) -> EnvelopeVerdict | None:
        """The envelope verdict, re-checked once per `envelope_every_s` of capture time.

        None for a profile without an envelope. Age is measured to the frame's capture time, so
        a replayed recording is judged as it was when captured.
        """
        if not self.checkable:
            return None
        t = int(header.t_capture_ns)
        if (
            self._next_envelope_ns is None
            or t >= self._next_envelope_ns
            or t < self._next_envelope_ns - int(2 * self.settings.envelope_every_s * 1e9)
        ):
            self._envelope = check_envelope(self.profile, header.sensor_temp_c, now_ns=t)
            self._next_envelope_ns = t + int(self.settings.envelope_every_s * 1e9)
        return self._envelope

    def monitor(self, raw: np.ndarray, temp_c: float | None = None) -> MonitorState | None:
        """Feed every `monitor_every`-th raw frame (and its sensor temperature) to the input monitor."""
        if self._monitor is None or raw.shape != self.profile.shape:
            return None
        self._frames += 1
        if (self._frames - 1) % self.settings.monitor_every:
            return None
        self.drift = self._monitor.update(raw, temp_c)
        return self.drift
