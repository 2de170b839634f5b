"""Import research checkpoints (both layouts of checkpoint-layouts.md) into `MTLNetwork`.

The research scripts `torch.save` a dict holding the state dict under 'model_state_dict' plus
optimizer/scheduler state, the config and metric histories (older files: a bare state dict).
We load with `weights_only=True` and an allowlist of exactly what those extras need (numpy
scalars, dtypes and arrays); anything that would run code is refused unless the caller passes
`trust=True` (`--trust-checkpoint`).

Keys are normalised to the THz-only layout with decoders keyed by 0-based class index, the
training-only parts of the distilled model (teacher, cross-attention, distillation projections)
are dropped, and the result must match the network exactly: any missing or unexpected key or
wrong shape is a `CheckpointError` naming it.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import sha256_file
from export.model import BASE_CHANNELS, MTLNetwork, NetworkConfig
from scanner_io.errors import CheckpointError

log = logging.getLogger(__name__)

LAYOUT_THZ_ONLY = "thz-only"
LAYOUT_DISTILLED = "distilled-student"

_THZ_PREFIX = "encoder.backbone.backbone."
_DISTILLED_PREFIX = "model.thz_encoder.backbone."

# Distilled layout: student (inference) prefixes -> THz-only names.
_DISTILLED_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.thz_encoder.backbone.", "encoder.backbone.backbone."),
    ("model.student_spatial_reduction.", "encoder.spatial_reduction."),
    ("model.student_verification_head.", "encoder.verification_head."),
    ("model.student_classification_head.", "encoder.classification_head."),
    ("model.reconstruction_decoders.", "reconstruction_decoders."),
)
# Distilled layout: training-only parts, dropped on import.
_DISTILLED_TRAINING_ONLY: tuple[str, ...] = (
    "model.vis_encoder.",
    "model.visible_guided_cross_attention.",
    "model.thz_guided_cross_attention.",
    "model.attention_fusion.",
    "model.teacher_",
    "model.student_distill_projection.",
    "model.teacher_distill_projection.",
)
_DECODER_KEY = re.compile(r"^reconstruction_decoders\.([^.]+)\.(.+)$")
_SHOW = 3  # how many offending keys a message names


@dataclass(frozen=True)
class ImportedCheckpoint:
    """A research checkpoint turned into an eval-mode `MTLNetwork`, with where it came from."""

    model: MTLNetwork
    config: NetworkConfig
    layout: str
    decoder_ids: tuple[str, ...]  # the checkpoint's decoder keys, in class-index order
    sha256: str
    dropped: int  # number of training-only tensors dropped
    extras: dict[str, Any] = field(default_factory=dict)  # small scalar metadata (epoch, best SSIM)

    def source(self) -> dict[str, Any]:
        """Provenance for the bundle manifest (no weights, no histories)."""
        return {
            "checkpoint_sha256": self.sha256,
            "layout": self.layout,
            "decoder_keys": list(self.decoder_ids),
            "dropped_training_only_tensors": self.dropped,
            **self.extras,
        }


def _safe_globals() -> list[Any]:
    """The allowlist research checkpoints need beyond tensors: numpy scalars, dtypes and arrays.

    Metric histories hold np.float64 (np.mean results) and metric dicts may hold small arrays.
    numpy 1.x pickles name `numpy.core.multiarray.*`, numpy 2 `numpy._core.multiarray.*`.
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allow: list[Any] = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype]
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allow += [
            (multiarray.scalar, f"{prefix}.scalar"),
            (multiarray._reconstruct, f"{prefix}._reconstruct"),
        ]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes through these classes
    if dtypes is not None:
        for name in ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"):
            allow.append(getattr(dtypes, f"{name}DType"))
        for name in ("Float16", "Float32", "Float64"):
            allow.append(getattr(dtypes, f"{name}DType"))
    return allow


def load_raw(path: Path, trust: bool = False) -> Any:
    """`torch.load` a checkpoint safely; refuse code-running pickles unless `trust`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Weights only load failed" not in msg:
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({_first_line(msg)})") from None
        culprit = _unsafe_global(msg)
        if culprit is None:  # the unpickler choked on the bytes themselves, not on a global
            raise CheckpointError(
                f"checkpoint {path} is truncated or not a PyTorch checkpoint ({_weights_only_reason(msg)})"
            ) from None
        if not trust:
            raise CheckpointError(
                f"checkpoint {path} was refused: loading it would run code ({culprit}); "
                "only if you trust where it came from, rerun with --trust-checkpoint"
            ) from None
        log.warning("loading %s with full pickle (--trust-checkpoint): %s", path, culprit)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise CheckpointError(f"checkpoint {path} cannot be loaded ({_first_line(str(exc2))})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a PyTorch checkpoint ({_first_line(str(exc))})"
        ) from None


def _first_line(msg: str) -> str:
    line = msg.strip().splitlines()[0] if msg.strip() else "no detail"
    return line[:200]


def _unsafe_global(msg: str) -> str | None:
    """The global torch's weights-only unpickler refused (the code the pickle would run), if any."""
    for pattern in (r"GLOBAL ([\w.]+)", r"but got <class '([\w.]+)'>"):
        m = re.search(pattern, msg)
        if m:
            return f"it needs {m.group(1)}, which is not on the allowlist"
    return None


def _weights_only_reason(msg: str) -> str:
    for line in msg.splitlines():
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if rest:
                return rest[:160]
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    # torch puts the unpickler's own complaint on the line after the marker
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line and i + 1 < len(lines):
            return lines[i + 1][:160]
    return "unreadable pickle"


def extract_state_dict(obj: Any, path: Path | str = "checkpoint") -> dict[str, Any]:
    """The state dict inside a loaded checkpoint: obj['model_state_dict'] or obj itself if bare."""
    import torch

    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        sd = obj["model_state_dict"]
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path} holds neither 'model_state_dict' nor a bare state dict (found: {keys or 'nothing'})"
        )
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f"{path}: 'model_state_dict' is not a non-empty mapping of tensors")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict entry {bad[0]!r} is not a tensor")
    return dict(sd)


def detect_layout(keys: list[str]) -> str:
    """Which research layout a key set is; CheckpointError for anything else."""
    if any(k.startswith(_THZ_PREFIX) for k in keys):
        return LAYOUT_THZ_ONLY
    if any(k.startswith(_DISTILLED_PREFIX) for k in keys):
        return LAYOUT_DISTILLED
    sample = ", ".join(sorted(keys)[:_SHOW])
    raise CheckpointError(
        f"unknown checkpoint layout: expected keys under {_THZ_PREFIX!r} (THz-only) or "
        f"{_DISTILLED_PREFIX!r} (distilled student), found e.g. {sample}"
    )


def normalise_keys(sd: dict[str, Any]) -> tuple[dict[str, Any], str, tuple[str, ...], int]:
    """Rename a research state dict to MTLNetwork names; returns (state, layout, decoder ids, dropped)."""
    layout = detect_layout(list(sd))
    dropped = 0
    out: dict[str, Any] = {}
    if layout == LAYOUT_DISTILLED:
        for k, v in sd.items():
            if k.startswith(_DISTILLED_TRAINING_ONLY):
                dropped += 1
                continue
            for old, new in _DISTILLED_RENAMES:
                if k.startswith(old):
                    out[new + k[len(old) :]] = v
                    break
            else:
                out[k] = v  # reported as unexpected below
    else:
        out = dict(sd)
    # Decoder ModuleDict keys: '0'..'K-1' (class index) or '1'..'K' (posture id = index + 1).
    ids = sorted({m.group(1) for k in out if (m := _DECODER_KEY.match(k))}, key=_id_order)
    k_heads = out.get("encoder.classification_head.weight")
    if k_heads is None:
        raise CheckpointError("checkpoint is missing key encoder.classification_head.weight (posture head)")
    num = int(k_heads.shape[0])
    zero_based = [str(i) for i in range(num)]
    one_based = [str(i + 1) for i in range(num)]
    if ids == zero_based:
        shift = 0
    elif ids == one_based:
        shift = 1
    else:
        raise CheckpointError(
            f"reconstruction decoder keys are {ids or 'absent'}; expected {zero_based} or {one_based} "
            f"for {num} postures"
        )
    if shift:
        renamed: dict[str, Any] = {}
        for k, v in out.items():
            m = _DECODER_KEY.match(k)
            renamed[f"reconstruction_decoders.{int(m.group(1)) - 1}.{m.group(2)}" if m else k] = v
        out = renamed
    return out, layout, tuple(ids), dropped


def _id_order(s: str) -> tuple[int, str]:
    return (int(s), s) if s.isdigit() else (1 << 30, s)


def infer_config(sd: Mapping[str, Any]) -> NetworkConfig:
    """Embedding size, posture count and width multiplier from a normalised state dict's shapes."""
    needed = (
        "encoder.backbone.backbone.initial_conv.0.weight",
        "encoder.verification_head.4.weight",
        "encoder.classification_head.weight",
    )
    for key in needed:
        if key not in sd:
            raise CheckpointError(f"checkpoint is missing key {key}")
    c1 = int(sd[needed[0]].shape[0])
    try:
        return NetworkConfig(
            embedding_dim=int(sd[needed[1]].shape[0]),
            num_postures=int(sd[needed[2]].shape[0]),
            width=c1 / BASE_CHANNELS,
        )
    except ValueError as exc:
        raise CheckpointError(f"checkpoint shapes fit no network of this architecture: {exc}") from None


def build_model(sd: dict[str, Any], config: NetworkConfig) -> MTLNetwork:
    """An eval-mode MTLNetwork holding exactly `sd`; CheckpointError names any key/shape mismatch."""
    import torch

    model = MTLNetwork.from_config(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        more = f" (and {len(missing) - _SHOW} more)" if len(missing) > _SHOW else ""
        raise CheckpointError(f"checkpoint is missing key(s) {', '.join(missing[:_SHOW])}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - _SHOW} more)" if len(unexpected) > _SHOW else ""
        raise CheckpointError(f"checkpoint has unexpected key(s) {', '.join(unexpected[:_SHOW])}{more}")
    for k, ref in expected.items():
        got = sd[k]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"wrong shape for {k}: checkpoint has {tuple(got.shape)}, the network expects "
                f"{tuple(ref.shape)} (width {config.width:g}, embedding {config.embedding_dim})"
            )
        if ref.is_floating_point() != got.is_floating_point():
            raise CheckpointError(f"wrong dtype for {k}: checkpoint has {got.dtype}, expected {ref.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise CheckpointError(f"checkpoint tensor {k} contains NaN or infinite values")
    model.load_state_dict({k: sd[k].to(expected[k].dtype) for k in expected}, strict=True)
    return model.eval()


def import_checkpoint(path: Path | str, trust: bool = False) -> ImportedCheckpoint:
    """Load a research checkpoint file into an eval-mode MTLNetwork (see the module docstring)."""
    path = Path(path)
    obj = load_raw(path, trust=trust)
    sd = extract_state_dict(obj, path)
    try:
        normalised, layout, ids, dropped = normalise_keys(sd)
        config = infer_config(normalised)
        model = build_model(normalised, config)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    extras: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for key in ("epoch", "best_val_ssim", "best_val_loss"):
            value = _finite_number(obj.get(key))
            if value is not None:
                extras[key] = int(value) if key == "epoch" else value
    log.debug(
        "imported %s checkpoint %s (%s), dropped %d training-only tensors", layout, path.name, config, dropped
    )
    return ImportedCheckpoint(model, config, layout, ids, sha256_file(path), dropped, extras)


def _finite_number(value: Any) -> float | None:
    """A plain finite float from a python or numpy scalar, else None (manifests are strict JSON)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and not isinstance(value, bool) else None
