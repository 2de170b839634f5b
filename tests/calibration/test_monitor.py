"""The input monitor and the frame-quality check, on simulated face, dark and flat frames."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.conditioning import calibrate
from calibration.monitor import InputMonitor
from calibration.quality import FrameStatus, NoFaceReason, assess_frame
from calibration.simulated import true_profile
from calibration.validity import check_envelope, check_stream_match
from scanner_io.simulator import ScannerSimulator


def _frames(n: int, start: int = 0, **kw) -> list[np.ndarray]:
    sim = ScannerSimulator(seed=0, identities=6, **kw)
    sim.seek(start)
    return [sim.next_frame().data for _ in range(n)]


@pytest.fixture(scope="module")
def profile():
    return true_profile(ScannerSimulator(seed=0, identities=1))


@pytest.fixture(scope="module")
def faces() -> list[np.ndarray]:
    return _frames(220)


def _run(profile, frames: list[np.ndarray]):
    monitor = InputMonitor(profile)
    first = None
    state = None
    for i, f in enumerate(frames):
        state = monitor.update(f)
        if state.drifted and first is None:
            first = i
    return first, state


def test_an_undrifted_stream_is_never_flagged(profile, faces) -> None:
    first, state = _run(profile, faces)
    assert first is None, state.reasons
    assert state.reference is not None and abs(state.noise_dn / state.reference[1] - 1.0) < 0.1


def test_dark_drift_gain_shift_and_noise_increase_are_flagged(profile, faces) -> None:
    first, state = _run(profile, faces[:100] + _frames(120, 100, temp_offset_c=3.0))
    assert first is not None and first >= 100 and any("dark level" in r for r in state.reasons)
    first, state = _run(profile, faces[:100] + _frames(120, 100, gain_drift=-0.5))
    assert first is not None and first >= 100 and any("signal level" in r for r in state.reasons)
    rng = np.random.default_rng(1)
    noisy = [np.clip(f + rng.normal(0.0, 14.0, f.shape), 0, 65535).astype(np.uint16) for f in faces[100:]]
    first, state = _run(profile, faces[:100] + noisy)
    assert first is not None and first >= 100 and any("noise floor" in r for r in state.reasons)


def test_persistence_filter_finds_a_new_hot_and_a_new_flickering_pixel(profile, faces) -> None:
    y, x = np.argwhere(~profile.bad_pixels)[1000]
    y2, x2 = np.argwhere(~profile.bad_pixels)[5000]
    mutated = []
    for i, f in enumerate(faces):
        f = f.copy()
        if i >= 60:
            f[y, x] = np.uint16(profile.dark[y, x] + 20000)
            if i % 5 == 0:
                f[y2, x2] = 60000
        mutated.append(f)
    _, state = _run(profile, mutated)
    assert state.new_hot == 1 and state.new_flickering == 1, state.reasons


def test_face_frames_are_ok_and_dark_flat_blank_saturated_are_no_face(profile, faces) -> None:
    verdicts = [assess_frame(f, calibrate(f, profile)) for f in faces[:120]]
    assert all(v.status is FrameStatus.OK for v in verdicts)
    cases = {
        NoFaceReason.BLANK: ScannerSimulator(seed=0, scene="dark").next_frame().data,
        NoFaceReason.FLAT: ScannerSimulator(seed=0, scene="flat", level=1.0).next_frame().data,
        NoFaceReason.SATURATED: ScannerSimulator(seed=0, scene="flat", level=4.0).next_frame().data,
    }
    cases_const = np.full((128, 128), 1500, np.uint16)
    for reason, raw in [*cases.items(), (NoFaceReason.BLANK, cases_const)]:
        q = assess_frame(raw, calibrate(raw, profile))
        assert q.status is FrameStatus.NO_FACE and q.reason is reason, (reason, q)


def test_stream_match_and_envelope(profile) -> None:
    from calibration.validity import ValidityEnvelope

    header = ScannerSimulator(seed=0, scene="dark").next_frame().header
    assert check_stream_match(profile, header).ok  # a format-1 profile: scanner and shape only
    env = ValidityEnvelope.from_header(header, max_delta_t_c=2.0, max_age_s=3600.0)
    p2 = type(profile)(
        profile.scanner, profile.shape, profile.dark, profile.gain, profile.bad_pixels, envelope=env
    )
    assert check_stream_match(p2, header).ok
    other = ScannerSimulator(seed=0, scanner="sim7", shape=(64, 64)).next_frame().header
    m = check_stream_match(p2, other)
    assert not m.ok and "scanner 'sim7'" in m.reason and "resolution (64, 64)" in m.reason
    from dataclasses import replace

    changed = replace(header, settings={**header.settings, "looks": 4})
    assert "setting looks=4" in check_stream_match(p2, changed).reason
    assert not check_envelope(p2, 35.5, header.t_capture_ns + 10**9).stale
    warm = check_envelope(p2, 38.0, header.t_capture_ns + 10**9)
    assert warm.stale and "+3.00 °C" in warm.reason
    old = check_envelope(p2, 35.0, header.t_capture_ns + 7200 * 10**9)
    assert old.stale and "old" in old.reason
    assert check_envelope(profile, 35.0).stale  # no envelope: never silently fresh
