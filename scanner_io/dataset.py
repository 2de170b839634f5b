"""Datasets in the research format: 64×64 8-bit PNG crops plus triplet CSV files.

Layout written by `write_dataset` (paths in the CSVs are relative to the dataset directory):

    DIR/images/<id>_b<k>b_<n>.png   concealed crop, posture k = 1..5, sample n = 1..K
    DIR/images/<id>_n<k>n_<n>.png   unconcealed crop of the same pose (the reconstruction target)
    DIR/train_val.csv, DIR/test.csv  anchor,positive,negative
    DIR/calibration/                 the simulated sensor's true calibration profile
    DIR/dataset.json                 seed, counts, split, profile id, conditioning

Every crop is made from a simulated raw frame by the same calibrate-and-condition function the
daemon applies, with the sensor's true profile (see scanner_io.simulator.conditioned_pair).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from scanner_io.errors import DataError
from scanner_io.frame import POSTURES

__all__ = [
    "CropName",
    "Triplet",
    "DatasetSummary",
    "crop_name",
    "parse_crop_name",
    "load_crop",
    "save_crop",
    "read_triplets",
    "write_triplets",
    "write_dataset",
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
    """One verification triplet; paths are resolved against the CSV's directory."""

    anchor: Path
    positive: Path
    negative: Path


@dataclass(frozen=True)
class DatasetSummary:
    """What `write_dataset` wrote."""

    out_dir: Path
    seed: int
    identities: int
    samples: int
    train_identities: list[str]
    test_identities: list[str]
    images: int
    train_triplets: int
    test_triplets: int
    profile_id: str
    split: str
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


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
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_LINEAR)
    return out


def save_crop(path: str | Path, image: np.ndarray) -> None:
    """Write a [0,1] float image as an 8-bit grayscale PNG (the research crop format)."""
    arr = np.clip(np.rint(np.asarray(image, np.float32) * np.float32(255.0)), 0, 255).astype(np.uint8)
    if not cv2.imwrite(str(path), arr):
        raise DataError(f"cannot write crop {path}")


def read_triplets(csv_path: str | Path, check_files: bool = True) -> list[Triplet]:
    """Read an `anchor,positive,negative` CSV; a bad row or missing file is a DataError naming it."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"triplet file {csv_path} does not exist")
    base = csv_path.parent
    out: list[Triplet] = []
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
                paths = [Path(c.strip()) for c in row[:3]]
                paths = [p if p.is_absolute() else base / p for p in paths]
                if check_files:
                    for col, p in zip(_CSV_COLUMNS, paths, strict=True):
                        if not p.is_file():
                            raise DataError(f"{csv_path} line {line}: {col} file {p} does not exist")
                out.append(Triplet(*paths))
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path} is not a UTF-8 CSV file: {exc}") from exc
    except csv.Error as exc:
        raise DataError(f"{csv_path}: malformed CSV: {exc}") from exc
    if not out:
        raise DataError(f"{csv_path} holds no triplets")
    return out


def write_triplets(csv_path: str | Path, rows: Sequence[tuple[str, str, str]]) -> None:
    """Write `anchor,positive,negative` rows (paths as given, relative to the CSV's directory)."""
    with Path(csv_path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_CSV_COLUMNS)
        w.writerows(rows)


def _split_identities(
    n: int, test_identities: int | None, test_fraction: float
) -> tuple[list[int], list[int]]:
    if test_identities is None:
        test_identities = max(2, int(round(n * test_fraction))) if n >= 4 else 0
    if test_identities < 0 or test_identities > n:
        raise DataError(f"test identities must be 0..{n}, got {test_identities}")
    if 0 < test_identities < 2 or 0 < n - test_identities < 2:
        raise DataError(
            f"{n} identities split {n - test_identities}/{test_identities}: each split needs at least 2 "
            "identities so triplets have negatives"
        )
    # The last identities are the test set: deterministic, and adding identities keeps earlier ones.
    return list(range(n - test_identities)), list(range(n - test_identities, n))


def write_dataset(
    out_dir: str | Path,
    identities: int = 20,
    samples: int = 8,
    seed: int = 0,
    test_identities: int | None = None,
    test_fraction: float = 0.25,
    split: str = "identity",
    negatives: int = 1,
    simulator: Any | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DatasetSummary:
    """Simulate and write a research-format dataset; test identities are disjoint by default.

    `split="identity"` puts the last `test_identities` identities (default: a quarter) in
    test.csv; `split="sample"` instead keeps every identity and puts the last quarter of the
    sample numbers in test.csv (closed set). Each anchor (concealed) gets `negatives` triplets
    whose negative is a concealed crop of another identity of the same split in the same
    posture, with a random sample.
    """
    import time

    from scanner_io.simulator import ScannerSimulator, identity_name

    t0 = time.perf_counter()
    if identities < 2:
        raise DataError(f"a dataset needs at least 2 identities, got {identities}")
    if samples < 1:
        raise DataError(f"samples must be >= 1, got {samples}")
    if negatives < 1:
        raise DataError(f"negatives must be >= 1, got {negatives}")
    if split not in ("identity", "sample"):
        raise DataError(f"split must be 'identity' or 'sample', got {split!r}")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    sim = simulator if simulator is not None else ScannerSimulator(seed=seed, identities=identities)
    if sim.identities < identities:
        raise DataError(f"the simulator has {sim.identities} identities, fewer than {identities}")

    total = identities * len(POSTURES) * samples
    done = 0
    for ident in range(identities):
        name = identity_name(ident)
        for posture in range(len(POSTURES)):
            for n in range(1, samples + 1):
                x, target, _ = sim.conditioned_pair(ident, posture, n)
                save_crop(images / crop_name(name, posture, True, n), x)
                save_crop(images / crop_name(name, posture, False, n), target)
                done += 1
                if progress is not None:
                    progress(done, total)

    rng = np.random.default_rng([seed, 0x7219])
    if split == "identity":
        train_ids, test_ids = _split_identities(identities, test_identities, test_fraction)
        parts = {"train_val": (train_ids, range(1, samples + 1)), "test": (test_ids, range(1, samples + 1))}
    else:
        n_test = max(1, int(round(samples * test_fraction))) if samples >= 2 else 0
        if n_test == 0:
            raise DataError("a sample split needs samples >= 2")
        all_ids = list(range(identities))
        train_ids = test_ids = all_ids
        parts = {
            "train_val": (all_ids, range(1, samples - n_test + 1)),
            "test": (all_ids, range(samples - n_test + 1, samples + 1)),
        }
    counts = {}
    for part, (ids, sample_range) in parts.items():
        rows: list[tuple[str, str, str]] = []
        sample_list = list(sample_range)
        for ident in ids:
            others = [j for j in ids if j != ident]
            for posture in range(len(POSTURES)):
                for n in sample_list:
                    anchor = f"images/{crop_name(identity_name(ident), posture, True, n)}"
                    positive = f"images/{crop_name(identity_name(ident), posture, False, n)}"
                    for _ in range(negatives):
                        j = others[int(rng.integers(len(others)))] if others else ident
                        m = sample_list[int(rng.integers(len(sample_list)))]
                        negative = f"images/{crop_name(identity_name(j), posture, True, m)}"
                        rows.append((anchor, positive, negative))
        if rows:
            write_triplets(out / f"{part}.csv", rows)
        counts[part] = len(rows)

    sim.true_profile.save(out / "calibration")
    summary = DatasetSummary(
        out_dir=out,
        seed=seed,
        identities=identities,
        samples=samples,
        train_identities=[identity_name(i) for i in train_ids],
        test_identities=[identity_name(i) for i in test_ids],
        images=2 * total,
        train_triplets=counts.get("train_val", 0),
        test_triplets=counts.get("test", 0),
        profile_id=sim.true_profile.profile_id,
        split=split,
        seconds=round(time.perf_counter() - t0, 3),
    )
    manifest = summary.to_dict() | {
        "format": "thzedge-sim-dataset/1",
        "layout": "images/<id>_b<k>b_<n>.png concealed, images/<id>_n<k>n_<n>.png unconcealed; "
        "CSV paths relative to this directory",
        "postures": list(POSTURES),
        "conditioning": sim.conditioning.to_dict(),
        "negatives_per_anchor": negatives,
    }
    manifest.pop("out_dir")
    (out / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return summary
