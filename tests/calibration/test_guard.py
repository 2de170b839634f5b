"""StreamGuard: the per-frame calibration checks the daemon runs (fit, envelope, input drift)."""

from __future__ import annotations

import dataclasses

import numpy as np

from calibration.guard import GuardSettings, StreamGuard
from calibration.simulated import true_profile
from calibration.validity import ValidityEnvelope
from scanner_io.simulator import ScannerSimulator
from scanner_io.sources import open_source


def _frames(uri: str, n: int) -> list:
    with open_source(uri) as src:
        return [src.read(5) for _ in range(n)]


def _profile_with_envelope(header, **env_changes):
    profile = true_profile(ScannerSimulator(seed=0, identities=1))
    env = dataclasses.replace(ValidityEnvelope.from_header(header), **env_changes)
    return dataclasses.replace(profile, envelope=env)


def test_fit_names_what_differs_and_is_decided_once_per_header_layout() -> None:
    frame = _frames("sim?seed=0&frames=1", 1)[0]
    guard = StreamGuard(_profile_with_envelope(frame.header))
    assert guard.fit(frame.header).ok
    other = dataclasses.replace(frame.header, settings={**frame.header.settings, "looks": 4})
    verdict = guard.fit(other)
    assert not verdict.ok and verdict.differences == ("setting looks=4 (profile measured 2)",)
    assert guard.fit(other) is verdict  # cached: a steady stream costs a lookup
    moved = dataclasses.replace(frame.header, seq=99, t_capture_ns=frame.header.t_capture_ns + 10**9)
    assert guard.fit(moved) is guard.fit(frame.header)  # seq and time are not part of the layout


def test_envelope_flags_temperature_beyond_its_limit_and_rechecks_by_capture_time() -> None:
    frame = _frames("sim?seed=0&frames=1", 1)[0]
    h = frame.header
    guard = StreamGuard(_profile_with_envelope(h), GuardSettings(envelope_every_s=1.0))
    assert guard.checkable and not guard.envelope(h).stale
    hot = dataclasses.replace(h, sensor_temp_c=h.sensor_temp_c + 3.0)
    # Within the same second of capture time the verdict is reused ...
    assert not guard.envelope(dataclasses.replace(hot, t_capture_ns=h.t_capture_ns + 10**8)).stale
    # ... and re-checked after it.
    later = guard.envelope(dataclasses.replace(hot, t_capture_ns=h.t_capture_ns + 2 * 10**9))
    assert later.stale and "+3.00 °C" in later.reason


def test_a_profile_without_an_envelope_is_not_checked() -> None:
    frame = _frames("sim?seed=0&frames=1", 1)[0]
    guard = StreamGuard(true_profile(ScannerSimulator(seed=0, identities=1)))
    assert not guard.checkable and guard.envelope(frame.header) is None


def test_the_monitor_sees_every_nth_frame_and_flags_a_gain_shift() -> None:
    frames = _frames("sim?seed=0&frames=140", 140)
    profile = _profile_with_envelope(frames[0].header)
    guard = StreamGuard(profile, GuardSettings(monitor_every=2))
    states = [guard.monitor(f.data) for f in frames[:120]]
    assert all(s is None for s in states[1::2]) and all(s is not None for s in states[::2])
    assert not states[-2].drifted
    # The same scene 60 % brighter: the bright level moves by 10·log10(1.6) ≈ 2 dB > 1.5 dB limit.
    shifted = [
        np.clip(profile.dark + (f.data.astype(np.float32) - profile.dark) * 1.6, 0, 65535).astype(np.uint16)
        for f in frames
    ]
    drifted = [guard.monitor(d) for d in shifted * 3]
    assert drifted[-2] is not None and drifted[-2].drifted
    assert any("signal level drifted" in r for r in drifted[-2].reasons)
