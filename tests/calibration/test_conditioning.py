"""calibrate / condition / calibrate_and_condition and the calibration profile format."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.conditioning import (
    ConditioningParams,
    calibrate,
    calibrate_and_condition,
    condition,
    condition_with_roi,
    find_roi,
)
from calibration.profile import CalibrationProfile
from scanner_io.errors import CalibrationError, DataError

SHAPE = (128, 128)


def _sensor(seed: int = 0, bad_fraction: float = 0.01):
    rng = np.random.default_rng(seed)
    dark = rng.normal(1500.0, 100.0, SHAPE).astype(np.float32)
    resp = rng.uniform(0.8, 1.2, SHAPE).astype(np.float32)
    bad = rng.random(SHAPE) < bad_fraction
    return dark, resp, bad


def _blob(cx: float, cy: float, peak: float = 20000.0, sigma: float = 12.0) -> np.ndarray:
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    return (peak * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))).astype(np.float32)


def test_calibrate_recovers_power_and_repairs_bad_pixels():
    dark, resp, bad = _sensor()
    profile = CalibrationProfile("s0", SHAPE, dark, 1.0 / resp, bad)
    power = _blob(60, 70) + 50.0
    raw = dark + power * resp
    raw[bad] = 60000.0  # hot / stuck pixels
    raw = np.rint(raw).astype(np.uint16)
    out = calibrate(raw, profile)
    assert out.dtype == np.float32 and out.shape == SHAPE
    good = ~bad
    # Only 16-bit rounding remains on good pixels.
    assert np.abs(out[good] - power[good]).max() < 1.5
    # Bad pixels take a neighbourhood median of a smooth image: close to the truth, no outliers.
    assert np.abs(out[bad] - power[bad]).max() < 0.1 * power.max()
    assert out.max() < 20100.0


def test_bad_pixel_takes_median_of_valid_neighbours_exactly():
    raw = np.arange(25 * 25, dtype=np.float32).reshape(25, 25)
    bad = np.zeros((25, 25), bool)
    bad[10, 10] = bad[10, 11] = True
    raw[10, 10] = raw[10, 11] = 1e6
    profile = CalibrationProfile(
        "s0", (25, 25), np.zeros((25, 25), np.float32), np.ones((25, 25), np.float32), bad
    )
    out = calibrate(raw, profile)
    window = np.arange(25 * 25, dtype=np.float32).reshape(25, 25)[8:13, 8:13].copy()
    valid = ~bad[8:13, 8:13]
    assert out[10, 10] == pytest.approx(float(np.median(window[valid])))
    assert out[9, 9] == raw[9, 9]


def test_isolated_bad_cluster_falls_back_to_frame_median():
    raw = np.full((20, 20), 7.0, np.float32)
    bad = np.zeros((20, 20), bool)
    bad[5:12, 5:12] = True  # the centre pixel has no valid pixel within ±2
    raw[bad] = 1000.0
    profile = CalibrationProfile("s0", (20, 20), np.zeros((20, 20)), np.ones((20, 20)), bad)
    out = calibrate(raw, profile)
    assert np.isfinite(out).all()
    assert out[8, 8] == pytest.approx(float(np.median(raw)))
    assert out[5, 5] == pytest.approx(7.0)


def test_condition_output_contract():
    params = ConditioningParams()
    out = condition(_blob(64, 60) + 5.0, params)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Quantised to the research PNGs' 1/255 steps.
    assert np.array_equal(np.rint(out * 255.0) / np.float32(255.0), out)
    assert out.max() > 0.9 and out.min() == 0.0


def test_db_range_maps_linearly():
    params = ConditioningParams(db_min=10.0, db_max=50.0, quantize=False)
    for db, want in ((0.0, 0.0), (10.0, 0.0), (30.0, 0.5), (50.0, 1.0), (70.0, 1.0)):
        power = np.full((128, 128), 10 ** (db / 10.0), np.float32)
        assert condition(power, params)[32, 32] == pytest.approx(want, abs=1e-5)


def test_roi_centres_on_the_head_and_clamps_to_frame():
    params = ConditioningParams(crop_size=88)
    x, y, w, h = find_roi(_blob(70, 58), params)
    assert (w, h) == (88, 88)
    assert abs(x + w / 2 - 70) <= 2 and abs(y + h / 2 - 58) <= 2
    x, y, w, h = find_roi(_blob(120, 5), params)
    assert (x, y) == (128 - 88, 0)
    # Nothing above threshold: centre crop.
    assert find_roi(np.zeros(SHAPE, np.float32), params) == (20, 20, 88, 88)


def test_roi_ignores_isolated_hot_pixels():
    power = _blob(40, 40)
    power[120, 120] = 1e7  # one stray hot pixel after an imperfect calibration
    x, y, w, h = find_roi(power, ConditioningParams(crop_size=64))
    assert abs(x + w / 2 - 40) <= 6 and abs(y + h / 2 - 40) <= 6


def test_fixed_roi_and_roi_override():
    params = ConditioningParams(roi=(10, 20, 50, 40))
    _, roi = condition_with_roi(_blob(64, 64), params)
    assert roi == (10, 20, 50, 40)
    _, roi = condition_with_roi(_blob(64, 64), ConditioningParams(), roi=(0, 0, 30, 30))
    assert roi == (0, 0, 30, 30)


def test_small_and_non_square_frames():
    out = calibrate_and_condition(np.full((40, 70), 500, np.uint16), None)
    assert out.shape == (64, 64)
    with pytest.raises(DataError):
        calibrate_and_condition(np.zeros((10,), np.uint16), None)


def test_float_frames_with_nan_are_finite():
    raw = _blob(64, 64)
    raw[3, 3] = np.nan
    out = calibrate_and_condition(raw, None)
    assert np.isfinite(out).all()


def test_shape_mismatch_is_a_calibration_error():
    profile = CalibrationProfile.identity("s0", (64, 64))
    with pytest.raises(CalibrationError, match="does not match"):
        calibrate(np.zeros(SHAPE, np.uint16), profile)


def test_identity_profile_changes_nothing():
    raw = np.random.default_rng(1).integers(0, 4000, SHAPE).astype(np.uint16)
    profile = CalibrationProfile.identity("s0", SHAPE)
    np.testing.assert_array_equal(calibrate(raw, profile), raw.astype(np.float32))
    np.testing.assert_array_equal(calibrate_and_condition(raw, profile), calibrate_and_condition(raw, None))


def test_params_default_to_the_profile_conditioning():
    raw = (_blob(64, 64) + 2000).astype(np.uint16)
    params = ConditioningParams(db_min=20.0, db_max=40.0)
    profile = CalibrationProfile.identity("s0", SHAPE, conditioning=params)
    np.testing.assert_array_equal(
        calibrate_and_condition(raw, profile), calibrate_and_condition(raw, None, params)
    )


@pytest.mark.parametrize(
    "kwargs", [{"db_min": 40.0, "db_max": 10.0}, {"crop_size": 0}, {"roi": (0, 0, 0, 5)}, {"roi_block": 0}]
)
def test_invalid_params_are_refused(kwargs):
    with pytest.raises(CalibrationError):
        ConditioningParams(**kwargs)


def test_params_dict_round_trip_and_unknown_key():
    p = ConditioningParams(roi=(1, 2, 3, 4), db_min=5.0)
    assert ConditioningParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(CalibrationError, match="db_mni"):
        ConditioningParams.from_dict({"db_mni": 3})


def test_profile_save_load_round_trip(tmp_path):
    dark, resp, bad = _sensor()
    profile = CalibrationProfile("scanner7", SHAPE, dark, 1.0 / resp, bad, meta={"sensor_temp_c": 35.0})
    profile.save(tmp_path / "p")
    loaded = CalibrationProfile.load(tmp_path / "p")
    assert loaded.profile_id == profile.profile_id
    assert loaded == profile
    np.testing.assert_array_equal(loaded.bad_pixels, bad)
    assert loaded.meta == {"sensor_temp_c": 35.0}
    assert CalibrationProfile.load(tmp_path / "p" / "profile.json").profile_id == profile.profile_id


def test_profile_id_is_content_addressed():
    dark, resp, bad = _sensor()
    a = CalibrationProfile("s0", SHAPE, dark, 1.0 / resp, bad)
    b = CalibrationProfile("s0", SHAPE, dark.copy(), 1.0 / resp, bad.copy())
    assert a.profile_id == b.profile_id and len(a.profile_id) == 16
    dark2 = dark.copy()
    dark2[0, 0] += 1.0
    assert CalibrationProfile("s0", SHAPE, dark2, 1.0 / resp, bad).profile_id != a.profile_id
    assert a.with_conditioning(ConditioningParams(db_max=60.0)).profile_id != a.profile_id
    assert CalibrationProfile("s1", SHAPE, dark, 1.0 / resp, bad).profile_id != a.profile_id


def test_tampered_profile_is_refused(tmp_path):
    dark, resp, bad = _sensor()
    CalibrationProfile("s0", SHAPE, dark, 1.0 / resp, bad).save(tmp_path)
    doc = json.loads((tmp_path / "profile.json").read_text())
    doc["scanner"] = "other"
    (tmp_path / "profile.json").write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match="does not match its id"):
        CalibrationProfile.load(tmp_path)


def test_missing_or_broken_profile_is_refused(tmp_path):
    with pytest.raises(CalibrationError, match="not a calibration profile"):
        CalibrationProfile.load(tmp_path)
    CalibrationProfile.identity("s0", (8, 8)).save(tmp_path)
    (tmp_path / "arrays.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError):
        CalibrationProfile.load(tmp_path)


def test_profile_rejects_bad_arrays():
    with pytest.raises(CalibrationError, match="shape"):
        CalibrationProfile("s0", (8, 8), np.zeros((8, 9)), np.ones((8, 8)), np.zeros((8, 8), bool))
    gain = np.ones((8, 8))
    gain[0, 0] = np.nan
    with pytest.raises(CalibrationError, match="NaN"):
        CalibrationProfile("s0", (8, 8), np.zeros((8, 8)), gain, np.zeros((8, 8), bool))


def test_profile_arrays_are_read_only():
    profile = CalibrationProfile.identity("s0", (8, 8))
    with pytest.raises(ValueError):
        profile.dark[0, 0] = 1.0


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(2, 160),
    w=st.integers(2, 160),
    dtype=st.sampled_from(["uint8", "uint16", "float32"]),
    seed=st.integers(0, 2**32 - 1),
    crop=st.integers(2, 120),
)
def test_any_frame_gives_a_valid_model_input(h, w, dtype, seed, crop):
    rng = np.random.default_rng(seed)
    if dtype == "float32":
        raw = rng.choice([0.0, -5.0, 1e-30, 1e30, np.nan, np.inf, 3e4], size=(h, w)).astype(np.float32)
    else:
        raw = rng.integers(0, np.iinfo(dtype).max, (h, w), endpoint=True).astype(dtype)
    out = calibrate_and_condition(raw, None, ConditioningParams(crop_size=crop))
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
