"""Write model bundles: export + self-check into a staging directory, then move it into place.

`write_bundle` is what `thzedge export onnx` (and demo training) call. A bundle only appears
at its destination after the ONNX checker and the ORT-vs-PyTorch parity check passed and
`edge.bundle.Bundle.open` accepted the result, so a failed export never leaves a half bundle.

`add_variant`, `set_threshold` and `set_accuracy_gate` update an existing bundle (quantized
variants, calibrated thresholds, gate reports) and re-verify it; they rewrite manifest.json, so
the bundle id changes, as it should when the bundle's content changes.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge import __version__ as THZEDGE_VERSION
from edge.bundle import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INPUT_NAME,
    INPUT_SIZE,
    MANIFEST_NAME,
    MODEL_FAMILY,
    Bundle,
    Precision,
    default_postures,
    file_entry,
    graph_specs,
    save_manifest,
)
from export.onnx_export import (
    DEFAULT_MAX_BATCH,
    DEFAULT_OPSET,
    PARITY_TOLERANCE,
    ExportError,
    ParityReport,
    check_graphs,
    check_opset,
    check_parity,
    export_graphs,
)
from scanner_io.errors import BundleError, ThzEdgeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    """What `write_bundle` produced: the verified bundle and its parity report."""

    bundle: Bundle
    parity: ParityReport


def _versions(opset: int) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    return {
        "thzedge": THZEDGE_VERSION,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": opset,
        "python": platform.python_version(),
    }


def _unset_threshold() -> dict[str, Any]:
    # Filled in by calibration (`thzedge eval` / the accuracy gate); null until then.
    return {"threshold": None, "metric": "euclidean", "method": None, "chosen_on": None}


def build_manifest(
    model: Any,
    files: dict[str, str],
    bundle_dir: Path,
    *,
    variant: str,
    max_batch: int,
    opset: int,
    parity: ParityReport,
    source: Mapping[str, Any] | None = None,
    postures: list[str] | None = None,
) -> dict[str, Any]:
    """The manifest of a freshly exported fp32 bundle (schema: docs/bundle.md)."""
    from export.model import count_parameters

    cfg = model.config
    names = postures or default_postures(cfg.num_postures)
    if len(names) != cfg.num_postures:
        raise ThzEdgeError(f"{len(names)} posture names for a model with {cfg.num_postures} postures")
    specs = graph_specs(cfg.embedding_dim, cfg.num_postures, cfg.channels)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "model": {
            "family": MODEL_FAMILY,
            "variant": variant,
            "embedding_dim": cfg.embedding_dim,
            "num_postures": cfg.num_postures,
            "postures": names,
            "width": cfg.width,
            "parameters": count_parameters(model),
            "source": dict(source or {}),
        },
        "input": {
            "name": INPUT_NAME,
            "shape": ["N", 1, INPUT_SIZE, INPUT_SIZE],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "layout": "NCHW",
            "scaling": "8-bit grayscale dBm crop / 255; no mean/std normalisation",
        },
        "max_batch": max_batch,
        "graphs": {name: spec.to_dict() for name, spec in specs.items()},
        "files": {name: file_entry(bundle_dir, name) for name in files.values()},
        "variants": {
            "fp32": {
                "precision": "fp32",
                "graphs": dict(files),
                "opset": opset,
                "exporter": "torch.onnx (TorchScript, dynamo=False)",
                "parity_vs_pytorch": parity.to_dict(),
                "verification": _unset_threshold(),
            }
        },
        "engines": {},
        "accuracy_gates": {},
        "versions": _versions(opset),
    }


def check_destination(out_dir: Path, force: bool) -> None:
    """Refuse an --out that is a file, or a non-empty directory unless force."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ThzEdgeError(f"{out_dir} exists and is not a directory; choose another --out")
        if any(out_dir.iterdir()) and not force:
            raise ThzEdgeError(f"{out_dir} exists and is not empty; choose another --out or pass --force")


def write_bundle(
    model: Any,
    out_dir: Path | str,
    *,
    variant: str = "custom",
    opset: int = DEFAULT_OPSET,
    max_batch: int = DEFAULT_MAX_BATCH,
    source: Mapping[str, Any] | None = None,
    postures: list[str] | None = None,
    tolerance: float = PARITY_TOLERANCE,
    force: bool = False,
) -> ExportResult:
    """Export an MTLNetwork to a checked, verified bundle directory at `out_dir`."""
    out_dir = Path(out_dir)
    check_opset(opset)
    if max_batch < 1:
        raise ThzEdgeError(f"--max-batch must be >= 1, got {max_batch}")
    check_destination(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        files = export_graphs(model, stage, opset)
        check_graphs(stage, files)
        parity = check_parity(model, stage, files, max_batch=max_batch, tolerance=tolerance)
        if not parity.passed:
            raise ExportError(
                f"ONNX Runtime differs from PyTorch beyond the tolerance ({tolerance:g}) on "
                f"{', '.join(parity.failures())} (worst {parity.worst:.2e}); the export was not written"
            )
        manifest = build_manifest(
            model,
            files,
            stage,
            variant=variant,
            max_batch=max_batch,
            opset=opset,
            parity=parity,
            source=source,
            postures=postures,
        )
        save_manifest(stage, manifest)
        Bundle.open(stage)  # the reader must accept what the writer wrote
        if out_dir.exists():
            shutil.rmtree(out_dir)
        stage.rename(out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ExportResult(Bundle.open(out_dir), parity)


def _load_manifest(bundle_dir: Path) -> dict[str, Any]:
    bundle = Bundle.open(bundle_dir)  # refuse to extend a bundle that does not verify
    return dict(bundle.manifest)


def add_variant(
    bundle_dir: Path | str,
    precision: str,
    graph_files: Mapping[str, Path | str],
    info: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> Bundle:
    """Copy one precision's ONNX graphs into `<bundle>/<precision>/` and register them.

    `graph_files` maps every graph name ("encoder", "decoder_0", ...) to a file; `info` is
    stored in the variant entry (opset, quantizer, calibration set sha256, parity report, ...).
    """
    bundle_dir = Path(bundle_dir)
    added = [p for p in Precision if p is not Precision.fp32]  # fp32 is written by write_bundle
    if precision not in added:
        raise ThzEdgeError(f"precision must be one of {', '.join(added)}")
    manifest = _load_manifest(bundle_dir)
    if precision in manifest["variants"] and not replace:
        raise BundleError(
            f"bundle {bundle_dir} already has a {precision} variant; pass replace=True to redo it"
        )
    expected = set(manifest["graphs"])
    if set(graph_files) != expected:
        raise ThzEdgeError(
            f"a {precision} variant needs graphs {sorted(expected)}, got {sorted(graph_files)}"
        )
    sub = bundle_dir / precision
    sub.mkdir(exist_ok=True)
    graphs: dict[str, str] = {}
    files = dict(manifest["files"])
    for graph, src in graph_files.items():
        rel = f"{precision}/{graph}.onnx"
        if Path(src).resolve() != (bundle_dir / rel).resolve():
            shutil.copyfile(src, bundle_dir / rel)
        files[rel] = file_entry(bundle_dir, rel)
        graphs[graph] = rel
    variants = dict(manifest["variants"])
    variants[precision] = {
        "precision": precision,
        "graphs": graphs,
        **dict(info or {}),
        "verification": dict((info or {}).get("verification", _unset_threshold())),
    }
    manifest["files"] = files
    manifest["variants"] = variants
    save_manifest(bundle_dir, manifest)
    return Bundle.open(bundle_dir)


def set_threshold(
    bundle_dir: Path | str, precision: str, threshold: float | None, method: str, chosen_on: Mapping[str, Any]
) -> Bundle:
    """Store a variant's verification threshold and how it was chosen (e.g. EER on a named set)."""
    bundle_dir = Path(bundle_dir)
    manifest = _load_manifest(bundle_dir)
    if precision not in manifest["variants"]:
        raise BundleError(f"bundle {bundle_dir} has no {precision} variant")
    variants = {k: dict(v) for k, v in manifest["variants"].items()}
    variants[precision]["verification"] = {
        "threshold": None if threshold is None else float(threshold),
        "metric": "euclidean",
        "method": method,
        "chosen_on": dict(chosen_on),
    }
    manifest["variants"] = variants
    save_manifest(bundle_dir, manifest)
    return Bundle.open(bundle_dir)


def set_accuracy_gate(bundle_dir: Path | str, precision: str, report: Mapping[str, Any]) -> Bundle:
    """Store an accuracy-gate report (task metrics vs fp32, pass/fail) under accuracy_gates[precision]."""
    bundle_dir = Path(bundle_dir)
    manifest = _load_manifest(bundle_dir)
    gates = dict(manifest.get("accuracy_gates", {}))
    gates[precision] = dict(report)
    manifest["accuracy_gates"] = gates
    save_manifest(bundle_dir, manifest)
    return Bundle.open(bundle_dir)


__all__ = [
    "MANIFEST_NAME",
    "ExportResult",
    "add_variant",
    "build_manifest",
    "set_accuracy_gate",
    "set_threshold",
    "write_bundle",
]
