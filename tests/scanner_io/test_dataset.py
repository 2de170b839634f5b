"""Research-format datasets: crop names, crops, triplet CSVs, the writer and `thzedge sim`."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from calibration.conditioning import calibrate_and_condition
from calibration.profile import CalibrationProfile
from edge.cli import main
from scanner_io.dataset import (
    CropName,
    crop_name,
    load_crop,
    parse_crop_name,
    read_triplets,
    save_crop,
    write_dataset,
)
from scanner_io.errors import DataError
from scanner_io.simulator import ScannerSimulator


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("ds")
    summary = write_dataset(out, identities=6, samples=2, seed=11, test_identities=2)
    return out, summary


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("id1_b1b_1.png", CropName("id1", 0, True, 1)),
        ("id001_n5n_12.png", CropName("id001", 4, False, 12)),
        ("some/dir/person_7_b3b_2.png", CropName("person_7", 2, True, 2)),
    ],
)
def test_parse_crop_name(name, want):
    got = parse_crop_name(name)
    assert got == want
    assert got.filename == Path(name).name


@pytest.mark.parametrize(
    "name",
    [
        "id1_b1n_1.png", "id1_b6b_1.png", "id1_b0b_1.png", "id1_b1b.png", "b1b_1.png", "id1_b1b_1.jpg",
        "id1_b1b_1.png\n",
    ],
)
def test_bad_crop_names_are_data_errors(name):
    with pytest.raises(DataError, match="crop file name"):
        parse_crop_name(name)


def test_crop_name_round_trip():
    for p in range(5):
        for concealed in (True, False):
            assert parse_crop_name(crop_name("idX", p, concealed, 3)) == CropName("idX", p, concealed, 3)
    with pytest.raises(ValueError):
        crop_name("id1", 5, True, 1)
    with pytest.raises(ValueError):
        crop_name("a/b", 0, True, 1)


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
    x, target, _ = sim.conditioned_pair(4, 3, 2)
    frame = sim.render(4, 3, 2, concealed=True)
    np.testing.assert_array_equal(load_crop(out / "images" / "id005_b4b_2.png"), x)
    np.testing.assert_array_equal(load_crop(out / "images" / "id005_b4b_2.png"),
                                  calibrate_and_condition(frame.data, sim.true_profile))
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


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_triplets_errors_name_the_row_and_file(tmp_path):
    img = np.zeros((64, 64), np.float32)
    for name in ("a.png", "b.png", "c.png"):
        save_crop(tmp_path / name, img)
    good = "anchor,positive,negative\na.png,b.png,c.png\n"
    assert len(read_triplets(_write(tmp_path / "ok.csv", good))) == 1
    with pytest.raises(DataError, match=r"bad\.csv line 3: expected 3 paths"):
        read_triplets(_write(tmp_path / "bad.csv", good + "a.png,b.png\n"))
    with pytest.raises(DataError, match=r"line 2: negative file .*missing\.png does not exist"):
        read_triplets(_write(tmp_path / "miss.csv", "anchor,positive,negative\na.png,b.png,missing.png\n"))
    with pytest.raises(DataError, match="line 1: header"):
        read_triplets(_write(tmp_path / "hdr.csv", "x,y,z\na.png,b.png,c.png\n"))
    with pytest.raises(DataError, match="no triplets"):
        read_triplets(_write(tmp_path / "empty.csv", "anchor,positive,negative\n"))
    with pytest.raises(DataError, match="does not exist"):
        read_triplets(tmp_path / "nope.csv")
    # Unchecked reading accepts missing files (for listing a dataset without its images).
    assert len(read_triplets(tmp_path / "miss.csv", check_files=False)) == 1


def test_load_crop_formats(tmp_path):
    gray = (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    np.testing.assert_array_equal(load_crop(tmp_path / "g.png"), gray.astype(np.float32) / np.float32(255))
    cv2.imwrite(str(tmp_path / "rgb.png"), np.dstack([gray] * 3))
    np.testing.assert_allclose(load_crop(tmp_path / "rgb.png"), gray / 255.0, atol=1 / 255)
    cv2.imwrite(str(tmp_path / "big.png"), cv2.resize(gray, (128, 128)))
    big = load_crop(tmp_path / "big.png")
    assert big.shape == (64, 64) and big.dtype == np.float32
    cv2.imwrite(str(tmp_path / "w16.png"), np.full((64, 64), 65535, np.uint16))
    assert load_crop(tmp_path / "w16.png").min() == 1.0
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="not a readable image"):
        load_crop(tmp_path / "junk.png")
    with pytest.raises(DataError, match="does not exist"):
        load_crop(tmp_path / "none.png")


def test_cli_sim_dataset_and_preview(tmp_path, capsys):
    out = tmp_path / "ds"
    rc = main(["sim", "dataset", "--out", str(out), "--identities", "4", "--samples", "1", "--seed", "2",
               "--json"])
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


def test_cli_sim_profile_is_the_true_profile(tmp_path, capsys):
    assert main(["sim", "profile", "--out", str(tmp_path / "p"), "--seed", "4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    loaded = CalibrationProfile.load(tmp_path / "p")
    want = ScannerSimulator(seed=4, identities=3).true_profile
    assert loaded.profile_id == info["profile_id"] == want.profile_id
    assert loaded.scanner == "sim0"


@settings(max_examples=100, deadline=None)
@given(
    identity=st.text(st.characters(blacklist_characters="/\\\x00", blacklist_categories=("Cs",)), min_size=1),
    posture=st.integers(0, 4),
    concealed=st.booleans(),
    sample=st.integers(0, 10**6),
)
@example(identity="a\nb_c", posture=0, concealed=True, sample=1)
def test_crop_names_round_trip_for_any_identity(identity, posture, concealed, sample):
    name = crop_name(identity, posture, concealed, sample)
    assert parse_crop_name(name) == CropName(identity, posture, concealed, sample)
