"""The simulator seen through its true calibration: profile, conditioned pairs, datasets, previews.

scanner_io.simulator makes raw frames and raw truth (powers, the sensor's `SensorMaps`); this
module is where conditioning enters. It builds the sensor's true `CalibrationProfile`, turns
captures into what the model sees with the same `calibrate` / `condition_with_roi` the daemon
uses, and writes research-format datasets (layout in scanner_io/dataset.py):

    DIR/images/<id>_b<k>b_<n>.png   concealed crop, posture k = 1..5, sample n = 1..K
    DIR/images/<id>_n<k>n_<n>.png   unconcealed crop of the same pose (the reconstruction target)
    DIR/train_val.csv, DIR/test.csv  anchor,positive,negative
    DIR/calibration/                 the simulated sensor's true calibration profile
    DIR/dataset.json                 seed, counts, split, profile id, conditioning
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from calibration.conditioning import ConditioningParams, Roi, calibrate, condition_with_roi
from calibration.profile import CalibrationProfile
from scanner_io.dataset import crop_name, save_crop, write_triplets
from scanner_io.errors import DataError
from scanner_io.frame import POSTURES, Frame
from scanner_io.simulator import ScannerSimulator, SensorMaps, identity_name

__all__ = [
    "CalibratedSimulator",
    "DatasetSummary",
    "preview_sheet",
    "profile_from_sensor_maps",
    "sim_conditioning",
    "true_profile",
    "write_dataset",
]


def sim_conditioning(shape: tuple[int, int]) -> ConditioningParams:
    """Return the conditioning for simulated frames of `shape`: the 88-pixel crop scaled with the frame.

    The simulator keeps the head's share of the frame (its scale is min(shape) / 128), so the
    head crop scales the same way; at the default 128×128 this is `ConditioningParams()`.
    """
    scale = min(int(shape[0]), int(shape[1])) / 128.0
    return ConditioningParams(crop_size=max(8, int(round(88 * scale))))


def profile_from_sensor_maps(
    maps: SensorMaps, conditioning: ConditioningParams | None = None
) -> CalibrationProfile:
    """Return the calibration profile of a simulated sensor's true maps (what a perfect calibration measures).

    `conditioning` defaults to `sim_conditioning(maps.shape)`; the maps' `meta` (source, seed,
    sensor temperature) becomes the profile's meta, so the same sensor always has the same id.
    """
    return CalibrationProfile(
        scanner=maps.scanner,
        shape=maps.shape,
        dark=maps.dark,
        gain=maps.gain,
        bad_pixels=maps.bad_pixels,
        conditioning=conditioning if conditioning is not None else sim_conditioning(maps.shape),
        meta=dict(maps.meta),
    )


def true_profile(sim: ScannerSimulator, conditioning: ConditioningParams | None = None) -> CalibrationProfile:
    """Return the simulator's true calibration profile at its calibration temperature."""
    return profile_from_sensor_maps(sim.sensor_maps(), conditioning)


class CalibratedSimulator:
    """A simulator plus its true profile: conditioned dataset pairs and reconstruction targets.

    Every crop goes through exactly the daemon's `calibrate` + `condition_with_roi` with the
    true profile; a target is the frame-averaged unconcealed reference capture of the same pose,
    calibrated the same way and cut at the input's ROI, so input and target are pixel-aligned.
    """

    def __init__(
        self,
        sim: ScannerSimulator,
        conditioning: ConditioningParams | None = None,
        profile: CalibrationProfile | None = None,
    ) -> None:
        self.sim = sim
        self.conditioning = conditioning if conditioning is not None else sim_conditioning(sim.shape)
        # Another profile (one estimated by `calibrate build`, or an identity one) conditions
        # the same raw captures differently: that is how calibration quality is compared.
        if profile is None:
            profile = profile_from_sensor_maps(sim.sensor_maps(), self.conditioning)
        self.profile = profile.with_conditioning(self.conditioning)

    @property
    def identities(self) -> int:
        """Number of identities of the underlying simulator."""
        return self.sim.identities

    def conditioned_pair(
        self, identity: int, posture: int, sample: int
    ) -> tuple[np.ndarray, np.ndarray, Roi]:
        """Return (concealed input, unconcealed target, roi) for one sample, as the dataset has them."""
        conc = self.sim.capture(identity, posture, sample, concealed=True)
        x, roi = condition_with_roi(calibrate(conc.raw, self.profile), self.conditioning)
        return x, self._target_at(identity, posture, sample, roi), roi

    def _target_at(self, identity: int, posture: int, sample: int, roi: Roi) -> np.ndarray:
        ref = self.sim.capture(identity, posture, sample, concealed=False, reference=True)
        return condition_with_roi(calibrate(ref.raw, self.profile), self.conditioning, roi)[0]

    def target(self, frame: Frame) -> np.ndarray:
        """Return a simulated frame's reconstruction target (its reference capture at the frame's ROI).

        64×64 float32 in [0, 1]. The ROI is the one the frame itself conditions to with the true
        profile (the profile at the calibration temperature, as a deployed scanner would have).
        """
        truth = frame.truth
        if truth is None or not hasattr(truth, "reference"):
            raise ValueError("frame has no simulator truth (only simulated frames have a target)")
        _, roi = condition_with_roi(calibrate(frame.data, self.profile), self.conditioning)
        return condition_with_roi(calibrate(truth.reference, self.profile), self.conditioning, roi)[0]

    def clean_target(self, identity: int, posture: int, sample: int, roi: Roi) -> np.ndarray:
        """Return the noise-free unconcealed render (no speckle, no sensor) conditioned at `roi`."""
        cap = self.sim.capture(identity, posture, sample, concealed=False, reference=True)
        return condition_with_roi(cap.clean, self.conditioning, roi)[0]


def _calibrated(sim: ScannerSimulator | CalibratedSimulator) -> CalibratedSimulator:
    return sim if isinstance(sim, CalibratedSimulator) else CalibratedSimulator(sim)


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
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
    simulator: ScannerSimulator | CalibratedSimulator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DatasetSummary:
    """Simulate and write a research-format dataset; test identities are disjoint by default.

    `split="identity"` puts the last `test_identities` identities (default: a quarter) in
    test.csv; `split="sample"` instead keeps every identity and puts the last quarter of the
    sample numbers in test.csv (closed set). Each anchor (concealed) gets `negatives` triplets
    whose negative is a concealed crop of another identity of the same split in the same
    posture, with a random sample.
    """
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
    sim = _calibrated(
        simulator if simulator is not None else ScannerSimulator(seed=seed, identities=identities)
    )
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

    sim.profile.save(out / "calibration")
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
        profile_id=sim.profile.profile_id,
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


# ---------------------------------------------------------------------------------------------
# Preview
# ---------------------------------------------------------------------------------------------
def preview_sheet(
    sim: ScannerSimulator | CalibratedSimulator, identities: int = 4, sample: int = 1, tile: int = 64
) -> np.ndarray:
    """Return a uint8 contact sheet: per identity a row, per posture concealed | unconcealed | raw.

    Crops are shown as the model sees them; the raw frame is the sensor's uint16 counts,
    log-stretched above its darkest pixels (dark pattern, hot pixels and all).
    """
    cal = _calibrated(sim)
    label_h = 14
    n = min(identities, cal.identities)
    cols = 3 * len(POSTURES)
    gap = 2
    width = cols * tile + (len(POSTURES) - 1) * gap
    sheet = np.full((label_h + n * tile, width), 255, np.uint8)

    def to_u8(img: np.ndarray) -> np.ndarray:
        interp = cv2.INTER_AREA if img.shape[0] > tile else cv2.INTER_NEAREST
        img = cv2.resize(img, (tile, tile), interpolation=interp)
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)

    for p, pname in enumerate(POSTURES):
        x0 = p * (3 * tile + gap)
        text = f"{pname}: concealed | target | raw"
        scale = 0.33 * tile / 64.0
        cv2.putText(sheet, text, (x0 + 2, label_h - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, 0, 1, cv2.LINE_AA)
        for i in range(n):
            y0 = label_h + i * tile
            x, target, _ = cal.conditioned_pair(i, p, sample)
            raw = cal.sim.render(i, p, sample, concealed=True).data.astype(np.float32)
            # Log stretch above the darkest pixels: shows the dark pattern, bad pixels and the head.
            raw_log = np.log10(np.maximum(raw - np.percentile(raw, 0.5), 1.0))
            lo, hi = np.percentile(raw_log, [1.0, 99.9])
            raw_n = np.clip((raw_log - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
            for k, img in enumerate((x, target, raw_n)):
                sheet[y0 : y0 + tile, x0 + k * tile : x0 + (k + 1) * tile] = to_u8(img)
    return sheet
