"""The THz scanner simulator: determinism, identities, postures, sensor truth, targets."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from calibration.conditioning import calibrate, calibrate_and_condition, condition_with_roi
from calibration.profile import CalibrationProfile
from scanner_io.errors import ConfigError
from scanner_io.frame import POSTURES
from scanner_io.simulator import ScannerSimulator, SimTruth, identity_name, preview_sheet


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM, data range 1, 11×11 gaussian σ 1.5 (valid region)."""
    c1, c2 = 0.01**2, 0.03**2
    a, b = a.astype(np.float64), b.astype(np.float64)

    def g(x):
        return cv2.GaussianBlur(x, (11, 11), 1.5)

    ma, mb = g(a), g(b)
    saa, sbb, sab = g(a * a) - ma * ma, g(b * b) - mb * mb, g(a * b) - ma * mb
    m = ((2 * ma * mb + c1) * (2 * sab + c2)) / ((ma * ma + mb * mb + c1) * (saa + sbb + c2))
    return float(m[5:-5, 5:-5].mean())


@pytest.fixture(scope="module")
def sim() -> ScannerSimulator:
    return ScannerSimulator(seed=3, identities=24, start_time_ns=1_700_000_000_000_000_000)


def test_same_seed_same_frames_in_any_call_order():
    a = ScannerSimulator(seed=5, identities=4, start_time_ns=0)
    b = ScannerSimulator(seed=5, identities=4, start_time_ns=0)
    b.render(1, 3, 9)  # extra work first must not shift anything
    fa, fb = a.render(2, 1, 4), b.render(2, 1, 4)
    np.testing.assert_array_equal(fa.data, fb.data)
    np.testing.assert_array_equal(fa.truth.target, fb.truth.target)
    sa = [a.next_frame() for _ in range(5)]
    sb = ScannerSimulator(seed=5, identities=4, start_time_ns=0)
    for f in sa:
        g = sb.next_frame()
        np.testing.assert_array_equal(f.data, g.data)
        # Header seq counts every frame made (a's render took one); the stream itself is unchanged.
        assert f.seq == g.seq + 1
        assert f.header.sensor_temp_c == g.header.sensor_temp_c
        assert (f.truth.identity, f.truth.posture) == (g.truth.identity, g.truth.posture)
    other = ScannerSimulator(seed=6, identities=4).render(2, 1, 4)
    assert not np.array_equal(fa.data, other.data)


def test_identity_does_not_depend_on_population_size():
    small = ScannerSimulator(seed=2, identities=3)
    large = ScannerSimulator(seed=2, identities=50)
    assert small.identity_params(2) == large.identity_params(2)
    np.testing.assert_array_equal(small.render(2, 0, 1).data, large.render(2, 0, 1).data)


def test_frame_header_and_truth(sim):
    f = sim.render(4, 2, 7, concealed=True)
    assert f.data.dtype == np.uint16 and f.data.shape == (128, 128)
    assert f.header.shape == (128, 128) and f.header.dtype == "uint16"
    assert f.header.scanner == "sim0" and f.header.sensor_temp_c == pytest.approx(35.0)
    t = f.truth
    assert isinstance(t, SimTruth)
    assert (t.identity, t.posture, t.sample, t.concealed) == (4, 2, 7, True)
    assert t.identity_name == identity_name(4) == "id005" and t.posture_name == POSTURES[2]
    assert t.target.shape == (64, 64) and t.target.dtype == np.float32
    assert t.target.min() >= 0.0 and t.target.max() <= 1.0 and t.target.max() > 0.5


def test_stream_seq_time_and_temperature_drift():
    s = ScannerSimulator(seed=1, identities=3, start_time_ns=1000, nominal_fps=100.0)
    frames = [s.next_frame() for _ in range(12)]
    assert [f.seq for f in frames] == list(range(12))
    assert [f.header.t_capture_ns for f in frames] == [1000 + i * 10_000_000 for i in range(12)]
    assert all(f.truth.concealed for f in frames)
    assert s.temperature_at(3000) > s.temperature_at(0) + 1.0  # warms up
    assert ScannerSimulator(drift=False).temperature_at(3000) == pytest.approx(35.0)


def test_distinct_identities(sim):
    heads = [sim.identity_params(i) for i in range(24)]
    assert len(set(heads)) == 24
    # Without pose jitter two captures of one person have the same scene; two people never do.
    still = sim.with_config(jitter_angle_deg=0.0, jitter_roll_deg=0.0, jitter_shift_px=0.0, jitter_scale=0.0)
    clean = [np.log1p(still.render(i, 0, 1, concealed=False).truth.clean) for i in range(24)]
    np.testing.assert_array_equal(np.log1p(still.render(0, 0, 2, concealed=False).truth.clean), clean[0])
    diffs = [np.abs(clean[i] - clean[j]).mean() for i in range(24) for j in range(i + 1, 24)]
    assert min(diffs) > 0.1 * np.mean(diffs) > 0.0


def test_posture_changes_the_image(sim):
    targets = {p: [sim.conditioned_pair(1, p, n)[1] for n in (1, 2, 3)] for p in range(5)}
    within = np.mean([np.abs(targets[p][0] - targets[p][k]).mean() for p in range(5) for k in (1, 2)])
    between = np.mean(
        [np.abs(targets[p][0] - targets[q][0]).mean() for p in range(5) for q in range(5) if p != q]
    )
    assert between > 1.5 * within


def test_truth_maps_are_what_the_sensor_applied():
    s = ScannerSimulator(seed=8, identities=2)
    for _ in range(3):
        s.next_frame()
    s.seek(2500)  # well into the warm-up: dark and gain have drifted
    f = s.next_frame()
    t = f.truth
    assert f.header.sensor_temp_c > 36.0
    # The stale (reference-temperature) profile leaves an offset; the frame's truth maps do not.
    per_frame = CalibrationProfile("sim0", s.shape, t.dark, t.gain, t.bad_pixels)
    ok = ~t.bad_pixels & (f.data < 65000)
    res_truth = calibrate(f.data, per_frame)[ok] - t.power[ok]
    read = s.config.read_noise * float(np.median(t.gain))
    assert abs(res_truth.mean()) < 0.2 * read
    assert res_truth.std() < 1.3 * read
    res_stale = calibrate(f.data, s.true_profile)[ok] - t.power[ok]
    assert abs(res_stale.mean()) > 10.0 * abs(res_truth.mean()) + 5.0


def test_true_profile_matches_render_truth(sim):
    f = sim.render(0, 0, 1)
    np.testing.assert_array_equal(f.truth.dark, sim.true_profile.dark)
    np.testing.assert_allclose(f.truth.gain, sim.true_profile.gain, rtol=1e-6)
    np.testing.assert_array_equal(f.truth.bad_pixels, sim.true_profile.bad_pixels)
    assert 0.002 < sim.true_profile.bad_pixel_fraction < 0.02


def test_bad_pixels_are_repaired(sim):
    f = sim.render(2, 0, 3)
    bad = sim.true_profile.bad_pixels
    assert (f.data[bad] > 15000).sum() > 10  # hot pixels really are in the raw frame
    fixed = calibrate(f.data, sim.true_profile)
    raw_like = calibrate(f.data, CalibrationProfile(
        "sim0", sim.shape, sim.true_profile.dark, sim.true_profile.gain, np.zeros(sim.shape, bool)
    ))
    err_fixed = np.abs(fixed[bad] - f.truth.power[bad]).mean()
    err_raw = np.abs(raw_like[bad] - f.truth.power[bad]).mean()
    assert err_fixed < 0.1 * err_raw


def test_dataset_pair_is_calibrate_and_condition_of_the_raw_frames(sim):
    x, target, roi = sim.conditioned_pair(3, 4, 2)
    conc = sim.render(3, 4, 2, concealed=True)
    np.testing.assert_array_equal(x, calibrate_and_condition(conc.data, sim.true_profile))
    np.testing.assert_array_equal(conc.truth.target, target)
    assert x.shape == target.shape == (64, 64)


def test_target_is_close_to_the_noise_free_face(sim):
    scores, gaps = [], []
    for ident in range(3):
        for p in range(5):
            x, target, roi = sim.conditioned_pair(ident, p, 1)
            clean = sim.clean_target(ident, p, 1, roi)
            scores.append(ssim(target, clean))
            gaps.append(ssim(x, clean))
    assert min(scores) >= 0.9
    assert np.mean(gaps) < np.mean(scores) - 0.2  # the concealed input really is degraded


def test_concealment_attenuates_and_speckle_is_sparse(sim):
    conc = sim.render(5, 0, 4, concealed=True).truth
    bare = sim.render(5, 0, 4, concealed=False).truth
    face = bare.clean > 0.05 * bare.clean.max()
    assert conc.clean[face].sum() < 0.8 * bare.clean[face].sum()
    # Specular: a small part of the head returns most of the power.
    head = bare.clean > 1.0
    top = np.sort(bare.clean[head])[::-1]
    assert top[: len(top) // 10].sum() > 0.5 * top.sum()


def test_claimed_identity_with_impostors():
    s = ScannerSimulator(seed=4, identities=5, claim_identity=True, impostor_rate=0.5)
    frames = [s.next_frame() for _ in range(30)]
    claims = [(f.header.claimed_identity, f.truth.identity_name) for f in frames]
    assert all(c is not None for c, _ in claims)
    genuine = sum(c == t for c, t in claims)
    assert 0 < genuine < 30


def test_other_frame_shapes():
    s = ScannerSimulator(seed=0, identities=2, shape=(96, 160))
    f = s.render(1, 1, 1)
    assert f.data.shape == (96, 160)
    assert calibrate_and_condition(f.data, s.true_profile).shape == (64, 64)
    _, roi = condition_with_roi(calibrate(f.data, s.true_profile), s.conditioning)
    assert roi[2] == s.conditioning.crop_size <= 96


def test_invalid_arguments():
    s = ScannerSimulator(seed=0, identities=2)
    with pytest.raises(ValueError):
        s.render(2, 0, 1)
    with pytest.raises(ValueError):
        s.render(0, 5, 1)
    with pytest.raises(ConfigError, match="identities"):
        ScannerSimulator(identities=0)
    with pytest.raises(ConfigError, match="impostor_rate"):
        ScannerSimulator(impostor_rate=2.0)


def test_preview_sheet():
    sheet = preview_sheet(ScannerSimulator(seed=0, identities=2), identities=2)
    assert sheet.dtype == np.uint8 and sheet.shape[0] == 14 + 2 * 64 and sheet.shape[1] >= 15 * 64


def test_speckle_has_unit_mean_and_l_look_contrast():
    s = ScannerSimulator(seed=9, identities=2)
    ratios = []
    for n in range(1, 7):
        t = s.render(0, 0, n, concealed=False).truth
        m = t.clean > 100.0
        ratios.append(t.power[m] / t.clean[m])
    r = np.concatenate(ratios)
    looks = s.config.looks
    assert r.mean() == pytest.approx(1.0, abs=0.08)
    assert r.std() == pytest.approx(1.0 / np.sqrt(looks), rel=0.2)
