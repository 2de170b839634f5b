"""Research-format datasets: crop names, crops, triplet CSVs, the writer and `thzedge sim`."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from scanner_io.dataset import (
    CropName,
    crop_name,
    load_crop,
    parse_crop_name,
    read_triplets,
    save_crop,
)
from scanner_io.errors import DataError


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
        "id1_b1n_1.png",
        "id1_b6b_1.png",
        "id1_b0b_1.png",
        "id1_b1b.png",
        "b1b_1.png",
        "id1_b1b_1.jpg",
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
    with pytest.raises(DataError, match=r"line 2: negative file missing\.png not found under"):
        read_triplets(_write(tmp_path / "miss.csv", "anchor,positive,negative\na.png,b.png,missing.png\n"))
    with pytest.raises(DataError, match="line 1: header"):
        read_triplets(_write(tmp_path / "hdr.csv", "x,y,z\na.png,b.png,c.png\n"))
    with pytest.raises(DataError, match="no triplets"):
        read_triplets(_write(tmp_path / "empty.csv", "anchor,positive,negative\n"))
    with pytest.raises(DataError, match="does not exist"):
        read_triplets(tmp_path / "nope.csv")
    # Unchecked reading accepts missing files (for listing a dataset without its images).
    assert len(read_triplets(tmp_path / "miss.csv", check_files=False)) == 1


def test_read_triplets_resolves_under_data_dir_then_next_to_the_csv(tmp_path, monkeypatch):
    """Relative names: the image folder first, then the CSV's folder; a relative CSV path works too."""
    img = np.zeros((64, 64), np.float32)
    (tmp_path / "images").mkdir()
    (tmp_path / "csvs").mkdir()
    save_crop(tmp_path / "images" / "a.png", img)
    save_crop(tmp_path / "images" / "b.png", img)
    save_crop(tmp_path / "csvs" / "c.png", img)
    _write(tmp_path / "csvs" / "t.csv", "anchor,positive,negative\na.png,b.png,c.png\n")
    monkeypatch.chdir(tmp_path)
    (t,) = read_triplets(Path("csvs/t.csv"), data_dir=Path("images"))
    assert (t.anchor, t.positive, t.negative) == (
        Path("images/a.png"),
        Path("images/b.png"),
        Path("csvs/c.png"),
    )
    _write(tmp_path / "csvs" / "m.csv", "anchor,positive,negative\nx.png,b.png,y.png\n")
    with pytest.raises(
        DataError, match=r"line 2: anchor file x\.png not found under images or csvs \(1 more missing\)"
    ):
        read_triplets(Path("csvs/m.csv"), data_dir=Path("images"))


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
