"""Temperature-compensated dark (profile format 3): fitted from darks at two temperatures, scored
against the simulated sensor's truth, applied per frame by the header's sensor temperature.

The simulated dark moves 10 DN/°C per pixel (30 % spread) and the stream warms up by about 3 °C;
a profile built at the start leaves that residual in every later frame.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from calibration.build import BuildSettings, build_profile
from calibration.capture import CaptureSet, capture_set_from_frames
from calibration.check import Verdict, check_capture_against
from calibration.conditioning import calibrate, calibrate_and_condition
from calibration.monitor import InputMonitor
from calibration.profile import CalibrationProfile
from calibration.simulated import profile_from_sensor_maps
from edge.cli import main
from edge.pipeline.context import ProcessingContext, QueuedFrame
from scanner_io.errors import CalibrationError
from scanner_io.simulator import ScannerSimulator, SensorMaps

SEED = 3
WARM = 9000  # stream frames: the warm-up is over (time constant 3000 frames)


def _scene(kind: str, frames: int, start: int = 0, level: float = 1.0) -> CaptureSet:
    sim = ScannerSimulator(seed=SEED, scene=kind, level=level)
    sim.seek(start)
    return capture_set_from_frames(
        kind, [sim.next_frame() for _ in range(frames)], level if kind == "flat" else None
    )


@pytest.fixture(scope="module")
def profiles() -> dict[str, CalibrationProfile]:
    cold, warm = _scene("dark", 64), _scene("dark", 64, start=WARM)
    flats = [_scene("flat", 16, level=lv) for lv in (0.5, 1.0)]
    return {
        "fixed": build_profile([cold, *flats]),
        "tc": build_profile([cold, warm, *flats], settings=BuildSettings(dark_tc=True)),
    }


def _warm_face() -> tuple[np.ndarray, float, CalibrationProfile]:
    """A face frame after the warm-up, its header temperature and the sensor's true profile then."""
    sim = ScannerSimulator(seed=SEED, identities=4)
    sim.seek(WARM)
    f = sim.next_frame()
    t = f.truth
    maps = SensorMaps(scanner="sim0", shape=f.data.shape, dark=t.dark, gain=t.gain, bad_pixels=t.bad_pixels)
    return f.data, float(f.header.sensor_temp_c), profile_from_sensor_maps(maps)


def test_fitted_coefficients_match_the_sensor_truth(profiles) -> None:
    p = profiles["tc"]
    assert p.format == 3 and p.temperature_compensated
    sim = ScannerSimulator(seed=SEED)
    t0 = float(p.dark_ref_temp_c)
    true_tc = sim.sensor_maps(t0 + 1.0).dark - sim.sensor_maps(t0).dark
    good = ~p.bad_pixels
    err = p.dark_tc[good] - true_tc[good]
    assert abs(float(np.median(p.dark_tc[good])) - float(np.median(true_tc[good]))) < 0.2
    # Read noise 14 DN over 128 frames 2.9 °C apart: ≈ 0.9 DN/°C per pixel unshrunk; the spread
    # of the true slopes is 3 DN/°C, so a fit that ignored the pixels would be off by about that.
    assert float(np.sqrt(np.mean(err**2))) < 1.2
    dark_err = p.dark[good] - sim.sensor_maps(t0).dark[good]
    assert float(np.sqrt(np.mean(dark_err**2))) < 3.0  # the read-noise limit of 128 frames is 1.2


def test_a_warm_frame_gets_the_dark_the_sensor_has_then(profiles) -> None:
    raw, temp, oracle = _warm_face()
    good = ~profiles["tc"].bad_pixels
    rms = {}
    for k, p in profiles.items():
        # What calibrate subtracts from this frame against the sensor's true dark at its temperature.
        rms[k] = float(np.sqrt(np.mean((p.dark_at(temp) - oracle.dark)[good] ** 2)))
    # ~2.9 °C × 10 DN/°C of residual dark without compensation; about the fit's noise with it.
    assert rms["fixed"] > 20.0 and rms["tc"] < 0.15 * rms["fixed"], rms
    fixed_power = calibrate(raw, profiles["fixed"], temp)
    tc_power = calibrate(raw, profiles["tc"], temp)
    np.testing.assert_allclose(
        (fixed_power - tc_power)[good],
        ((profiles["tc"].dark_at(temp) - profiles["fixed"].dark) * profiles["tc"].gain)[good],
        rtol=0,
        atol=0.05 * rms["fixed"],
    )
    # Without a temperature the compensated profile falls back to its reference dark.
    assert np.array_equal(calibrate(raw, profiles["tc"]), calibrate(raw, profiles["tc"], None))


def test_a_profile_without_coefficients_ignores_the_temperature(profiles) -> None:
    raw, temp, _ = _warm_face()
    p = profiles["fixed"]
    assert p.format == 2 and not p.temperature_compensated
    assert np.array_equal(calibrate(raw, p, temp), calibrate(raw, p))
    assert p.dark_at(temp) is p.dark


def test_dark_is_recomputed_per_temperature_step_only(profiles) -> None:
    p = profiles["tc"]
    a = p.dark_at(36.001)
    assert p.dark_at(36.003) is a  # same 0.01 °C step: the kept map
    b = p.dark_at(36.5)
    assert b is not a and not b.flags.writeable
    expected = p.dark + p.dark_tc * np.float32(36.5 - float(p.dark_ref_temp_c))
    np.testing.assert_allclose(b, expected, rtol=0, atol=1e-3)


def test_format_3_round_trips_and_a_changed_coefficient_is_refused(profiles, tmp_path: Path) -> None:
    p = profiles["tc"]
    again = CalibrationProfile.load(p.save(tmp_path / "p"))
    assert again.profile_id == p.profile_id and again.format == 3
    assert np.array_equal(again.dark_tc, p.dark_tc) and again.dark_ref_temp_c == p.dark_ref_temp_c
    z = dict(np.load(tmp_path / "p" / "arrays.npz"))
    z["dark_tc"] = z["dark_tc"] * np.float32(1.01)
    np.savez_compressed(tmp_path / "p" / "arrays.npz", **z)
    with pytest.raises(CalibrationError, match="does not match its id"):
        CalibrationProfile.load(tmp_path / "p")


def test_envelope_covers_the_fitted_span_widened_by_the_excursion(profiles) -> None:
    p = profiles["tc"]
    fit = p.qa["dark_tc"]
    env = p.envelope
    assert fit["span_c"] > 2.5 and fit["frames"] == 128
    assert env.sensor_temp_c - env.max_delta_t_c == pytest.approx(fit["min_c"] - 2.0, abs=1e-2)
    assert env.sensor_temp_c + env.max_delta_t_c == pytest.approx(fit["max_c"] + 2.0, abs=1e-2)


def test_a_narrow_span_is_refused_with_what_to_do(capsys, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match=r"span 0\.\d\d °C.*at least 1 °C.*after warm-up"):
        build_profile([_scene("dark", 32), _scene("flat", 8)], settings=BuildSettings(dark_tc=True))


def test_build_cli_dark_tc_refusal_is_one_line(capsys, tmp_path: Path) -> None:
    caps = tmp_path / "caps"
    assert main(["calibrate", "capture", "--source", "sim?seed=3&scene=dark", "--kind", "dark",
                 "--frames", "16", "--out", str(caps)]) == 0  # fmt: skip
    capsys.readouterr()
    code = main(["calibrate", "build", str(caps), "--out", str(tmp_path / "p"), "--dark-tc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "needs at least 1 °C" in err[0], err


def test_check_and_monitor_follow_the_temperature(profiles) -> None:
    warm = _scene("dark", 16, start=WARM)
    fixed = check_capture_against(profiles["fixed"], warm)
    tc = check_capture_against(profiles["tc"], warm)
    drift = {f.name: f for f in fixed.findings}["dark_drift_dn"]
    assert drift.verdict is Verdict.FAIL and drift.value > 20
    assert abs({f.name: f for f in tc.findings}["dark_drift_dn"].value) < 3
    # The input monitor: a warm-up the profile corrects is not drift.
    sim = ScannerSimulator(seed=SEED, identities=4)
    mon = {k: InputMonitor(p) for k, p in profiles.items()}
    states = {}
    for i in range(0, WARM, 30):
        sim.seek(i)
        f = sim.next_frame()
        states = {k: m.update(f.data, f.header.sensor_temp_c) for k, m in mon.items()}
    assert any("dark level drifted" in r for r in states["fixed"].reasons)
    assert not any("dark level drifted" in r for r in states["tc"].reasons)


def test_the_daemon_conditions_each_frame_at_its_temperature(profiles) -> None:
    sim = ScannerSimulator(seed=SEED, identities=4)
    sim.seek(WARM)
    frame = sim.next_frame()
    p = profiles["tc"]
    q = QueuedFrame(frame, time.monotonic())
    q.prepare(ProcessingContext(profile=p, params=p.conditioning, calibration_id=p.profile_id))
    temp = frame.header.sensor_temp_c
    assert np.array_equal(q.x, calibrate_and_condition(frame.data, p, temp_c=temp))
    assert not np.array_equal(q.x, calibrate_and_condition(frame.data, p))
