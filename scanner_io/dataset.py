"""Datasets in the research format: 64×64 8-bit PNG crops plus triplet CSV files.

Layout (paths in the CSVs are relative to the dataset directory):

    DIR/images/<id>_b<k>b_<n>.png   concealed crop, posture k = 1..5, sample n = 1..K
    DIR/images/<id>_n<k>n_<n>.png   unconcealed crop of the same pose (the reconstruction target)
    DIR/train_val.csv, DIR/test.csv  anchor,positive,negative
    DIR/calibration/                 the simulated sensor's true calibration profile
    DIR/dataset.json                 seed, counts, split, profile id, conditioning

This module reads and writes the format (names, crops, triplet CSVs). Simulated datasets are
written by calibration.simulated.write_dataset, which conditions every crop with the daemon's own
calibrate-and-condition function and the sensor's true profile (scanner_io never conditions).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from scanner_io.errors import DataError
from scanner_io.frame import POSTURES

__all__ = [
    "CropName",
    "Triplet",
    "crop_name",
    "parse_crop_name",
    "load_crop",
    "save_crop",
    "read_triplets",
    "write_triplets",
    "CROP_SIZE",
]

CROP_SIZE = 64
# <identity>_<b|n><k><b|n>_<sample>.png; the identity may itself contain underscores (the
# research code takes the third-from-last "_" field as the identity).
_NAME_RE = re.compile(
    r"^(?P<identity>.+)_(?P<code>([bn])([1-9])\3)_(?P<sample>\d+)\.png\Z", re.IGNORECASE | re.DOTALL
)
_CSV_COLUMNS = ("anchor", "positive", "negative")


@dataclass(frozen=True)
class CropName:
    """What a research crop file name says: identity, posture (0-based), concealed, sample."""

    identity: str
    posture: int
    concealed: bool
    sample: int

    @property
    def filename(self) -> str:
        return crop_name(self.identity, self.posture, self.concealed, self.sample)


@dataclass(frozen=True)
class Triplet:
    """One verification triplet of resolved paths (see `read_triplets`)."""

    anchor: Path
    positive: Path
    negative: Path


def crop_name(identity: str, posture: int, concealed: bool, sample: int) -> str:
    """Return the research file name, e.g. crop_name('id001', 0, True, 1) == 'id001_b1b_1.png'."""
    if not 0 <= posture < len(POSTURES):
        raise ValueError(f"posture must be 0..{len(POSTURES) - 1}, got {posture}")
    if not identity or any(ch in identity for ch in "/\\\x00"):
        raise ValueError(f"identity {identity!r} must be non-empty without '/', '\\' or NUL")
    c = "b" if concealed else "n"
    return f"{identity}_{c}{posture + 1}{c}_{sample}.png"


def parse_crop_name(name: str) -> CropName:
    """Parse `<id>_b<k>b_<n>.png` / `<id>_n<k>n_<n>.png` (a path is fine); DataError otherwise."""
    base = Path(str(name)).name
    m = _NAME_RE.match(base)
    if m is None:
        raise DataError(
            f"crop file name {base!r} is not <identity>_b<k>b_<n>.png (concealed) or "
            "<identity>_n<k>n_<n>.png (unconcealed)"
        )
    k = int(m.group("code")[1])
    if k > len(POSTURES):
        raise DataError(f"crop file name {base!r} has posture code {k}; postures are 1..{len(POSTURES)}")
    return CropName(
        identity=m.group("identity"),
        posture=k - 1,
        concealed=m.group("code")[0].lower() == "b",
        sample=int(m.group("sample")),
    )


def load_crop(path: str | Path, size: int = CROP_SIZE) -> np.ndarray:
    """Read a crop as float32 [size, size] in [0, 1] (8-bit /255; bilinear resize if needed)."""
    path = Path(path)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        what = "does not exist" if not path.exists() else "is not a readable image"
        raise DataError(f"crop {path} {what}")
    if img.ndim == 3:
        # Same luma weights as PIL's convert('L'), which the research loader uses.
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    if img.dtype == np.uint8:
        out = img.astype(np.float32) / np.float32(255.0)
    elif img.dtype == np.uint16:
        out = img.astype(np.float32) / np.float32(65535.0)
    else:
        raise DataError(f"crop {path} has pixel type {img.dtype}; expected 8- or 16-bit grayscale")
    if out.shape != (size, size):
        out = np.asarray(cv2.resize(out, (size, size), interpolation=cv2.INTER_LINEAR), dtype=np.float32)
    return out


def save_crop(path: str | Path, image: np.ndarray) -> None:
    """Write a [0,1] float image as an 8-bit grayscale PNG (the research crop format)."""
    arr = np.clip(np.rint(np.asarray(image, np.float32) * np.float32(255.0)), 0, 255).astype(np.uint8)
    if not cv2.imwrite(str(path), arr):
        raise DataError(f"cannot write crop {path}")


def read_triplets(
    csv_path: str | Path, data_dir: str | Path | None = None, check_files: bool = True
) -> list[Triplet]:
    """Read an `anchor,positive,negative` CSV into triplets of resolved file paths.

    A relative name is looked up under `data_dir` first (the research CSVs name files relative
    to the image folder, wherever the CSV lives), then next to the CSV (datasets written by
    `thzedge sim dataset`). A bad row is a DataError naming its line; with `check_files`, missing
    files are one DataError naming the first (line and column) and counting the rest.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"triplet file {csv_path} does not exist")
    bases = [Path(data_dir)] if data_dir is not None else []
    if csv_path.parent not in bases:
        bases.append(csv_path.parent)
    where = " or ".join(str(b) for b in bases)
    out: list[Triplet] = []
    missing: list[str] = []
    try:
        with csv_path.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{csv_path}: empty file; expected a header anchor,positive,negative")
            cols = [h.strip().lower() for h in header]
            if cols[:3] != list(_CSV_COLUMNS):
                raise DataError(f"{csv_path} line 1: header is {header}; expected anchor,positive,negative")
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) < 3 or any(not c.strip() for c in row[:3]):
                    raise DataError(
                        f"{csv_path} line {line}: expected 3 paths (anchor,positive,negative), got {row}"
                    )
                paths = []
                for col, cell in zip(_CSV_COLUMNS, row[:3], strict=True):
                    name = Path(cell.strip())
                    candidates = [name] if name.is_absolute() else [b / name for b in bases]
                    hit = next((c for c in candidates if c.is_file()), None)
                    if hit is None:
                        if check_files:
                            missing.append(
                                f"{csv_path} line {line}: {col} file {name} not found under {where}"
                            )
                        hit = candidates[0]
                    paths.append(hit)
                out.append(Triplet(*paths))
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path} is not a UTF-8 CSV file: {exc}") from exc
    except csv.Error as exc:
        raise DataError(f"{csv_path}: malformed CSV: {exc}") from exc
    if missing:
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DataError(missing[0] + more)
    if not out:
        raise DataError(f"{csv_path} holds no triplets")
    return out


def write_triplets(csv_path: str | Path, rows: Sequence[tuple[str, str, str]]) -> None:
    """Write `anchor,positive,negative` rows (paths as given, relative to the CSV's directory)."""
    with Path(csv_path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_CSV_COLUMNS)
        w.writerows(rows)
