"""The simulator through its true calibration: profile, pairs, targets, datasets, `thzedge sim`."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.conditioning import calibrate, calibrate_and_condition, condition_with_roi
from calibration.profile import CalibrationProfile, profile_from_attachment
from calibration.simulated import (
    CalibratedSimulator,
    preview_sheet,
    profile_from_sensor_maps,
    sim_conditioning,
    true_profile,
    write_dataset,
)
from edge.cli import main
from scanner_io.dataset import load_crop, parse_crop_name, read_triplets
from scanner_io.errors import CalibrationError, DataError
from scanner_io.simulator import ScannerSimulator


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


@pytest.fixture(scope="module")
def cal(sim) -> CalibratedSimulator:
    return CalibratedSimulator(sim)


# --- the true profile ---------------------------------------------------------------------------


def test_true_profile_is_the_sensor_maps_plus_conditioning(sim, cal):
    maps = sim.sensor_maps()
    profile = true_profile(sim)
    assert profile == cal.profile == profile_from_sensor_maps(maps)
    np.testing.assert_array_equal(profile.dark, maps.dark)
    np.testing.assert_array_equal(profile.gain, maps.gain)
    np.testing.assert_array_equal(profile.bad_pixels, maps.bad_pixels)
    assert profile.scanner == "sim0" and profile.shape == (128, 128)
    assert profile.meta == {"source": "simulator", "seed": 3, "sensor_temp_c": 35.0}
    assert profile.conditioning == sim_conditioning((128, 128))
    assert 0.002 < profile.bad_pixel_fraction < 0.02
    # Other conditioning, other id; the same sensor in a fresh simulator, the same id.
    from calibration.conditioning import ConditioningParams

    other = profile_from_sensor_maps(maps, ConditioningParams(db_max=50.0))
    assert other.profile_id != profile.profile_id and other.conditioning.db_max == 50.0
    assert true_profile(ScannerSimulator(seed=3, identities=2)).profile_id == profile.profile_id
    assert true_profile(ScannerSimulator(seed=4, identities=2)).profile_id != profile.profile_id


def test_sim_source_exposes_its_sensor_maps_for_calibration():
    from scanner_io.sources import open_source

    with open_source("sim?seed=5&identities=3") as src:
        maps = src.sensor_maps()
        assert maps is not None
        profile = profile_from_sensor_maps(maps)
        frame = src.read(1.0)
    want = true_profile(ScannerSimulator(seed=5, identities=3))
    assert profile.profile_id == want.profile_id
    # The stream's first frame is at the calibration temperature: its truth maps are the profile's.
    np.testing.assert_array_equal(frame.truth.dark, profile.dark)


def test_non_sim_sources_have_no_sensor_maps(tmp_path):
    from scanner_io.sources import open_source

    src = open_source(f"ipc://{tmp_path}/scanner.sock")
    try:
        assert src.sensor_maps() is None
    finally:
        src.close()


def test_profile_from_a_recording_attachment(tmp_path, sim):
    from scanner_io.recording import Recorder
    from scanner_io.sources import open_source

    profile = true_profile(sim)
    rec = tmp_path / "r.mcap"
    with Recorder(rec, calibration=profile, fsync=False) as r:
        r.write(sim.render(0, 0, 1))
    src = open_source(f"replay:{rec}?rate=max")
    try:
        attachment = src.calibration()
    finally:
        src.close()
    assert attachment is not None
    loaded = profile_from_attachment(*attachment)
    assert loaded == profile and loaded.conditioning == profile.conditioning
    np.testing.assert_array_equal(loaded.bad_pixels, profile.bad_pixels)


def test_bad_attachments_are_calibration_errors():
    name = "calibration/abc.tar"
    with pytest.raises(CalibrationError, match="abc.tar"):
        profile_from_attachment(name, b"not a tar at all")
    with pytest.raises(CalibrationError, match="not a calibration profile"):
        profile_from_attachment("calibration/profile.bin", b"\x00\x01")


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
    res_stale = calibrate(f.data, true_profile(s))[ok] - t.power[ok]
    assert abs(res_stale.mean()) > 10.0 * abs(res_truth.mean()) + 5.0


def test_bad_pixels_are_repaired(sim, cal):
    f = sim.render(2, 0, 3)
    profile = cal.profile
    bad = profile.bad_pixels
    assert (f.data[bad] > 15000).sum() > 10  # hot pixels really are in the raw frame
    fixed = calibrate(f.data, profile)
    raw_like = calibrate(
        f.data, CalibrationProfile("sim0", sim.shape, profile.dark, profile.gain, np.zeros(sim.shape, bool))
    )
    err_fixed = np.abs(fixed[bad] - f.truth.power[bad]).mean()
    err_raw = np.abs(raw_like[bad] - f.truth.power[bad]).mean()
    assert err_fixed < 0.1 * err_raw


# --- conditioned pairs and targets --------------------------------------------------------------


def test_dataset_pair_is_calibrate_and_condition_of_the_raw_frames(sim, cal):
    x, target, roi = cal.conditioned_pair(3, 4, 2)
    conc = sim.render(3, 4, 2, concealed=True)
    np.testing.assert_array_equal(x, calibrate_and_condition(conc.data, cal.profile))
    np.testing.assert_array_equal(cal.target(conc), target)
    assert x.shape == target.shape == (64, 64)


def test_frame_target(sim, cal):
    f = sim.render(4, 2, 7, concealed=True)
    t = cal.target(f)
    assert t.shape == (64, 64) and t.dtype == np.float32
    assert t.min() >= 0.0 and t.max() <= 1.0 and t.max() > 0.5
    # A stream frame's target is cut at that frame's own ROI.
    g = sim.next_frame()
    _, roi = condition_with_roi(calibrate(g.data, cal.profile), cal.conditioning)
    want = condition_with_roi(calibrate(g.truth.reference, cal.profile), cal.conditioning, roi)[0]
    np.testing.assert_array_equal(cal.target(g), want)
    with pytest.raises(ValueError, match="truth"):
        cal.target(type(f)(header=f.header, data=f.data))


def test_posture_changes_the_image(cal):
    targets = {p: [cal.conditioned_pair(1, p, n)[1] for n in (1, 2, 3)] for p in range(5)}
    within = np.mean([np.abs(targets[p][0] - targets[p][k]).mean() for p in range(5) for k in (1, 2)])
    between = np.mean(
        [np.abs(targets[p][0] - targets[q][0]).mean() for p in range(5) for q in range(5) if p != q]
    )
    assert between > 1.5 * within


def test_target_is_close_to_the_noise_free_face(cal):
    scores, gaps = [], []
    for ident in range(3):
        for p in range(5):
            x, target, roi = cal.conditioned_pair(ident, p, 1)
            clean = cal.clean_target(ident, p, 1, roi)
            scores.append(ssim(target, clean))
            gaps.append(ssim(x, clean))
    assert min(scores) >= 0.9
    assert np.mean(gaps) < np.mean(scores) - 0.2  # the concealed input really is degraded


def test_other_frame_shapes():
    s = ScannerSimulator(seed=0, identities=2, shape=(96, 160))
    c = CalibratedSimulator(s)
    f = s.render(1, 1, 1)
    assert calibrate_and_condition(f.data, c.profile).shape == (64, 64)
    _, roi = condition_with_roi(calibrate(f.data, c.profile), c.conditioning)
    assert roi[2] == c.conditioning.crop_size == 66 <= 96  # the 88-pixel crop scaled by 96/128


def test_preview_sheet():
    sheet = preview_sheet(ScannerSimulator(seed=0, identities=2), identities=2)
    assert sheet.dtype == np.uint8 and sheet.shape[0] == 14 + 2 * 64 and sheet.shape[1] >= 15 * 64


# --- datasets -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("ds")
    summary = write_dataset(out, identities=6, samples=2, seed=11, test_identities=2)
    return out, summary


def test_summary_and_layout(dataset):
    out, summary = dataset
    assert summary.images == 6 * 5 * 2 * 2
    assert len(list((out / "images").glob("*.png"))) == summary.images
    assert summary.test_identities == ["id005", "id006"]
    assert summary.train_identities == ["id001", "id002", "id003", "id004"]
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["seed"] == 11 and manifest["profile_id"] == summary.profile_id
    assert CalibrationProfile.load(out / "calibration").profile_id == summary.profile_id


def test_triplets_parse_back_and_are_identity_disjoint(dataset):
    out, summary = dataset
    train = read_triplets(out / "train_val.csv")
    test = read_triplets(out / "test.csv")
    assert len(train) == summary.train_triplets == 4 * 5 * 2
    assert len(test) == summary.test_triplets == 2 * 5 * 2
    ids = {}
    for split, triplets in (("train", train), ("test", test)):
        seen = set()
        for t in triplets:
            a, p, n = (parse_crop_name(x) for x in (t.anchor, t.positive, t.negative))
            assert a.concealed and not p.concealed and n.concealed
            assert (a.identity, a.posture, a.sample) == (p.identity, p.posture, p.sample)
            assert n.identity != a.identity and n.posture == a.posture
            assert t.anchor.is_file() and t.anchor.parent == out / "images"
            seen |= {a.identity, n.identity}
        ids[split] = seen
    assert ids["train"].isdisjoint(ids["test"])
    # Paths in the CSV are relative to the dataset directory.
    first = (out / "test.csv").read_text().splitlines()[1]
    assert first.startswith("images/") and ",/" not in first


def test_crops_are_the_shared_conditioning_of_simulated_frames(dataset):
    out, _ = dataset
    sim = ScannerSimulator(seed=11, identities=6)
    cal = CalibratedSimulator(sim)
    x, target, _ = cal.conditioned_pair(4, 3, 2)
    frame = sim.render(4, 3, 2, concealed=True)
    np.testing.assert_array_equal(load_crop(out / "images" / "id005_b4b_2.png"), x)
    np.testing.assert_array_equal(
        load_crop(out / "images" / "id005_b4b_2.png"), calibrate_and_condition(frame.data, cal.profile)
    )
    np.testing.assert_array_equal(load_crop(out / "images" / "id005_n4n_2.png"), target)


def test_sample_split_keeps_identities(tmp_path):
    s = write_dataset(tmp_path, identities=3, samples=4, seed=1, split="sample")
    assert s.test_identities == s.train_identities
    test = read_triplets(tmp_path / "test.csv")
    assert {parse_crop_name(t.anchor).sample for t in test} == {4}
    train = read_triplets(tmp_path / "train_val.csv")
    assert {parse_crop_name(t.anchor).sample for t in train} == {1, 2, 3}


def test_too_few_identities_for_a_split(tmp_path):
    with pytest.raises(DataError, match="at least 2"):
        write_dataset(tmp_path, identities=3, samples=1, test_identities=1)


# --- thzedge sim --------------------------------------------------------------------------------


def test_cli_sim_dataset_and_preview(tmp_path, capsys):
    out = tmp_path / "ds"
    rc = main(
        ["--json", "sim", "dataset", "--out", str(out), "--identities", "4", "--samples", "1", "--seed", "2"]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 40 and summary["test_identities"] == ["id003", "id004"]
    assert len(read_triplets(out / "test.csv")) == summary["test_triplets"] == 10
    # A non-empty output directory is refused, nothing is overwritten.
    assert main(["sim", "dataset", "--out", str(out), "--identities", "4"]) == 1
    assert "not empty" in capsys.readouterr().err
    sheet = tmp_path / "sheet.png"
    assert main(["sim", "preview", "--out", str(sheet), "--identities", "2"]) == 0
    img = cv2.imread(str(sheet), cv2.IMREAD_GRAYSCALE)
    assert img is not None and img.shape[0] == 14 + 2 * 64
    capsys.readouterr()
    assert main(["sim", "preview", "--out", str(tmp_path / "sheet.jpg")]) == 1
    assert "must end in .png" in capsys.readouterr().err and not (tmp_path / "sheet.jpg").exists()


def test_cli_sim_profile_is_the_true_profile(tmp_path, capsys):
    assert main(["--json", "sim", "profile", "--out", str(tmp_path / "p"), "--seed", "4"]) == 0
    info = json.loads(capsys.readouterr().out)
    loaded = CalibrationProfile.load(tmp_path / "p")
    want = true_profile(ScannerSimulator(seed=4, identities=3))
    assert loaded.profile_id == info["profile_id"] == want.profile_id
    assert loaded.scanner == "sim0"
