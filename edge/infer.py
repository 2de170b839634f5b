"""Batch inference on files: read conditioned crops (PNG / .npy), run a Runner, write an .npz.

Inputs here are already model inputs (conditioned 64x64 crops in [0,1], the research data
format), so no calibration or conditioning is applied. Used by `thzedge infer` and by
`edge.evaluation`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.bundle import INPUT_SIZE
from edge.runner import InferenceResult
from scanner_io.dataset import load_crop, parse_crop_name
from scanner_io.errors import DataError, ThzEdgeError

PNG_SUFFIXES = (".png",)
NPY_SUFFIXES = (".npy",)


@dataclass(frozen=True)
class InputBatch:
    """Model inputs read from files: x [N,1,64,64] float32 in [0,1], a name per row, and its source."""

    x: np.ndarray
    names: list[str]
    paths: list[Path]  # the file each row came from (an .npy file gives several rows)


def _expand(inputs: Sequence[str | Path]) -> list[Path]:
    """Return the files named, a directory standing for its .png and .npy files in name order."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.iterdir() if f.is_file() and f.suffix.lower() in PNG_SUFFIXES + NPY_SUFFIXES
            )
            if not found:
                raise DataError(f"{p}: directory holds no .png or .npy inputs")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such input file")
    if not files:
        raise DataError("no inputs given; pass PNG crops or .npy arrays")
    return files


def array_to_inputs(arr: np.ndarray, source: str) -> np.ndarray:
    """Return an [N,64,64] or [N,1,64,64] uint8 / float-in-[0,1] array as [N,1,64,64] float32 in [0,1]."""
    shape = tuple(arr.shape)
    if arr.ndim == 3 and shape[1:] == (INPUT_SIZE, INPUT_SIZE):
        arr = arr[:, None]
    elif not (arr.ndim == 4 and shape[1:] == (1, INPUT_SIZE, INPUT_SIZE)):
        raise DataError(
            f"{source}: array shape {shape} is not [N,64,64] or [N,1,64,64]; save conditioned 64x64 crops"
        )
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise DataError(f"{source}: array holds NaN or inf; inputs must be finite values in [0,1]")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise DataError(
                f"{source}: float values span [{lo:.4g}, {hi:.4g}], outside [0,1]; "
                "give conditioned crops scaled to [0,1] (or uint8)"
            )
        return x
    raise DataError(f"{source}: dtype {arr.dtype} is not supported; use uint8 or float in [0,1]")


def load_inputs(inputs: Sequence[str | Path]) -> InputBatch:
    """Read PNG crops and .npy arrays (files or directories of them) into one model-input batch.

    PNGs are 8-bit grayscale crops, resized bilinearly when not 64x64 (scanner_io.dataset.load_crop);
    an .npy gives one row per slice, named `file.npy[i]`.
    """
    rows: list[np.ndarray] = []
    names: list[str] = []
    paths: list[Path] = []
    for path in _expand(inputs):
        suffix = path.suffix.lower()
        if suffix in PNG_SUFFIXES:
            rows.append(np.asarray(load_crop(path), dtype=np.float32)[None, None])
            names.append(path.name)
            paths.append(path)
        elif suffix in NPY_SUFFIXES:
            try:
                arr = np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise DataError(f"{path}: not a readable .npy array ({exc})") from None
            x = array_to_inputs(arr, str(path))
            rows.append(x)
            names.extend(f"{path.name}[{i}]" for i in range(x.shape[0]))
            paths.extend([path] * x.shape[0])
        else:
            raise DataError(
                f"{path}: unsupported input type {suffix or '(none)'}; give .png crops or .npy arrays"
            )
    x = np.concatenate(rows, axis=0) if rows else np.zeros((0, 1, INPUT_SIZE, INPUT_SIZE), np.float32)
    if x.shape[0] == 0:
        raise DataError("the inputs hold no images (empty .npy arrays)")
    return InputBatch(x=np.ascontiguousarray(x), names=names, paths=paths)


def truth_postures(batch: InputBatch) -> np.ndarray:
    """Return the posture class of every input parsed from its research-format PNG name."""
    for name, path in zip(batch.names, batch.paths, strict=True):
        if path.suffix.lower() not in PNG_SUFFIXES:
            raise DataError(
                f"{name}: --routing truth needs research-named PNG crops (<id>_b<k>b_<n>.png); "
                "use --routing predicted for .npy inputs"
            )
    return np.array([parse_crop_name(p.name).posture for p in batch.paths], dtype=np.int64)


def save_results(out: Path, outputs: InferenceResult, names: Sequence[str]) -> Path:
    """Write the outputs to an .npz atomically (temp file + rename) and return its path.

    Keys: embedding, posture_logits, posture, confidence, names and, when run, reconstruction.
    """
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise ThzEdgeError(f"{out.parent}: output directory does not exist")
    arrays: dict[str, np.ndarray] = {
        "embedding": outputs.embedding,
        "posture_logits": outputs.posture_logits,
        "posture": outputs.posture,
        "confidence": outputs.confidence,
        "names": np.asarray(list(names), dtype=str),
    }
    if outputs.reconstruction is not None:
        arrays["reconstruction"] = outputs.reconstruction
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f, allow_pickle=False, **arrays
            )  # a file object keeps the name as given (no ".npz" appended)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
