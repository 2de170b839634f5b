"""Quantize a bundle's ONNX graphs to INT8 (explicit Q/DQ) or FP16 and add them as a precision variant.

Pipeline (docs/quantization.md): load conditioned calibration inputs that cover every posture,
concealed and unconcealed → run the FP32 encoder on them → quantize the encoder on the inputs and
each posture decoder on the encoder features of the frames routed to it (predicted posture, as the
daemon routes) → lint the Q/DQ graphs for what TensorRT accepts → accuracy gate → add the variant
to the bundle only when the gate passes.

INT8 uses NVIDIA Model Optimizer when it is importable and ONNX Runtime's `quantize_static`
otherwise, both with TensorRT's settings: symmetric (zero-point 0), signed int8, per-channel
weights. FP16 uses Model Optimizer AutoCast when importable, else onnxconverter-common, both
keeping float32 graph inputs/outputs so the runtime contract does not change.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.conditioning import calibrate_and_condition
from calibration.profile import CalibrationProfile, resolve_profile
from edge.bundle import MANIFEST_NAME, Bundle, Precision, file_entry, save_manifest, sha256_file
from export.bundle_writer import add_variant as write_variant
from export.bundle_writer import set_accuracy_gate
from export.gate import run_gate
from export.onnx_export import cpu_session
from scanner_io.choices import Choice
from scanner_io.dataset import load_crop, parse_crop_name, read_triplets
from scanner_io.errors import BundleError, DataError, InternalError, MissingDependencyError, ThzEdgeError
from scanner_io.frame import POSTURES
from scanner_io.recording import RecordingReader
from scanner_io.sources import MalformedFrame

log = logging.getLogger(__name__)

KEEP_FLOAT_CHOICES = ("embedding", "latent", "sigmoid", "stem")
DEFAULT_KEEP_FLOAT: tuple[str, ...] = ("embedding", "latent", "sigmoid")
# Below this many routed frames a decoder's activation ranges are noise; top it up (see below).
MIN_FRAMES_PER_DECODER = 16


class QuantizationError(InternalError):
    """The quantizer made a graph that fails thzedge's own checks (exit 70: a bug, not bad input)."""


class CalibrationMethod(Choice):
    """How INT8 activation ranges are chosen from the calibration frames."""

    max = "max"
    entropy = "entropy"
    percentile = "percentile"


class Quantizer(Choice):
    """Which tool makes a variant; `auto` takes NVIDIA Model Optimizer when it is installed."""

    auto = "auto"
    # Model Optimizer: explicit Q/DQ for int8, AutoCast for fp16.
    modelopt = "modelopt"
    # ONNX Runtime's quantize_static: int8 only.
    ort = "ort"
    # onnxconverter-common's float16 conversion: fp16 only.
    onnxconverter = "onnxconverter"


# What quantization can make: every precision but the fp32 reference every bundle has.
QUANTIZED_PRECISIONS: tuple[Precision, ...] = tuple(p for p in Precision if p is not Precision.fp32)
# The quantizers that make each of them.
QUANTIZERS: dict[Precision, tuple[Quantizer, ...]] = {
    Precision.int8: (Quantizer.auto, Quantizer.modelopt, Quantizer.ort),
    Precision.fp16: (Quantizer.auto, Quantizer.modelopt, Quantizer.onnxconverter),
}


@dataclass(frozen=True)
class QuantizeSettings:
    """Resolved quantization settings; stored verbatim in the bundle manifest."""

    precision: Precision = Precision.int8
    method: CalibrationMethod = CalibrationMethod.max
    samples: int = 512
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    per_channel: bool = True
    symmetric_activations: bool = True
    # TensorRT takes float biases (int32 bias Q/DQ is not parsed); ORT CPU alone may want them.
    quantize_bias: bool = False
    quantizer: Quantizer = Quantizer.auto
    seed: int = 0

    def __post_init__(self) -> None:
        # Settings also take the plain strings (benchmarks, tests); they hold the enums.
        object.__setattr__(self, "precision", Precision.parse(self.precision, "precision"))
        object.__setattr__(self, "method", CalibrationMethod.parse(self.method, "calibration method"))
        object.__setattr__(self, "quantizer", Quantizer.parse(self.quantizer, "quantizer"))
        if self.precision not in QUANTIZED_PRECISIONS:
            raise ThzEdgeError(
                f"{self.precision} is the reference every bundle has; quantize makes "
                f"{' or '.join(QUANTIZED_PRECISIONS)}"
            )
        if self.quantizer not in QUANTIZERS[self.precision]:
            raise ThzEdgeError(
                f"--quantizer {self.quantizer} does not make {self.precision} variants; "
                f"use {', '.join(QUANTIZERS[self.precision])}"
            )
        bad = [k for k in self.keep_float if k not in KEEP_FLOAT_CHOICES]
        if bad:
            raise ThzEdgeError(
                f"unknown --keep-float entry {bad[0]!r}; use a comma list of {', '.join(KEEP_FLOAT_CHOICES)}"
            )
        if self.samples < 1:
            raise ThzEdgeError(f"--samples must be at least 1, got {self.samples}")


# --------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationSet:
    """Conditioned model inputs for calibration, with what is known about each frame."""

    inputs: np.ndarray  # [N,1,64,64] float32 in [0,1]
    postures: np.ndarray | None  # [N] int ground-truth posture, when the source knows it
    concealed: np.ndarray | None  # [N] bool, when the source knows it
    source: str  # "dataset" | "mcap" | "npy"
    path: str

    @property
    def sha256(self) -> str:
        """Content hash of the calibration tensors (what the manifest records)."""
        return hashlib.sha256(np.ascontiguousarray(self.inputs, dtype=np.float32).tobytes()).hexdigest()

    def coverage(self) -> dict[str, Any]:
        """Counts per posture and per concealment (None where the source does not say)."""
        out: dict[str, Any] = {"frames": int(len(self.inputs))}
        if self.postures is not None:
            out["per_posture"] = {POSTURES[k]: int(np.sum(self.postures == k)) for k in range(len(POSTURES))}
        if self.concealed is not None:
            out["concealed"] = int(np.sum(self.concealed))
            out["unconcealed"] = int(np.sum(~self.concealed))
        return out


class CalibrationFeeds:
    """A rewindable iterator of `{input_name: array}` feeds, in batches.

    The same object feeds ONNX Runtime (`get_next` / `rewind`, its CalibrationDataReader
    protocol), Model Optimizer (`as_dict`) and plain Python loops (`for feed in feeds`).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch: int = 16) -> None:
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError("calibration arrays must have the same number of samples")
        self._arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
        self._n = lengths.pop()
        self._batch = max(1, batch)
        self._pos = 0

    def __len__(self) -> int:
        return self._n

    @property
    def batch(self) -> int:
        return self._batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Return the next feed, or None when exhausted (ONNX Runtime's reader protocol)."""
        if self._pos >= self._n:
            return None
        sl = slice(self._pos, self._pos + self._batch)
        self._pos += self._batch
        return {k: v[sl] for k, v in self._arrays.items()}

    def rewind(self) -> None:
        """Start again from the first sample."""
        self._pos = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.rewind()
        while (feed := self.get_next()) is not None:
            yield feed

    def as_dict(self) -> dict[str, np.ndarray]:
        """All samples at once, keyed by input name (Model Optimizer's `calibration_data`)."""
        return dict(self._arrays)


def load_calibration_set(
    path: Path,
    samples: int,
    seed: int = 0,
    profile: Path | None = None,
    exclude: Collection[Path] = (),
) -> CalibrationSet:
    """Load conditioned calibration inputs from a dataset dir, a folder of MCAP recordings or an .npy.

    `exclude` lists crop files to leave out (the gate's held-out images, when calibration and
    gate data come from the same dataset directory).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"calibration data {path} does not exist; pass a dataset dir, MCAP folder or .npy")
    if path.is_file() and path.suffix == ".npy":
        return _calibration_from_npy(path, samples, seed)
    if path.is_file() and path.suffix == ".mcap":
        return _calibration_from_mcap([path], samples, seed, profile, path)
    if path.is_dir():
        skip = {Path(p).resolve() for p in exclude}
        pngs = sorted(p for p in path.rglob("*.png") if p.resolve() not in skip)
        if pngs:
            return _calibration_from_dataset(path, pngs, samples, seed)
        mcaps = sorted(path.rglob("*.mcap"))
        if mcaps:
            return _calibration_from_mcap(mcaps, samples, seed, profile, path)
    raise DataError(
        f"{path} holds no research-format PNG crops, no .mcap recordings and is not an .npy; "
        "pass one of those as --calibration"
    )


def _as_nchw(arr: np.ndarray, where: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1:] != (1, 64, 64):
        raise DataError(f"{where}: expected conditioned inputs [N,64,64] or [N,1,64,64], got {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
        raise DataError(f"{where}: conditioned inputs must be finite and in [0,1]")
    return arr


def _subsample(n: int, samples: int, seed: int, strata: np.ndarray | None = None) -> np.ndarray:
    """Pick up to `samples` indices, stratified so every stratum keeps its share (at least one)."""
    if n <= samples:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if strata is None:
        return np.sort(rng.choice(n, size=samples, replace=False))
    keys = np.unique(strata)
    per = max(1, samples // len(keys))
    chosen: list[np.ndarray] = []
    for k in keys:
        idx = np.flatnonzero(strata == k)
        chosen.append(rng.choice(idx, size=min(per, len(idx)), replace=False))
    out = np.concatenate(chosen)
    if len(out) < samples:  # fill the remainder from what is left, uniformly
        rest = np.setdiff1d(np.arange(n), out)
        out = np.concatenate([out, rng.choice(rest, size=min(samples - len(out), len(rest)), replace=False)])
    return np.sort(out[:samples])


def _calibration_from_npy(path: Path, samples: int, seed: int) -> CalibrationSet:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {path} as a numpy array: {exc}") from exc
    arr = _as_nchw(arr, str(path))
    idx = _subsample(len(arr), samples, seed)
    return CalibrationSet(arr[idx], None, None, "npy", str(path))


def _calibration_from_dataset(root: Path, pngs: Sequence[Path], samples: int, seed: int) -> CalibrationSet:
    names, postures, concealed = [], [], []
    for p in pngs:
        try:
            crop = parse_crop_name(p.name)
        except DataError:
            continue  # a stray PNG (preview, figure) is not a crop; skip it
        names.append(p)
        postures.append(crop.posture)
        concealed.append(crop.concealed)
    if not names:
        raise DataError(
            f"{root}: no PNG is named like a research crop (<id>_b<k>b_<n>.png / <id>_n<k>n_<n>.png)"
        )
    post = np.asarray(postures, dtype=np.int64)
    conc = np.asarray(concealed, dtype=bool)
    idx = _subsample(len(names), samples, seed, strata=post * 2 + conc)
    inputs = np.stack([load_crop(names[i]) for i in idx])[:, None].astype(np.float32)
    return CalibrationSet(_as_nchw(inputs, str(root)), post[idx], conc[idx], "dataset", str(root))


def _calibration_from_mcap(
    files: Sequence[Path], samples: int, seed: int, profile: Path | None, root: Path
) -> CalibrationSet:
    """Condition recorded raw frames exactly as the daemon does (same function, same profile).

    The profile is `--profile` when given, else the one attached to each recording (as the
    recorder stores it); without either, frames are conditioned uncorrected, with a warning.
    """
    given = CalibrationProfile.load(profile) if profile is not None else None
    frames: list[tuple[np.ndarray, CalibrationProfile | None]] = []
    for f in files:
        reader = RecordingReader(f)
        raw = [rec.item.data for rec in reader if not isinstance(rec.item, MalformedFrame)]
        # The daemon's rule: the given profile, else the one the recording carries, else none.
        prof = resolve_profile(given, reader).profile
        if prof is None:
            log.warning(
                "%s has no calibration profile attached and no --profile was given: its frames are "
                "conditioned without dark/gain/bad-pixel correction",
                f.name,
            )
        # Whether a frame can be conditioned depends on its shape alone: trying the first frame
        # of each shape refuses a recording that does not fit its profile, sampled or not.
        first: dict[tuple[int, ...], np.ndarray] = {}
        for r in raw:
            first.setdefault(r.shape, r)
        for r in first.values():
            calibrate_and_condition(r, prof)
        frames += [(r, prof) for r in raw]
    if not frames:
        raise DataError(f"{root}: the recordings hold no frames")
    # Condition only the frames the subsample keeps (a recording folder may hold thousands).
    idx = _subsample(len(frames), samples, seed)
    arr = _as_nchw(np.stack([calibrate_and_condition(*frames[i]) for i in idx]), str(root))
    return CalibrationSet(arr, None, None, "mcap", str(root))


def check_coverage(cal: CalibrationSet, routed_postures: np.ndarray) -> list[str]:
    """Return problems with posture/concealment coverage (empty when every class is present)."""
    problems = []
    post = cal.postures if cal.postures is not None else routed_postures
    missing = [POSTURES[k] for k in range(len(POSTURES)) if not np.any(post == k)]
    if missing:
        label = "ground-truth" if cal.postures is not None else "predicted"
        problems.append(f"no calibration frame with {label} posture {', '.join(missing)}")
    if cal.concealed is not None:
        if not cal.concealed.any():
            problems.append("no concealed frame in the calibration set")
        if cal.concealed.all():
            problems.append("no unconcealed frame in the calibration set")
    return problems


# --------------------------------------------------------------------------------------------
# Graph helpers
# --------------------------------------------------------------------------------------------


def graph_io_names(onnx_path: Path) -> tuple[list[str], list[str]]:
    """Input names (without initializers) and output names of an ONNX graph."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits], [o.name for o in m.graph.output]


def _producers(model: Any) -> dict[str, Any]:
    return {out: node for node in model.graph.node for out in node.output}


def _ancestors(model: Any, tensor: str) -> set[str]:
    """Names of the nodes that the tensor depends on."""
    prod = _producers(model)
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        node = prod.get(t)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.input)
    return seen


def _ensure_node_names(model: Any) -> None:
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def nodes_to_keep_float(model: Any, keep_float: Sequence[str], embedding_output: str | None) -> list[str]:
    """Node names that stay in float for the `keep_float` choices.

    `embedding`: the nodes that only the embedding output depends on (the verification head:
    Linear, BN, ReLU, Linear, L2 normalisation), i.e. its ancestors minus those the other
    outputs share. `sigmoid`: every Sigmoid node (the reconstruction's last op) and the conv
    feeding it. `stem`: the
    first convolution on the graph input and its activation. `latent`: the spatial reduction
    and head trunk, i.e. what the embedding depends on but no skip feature does.
    """
    names: set[str] = set()
    outputs = [o.name for o in model.graph.output]
    if "embedding" in keep_float and embedding_output is not None and embedding_output in outputs:
        emb = _ancestors(model, embedding_output)
        shared: set[str] = set()
        for o in outputs:
            if o != embedding_output:
                shared |= _ancestors(model, o)
        names |= emb - shared
    if "latent" in keep_float and embedding_output is not None and embedding_output in outputs:
        # The 4x4 spatial reduction to the latent and everything after it on the way to the
        # embedding: what the embedding depends on but no skip feature does (~2 % of the MACs).
        feats: set[str] = set()
        for o in outputs:
            if o not in (embedding_output, "posture_logits"):
                feats |= _ancestors(model, o)
        names |= _ancestors(model, embedding_output) - feats
    if "sigmoid" in keep_float:
        # The Sigmoid and the conv feeding it: quantizing the logits would leave the
        # reconstruction ~256 levels however the Sigmoid itself runs (16->1 channels: cheap).
        prod = _producers(model)
        for n in model.graph.node:
            if n.op_type == "Sigmoid":
                names.add(n.name)
                src = prod.get(n.input[0])
                if src is not None and src.op_type == "Conv":
                    names.add(src.name)
    if "stem" in keep_float:
        # The first conv on the raw input (and its activation): the [0,1] dB image is the
        # tensor symmetric int8 resolves worst, and the layer is ~1% of the encoder's MACs.
        inputs = {i.name for i in model.graph.input}
        for node in model.graph.node:
            if node.op_type == "Conv" and node.input[0] in inputs:
                names.add(node.name)
                names |= {n.name for n in model.graph.node
                          if n.op_type in ("LeakyRelu", "Relu") and n.input[0] == node.output[0]}  # fmt: skip
    return sorted(names)


def lint_qdq_for_tensorrt(onnx_path: Path, max_opset: int | None = None) -> list[str]:
    """Problems that would make TensorRT reject or mis-handle a Q/DQ graph (empty list: fine).

    TensorRT's ONNX parser needs zero-point 0 on every QuantizeLinear/DequantizeLinear and
    signed int8 (or fp8) quantized types; the opset must not exceed the target parser's.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    problems: list[str] = []
    consts = {i.name: i for i in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t
    for node in m.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) < 3 or not node.input[2]:
            continue  # no zero-point input: zero by definition (uint8 default only for Q without zp)
        zp = consts.get(node.input[2])
        if zp is None:
            problems.append(f"{node.name}: zero-point is not a constant")
            continue
        arr = numpy_helper.to_array(zp)
        if arr.dtype not in (np.int8,):
            problems.append(f"{node.name}: quantized type {arr.dtype} (TensorRT needs signed int8)")
        if np.any(arr != 0):
            problems.append(f"{node.name}: zero-point {arr.ravel()[:4].tolist()} is not 0 (asymmetric)")
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if max_opset is not None and opset > max_opset:
        problems.append(f"opset {opset} is newer than the target parser's {max_opset}")
    return problems


def count_qdq(onnx_path: Path) -> dict[str, int]:
    """Count QuantizeLinear / DequantizeLinear nodes (reported in the manifest)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    q = sum(n.op_type == "QuantizeLinear" for n in m.graph.node)
    dq = sum(n.op_type == "DequantizeLinear" for n in m.graph.node)
    return {"quantize_linear": q, "dequantize_linear": dq}


def modelopt_available() -> bool:
    """Whether NVIDIA Model Optimizer's ONNX quantizer imports here."""
    try:
        return importlib.util.find_spec("modelopt.onnx.quantization") is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# INT8 (explicit Q/DQ)
# --------------------------------------------------------------------------------------------

# Ops worth quantizing for TensorRT and for ORT CPU's integer kernels. Concat/LeakyRelu/Add get
# Q/DQ on both sides so TensorRT can fuse them into int8 regions instead of bouncing to float.
INT8_OP_TYPES = (
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "LeakyRelu", "Relu",
    "MaxPool", "AveragePool", "GlobalAveragePool", "DepthToSpace", "Resize",
)  # fmt: skip


def quantize_onnx_int8(
    src: Path,
    dst: Path,
    feeds: CalibrationFeeds,
    settings: QuantizeSettings,
    nodes_to_exclude: Sequence[str] = (),
) -> str:
    """Write an explicit Q/DQ INT8 copy of `src` to `dst`; return which quantizer made it."""
    use_modelopt = settings.quantizer is Quantizer.modelopt or (
        settings.quantizer is Quantizer.auto
        and settings.method is not CalibrationMethod.percentile
        and modelopt_available()
    )
    if settings.quantizer is Quantizer.modelopt and not modelopt_available():
        raise MissingDependencyError(
            "NVIDIA Model Optimizer is not installed; pip install 'nvidia-modelopt[onnx]' in an export venv, "
            "or use --quantizer ort"
        )
    if use_modelopt:
        _quantize_modelopt(src, dst, feeds, settings, nodes_to_exclude)
        quantizer = "modelopt"
    else:
        _quantize_ort(src, dst, feeds, settings, nodes_to_exclude)
        quantizer = "onnxruntime"
    _dedicate_quantize_nodes(dst)
    problems = lint_qdq_for_tensorrt(dst)
    if problems:
        raise QuantizationError(
            f"{dst.name}: the Q/DQ graph is not TensorRT-compatible: {problems[0]} "
            f"(+{len(problems) - 1} more); this is a bug in the quantizer settings"
        )
    return quantizer


def _dedicate_quantize_nodes(path: Path) -> None:
    """Give every consumer of a quantized tensor its own QuantizeLinear (same scale, same math).

    ONNX Runtime's quantizer shares one Q between, e.g., a stage's first conv and its shortcut.
    A shared Q is not converted to ORT's fast u8 form on x86, so those convs stayed float
    (DQ->Conv->Q) in the optimised CPU graph; with a Q each, all of them become QLinearConv
    (the ORT session must then not merge them back: see edge/backends/ort.py). TensorRT reads
    the same scales either way.
    """
    import onnx
    from onnx import helper

    m = onnx.load(str(path))
    g = m.graph
    users: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    nodes = []
    changed = False
    for n in g.node:
        nodes.append(n)
        if n.op_type != "QuantizeLinear":
            continue
        for k, u in enumerate(users.get(n.output[0], [])[1:], start=1):
            out = f"{n.output[0]}__q{k}"
            nodes.append(helper.make_node("QuantizeLinear", list(n.input), [out], name=f"{n.name}__q{k}"))
            u.input[:] = [out if i == n.output[0] else i for i in u.input]
            changed = True
    if changed:
        del g.node[:]
        g.node.extend(nodes)
        onnx.save(m, str(path))


def _quantize_ort(
    src: Path, dst: Path, feeds: CalibrationFeeds, settings: QuantizeSettings, nodes_to_exclude: Sequence[str]
) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {
        "max": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[settings.method]
    with tempfile.TemporaryDirectory(prefix="thzedge-q-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Shape inference + constant folding first, as ORT's docs ask; keep names stable.
        m = onnx.load(str(src))
        _ensure_node_names(m)
        named = Path(tmp) / "named.onnx"
        onnx.save(m, str(named))
        quant_pre_process(str(named), str(pre), skip_symbolic_shape=True)
        if settings.method != "max" and feeds.batch != 1:
            # ORT's histogram collectors stack per-batch outputs and fail on a short last batch.
            feeds = CalibrationFeeds(feeds.as_dict(), batch=1)
        feeds.rewind()
        # ORT's histogram calibrators print progress to stdout, which carries results here.
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(
                str(pre),
                str(dst),
                feeds,  # duck-types CalibrationDataReader
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(INT8_OP_TYPES),
                per_channel=settings.per_channel,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(nodes_to_exclude),
                calibrate_method=method,
                extra_options={
                    "ActivationSymmetric": settings.symmetric_activations,
                    "WeightSymmetric": True,
                    # TensorRT takes float biases; int32 bias Q/DQ (ORT's default) is not parsed.
                    "QuantizeBias": settings.quantize_bias,
                    # One Q/DQ pair per consumer, so each DQ->op->Q unit stands alone for pattern
                    # matching (no measurable change in ORT CPU fusions on this network).
                    "DedicatedQDQPair": True,
                    # Entropy/percentile histograms: keep them modest so calibration stays fast on a CPU.
                    "CalibNumBins": 2048 if settings.method == "percentile" else 512,
                    "CalibPercentile": 99.99,
                },
            )
    feeds.rewind()


def _quantize_modelopt(
    src: Path, dst: Path, feeds: CalibrationFeeds, settings: QuantizeSettings, nodes_to_exclude: Sequence[str]
) -> None:  # pragma: no cover - Model Optimizer is not installed in CI (docs/quantization.md)
    from modelopt.onnx.quantization import quantize

    quantize(
        onnx_path=str(src),
        quantize_mode="int8",
        calibration_data=feeds.as_dict(),
        calibration_method=settings.method,
        calibration_eps=["cpu"],
        nodes_to_exclude=list(nodes_to_exclude) or None,
        op_types_to_exclude=["Sigmoid"] if "sigmoid" in settings.keep_float else None,
        # fp32, not the fp16 default: avoids the ORT CPU parity trap (reference §10) and keeps
        # the graph buildable on every TensorRT generation.
        high_precision_dtype="fp32",
        output_path=str(dst),
    )


# --------------------------------------------------------------------------------------------
# FP16
# --------------------------------------------------------------------------------------------


def convert_onnx_fp16(src: Path, dst: Path, settings: QuantizeSettings) -> str:
    """Write an FP16 copy of `src` (float32 I/O kept); return which converter made it.

    This is the strongly-typed form TensorRT 11 requires and TensorRT 10 accepts with
    STRONGLY_TYPED; TensorRT 8.6 builds it too (fp16 weights) with the FP16 flag.
    """
    try:
        have_autocast = importlib.util.find_spec("modelopt.onnx.autocast") is not None
    except (ImportError, ValueError):
        have_autocast = False
    if settings.quantizer is Quantizer.modelopt and not have_autocast:
        raise MissingDependencyError(
            "NVIDIA Model Optimizer is not installed; pip install 'nvidia-modelopt[onnx]' in an export venv, "
            "or use --quantizer onnxconverter"
        )
    if settings.quantizer in (Quantizer.auto, Quantizer.modelopt) and have_autocast:  # pragma: no cover
        from modelopt.onnx.autocast import convert_to_mixed_precision

        model = convert_to_mixed_precision(onnx_path=str(src), low_precision_type="fp16", keep_io_types=True)
        import onnx

        onnx.save(model, str(dst))
        return "modelopt-autocast"
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise MissingDependencyError(
            "FP16 conversion needs onnxconverter-common (pip install onnxconverter-common) "
            "or NVIDIA Model Optimizer (pip install 'nvidia-modelopt[onnx]')"
        ) from exc
    import onnx

    model = onnx.load(str(src))
    # Sigmoid and the L2 normalisation stay in fp32 when asked (same sensitivity as INT8).
    block = []
    if "sigmoid" in settings.keep_float:
        block.append("Sigmoid")
    if "embedding" in settings.keep_float:
        block += ["ReduceL2", "LpNormalization", "Div", "Sqrt", "ReduceSum", "Pow"]
    # keep_io_types=True mis-types graphs whose outputs are also consumed inside (feat1..feat3
    # are both outputs and inputs of the next stage), so convert everything, then put float32
    # casts on the graph boundary ourselves.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(
            model, keep_io_types=False, op_block_list=block + list(float16.DEFAULT_OP_BLOCK_LIST)
        )
    _summarise_fp16_warnings(src.name, caught)
    onnx.save(_float32_boundary(converted), str(dst))
    return "onnxconverter-common"


# onnxconverter-common says "the float32 number X will be truncated to Y" once per tensor edge.
_TRUNCATED = re.compile(r"the float32 number (\S+) will be truncated to (\S+)")


def _summarise_fp16_warnings(graph: str, caught: Sequence[warnings.WarningMessage]) -> None:
    """Log the converter's per-tensor truncation warnings as one line; pass any other warning on."""
    clamped: list[float] = []
    for w in caught:
        m = _TRUNCATED.search(str(w.message))
        if m is None:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        else:
            clamped.append(float(m.group(1)))
    if not clamped:
        return
    tiny = [v for v in clamped if abs(v) < 1.0]
    huge = [v for v in clamped if abs(v) >= 1.0]
    parts = []
    if tiny:
        parts.append(f"{len(tiny)} below fp16's smallest 1e-07 (down to {min(tiny, key=abs):.2g})")
    if huge:
        parts.append(f"{len(huge)} above fp16's largest 65504 (up to {max(huge, key=abs):.3g})")
    log.info(
        "fp16 %s: weights clamped to the fp16 range in %d place(s): %s; the accuracy gate "
        "measures the effect",
        graph,
        len(clamped),
        ", ".join(parts),
    )


def _float32_boundary(model: Any) -> Any:
    """Give an fp16 graph float32 inputs and outputs via Cast nodes at its edges."""
    from onnx import TensorProto, helper

    g = model.graph
    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
    new_nodes = []
    for inp in g.input:
        if inp.type.tensor_type.elem_type != f16:
            continue
        inner = f"{inp.name}__fp16"
        for node in g.node:
            node.input[:] = [inner if i == inp.name else i for i in node.input]
        new_nodes.append(helper.make_node("Cast", [inp.name], [inner], to=f16, name=f"{inp.name}_to_fp16"))
        inp.type.tensor_type.elem_type = f32
    tail = []
    for out in g.output:
        if out.type.tensor_type.elem_type != f16:
            continue
        inner = f"{out.name}__fp16"
        for node in g.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
            node.input[:] = [inner if i == out.name else i for i in node.input]
        tail.append(helper.make_node("Cast", [inner], [out.name], to=f32, name=f"{out.name}_to_fp32"))
        out.type.tensor_type.elem_type = f32
    nodes = new_nodes + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    return model


# --------------------------------------------------------------------------------------------
# Bundle-level quantization
# --------------------------------------------------------------------------------------------


@dataclass
class QuantizedGraph:
    """One written variant graph and how it was made."""

    graph: str  # "encoder" or the posture name of a decoder
    path: Path
    source_sha256: str
    quantizer: str
    calibration_frames: int
    qdq: dict[str, int] = field(default_factory=dict)
    kept_float: list[str] = field(default_factory=list)


@dataclass
class QuantizeResult:
    """Everything `quantize_bundle` produced (files in a staging dir until the gate passes)."""

    precision: str
    settings: QuantizeSettings
    graphs: list[QuantizedGraph]
    calibration: dict[str, Any]

    def manifest_entry(self) -> dict[str, Any]:
        """The JSON-ready provenance of this variant (settings, calibration set, per-graph facts)."""
        return {
            "settings": asdict(self.settings),
            "calibration": self.calibration,
            "graphs": {
                g.graph: {
                    "source_sha256": g.source_sha256,
                    "quantizer": g.quantizer,
                    "calibration_frames": g.calibration_frames,
                    "qdq": g.qdq,
                    "kept_float": g.kept_float,
                }
                for g in self.graphs
            },
        }


def encoder_outputs(encoder: Path, inputs: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    """Run the FP32 encoder over `inputs` and return every output, concatenated."""
    sess = cpu_session(encoder)
    in_name = sess.get_inputs()[0].name
    outs: dict[str, list[np.ndarray]] = {}
    names = [o.name for o in sess.get_outputs()]
    for i in range(0, len(inputs), batch):
        res = sess.run(names, {in_name: inputs[i : i + batch]})
        for n, r in zip(names, res, strict=True):
            outs.setdefault(n, []).append(r)
    return {n: np.concatenate(v) for n, v in outs.items()}


def route_for_decoders(
    predicted: np.ndarray, truth: np.ndarray | None, n_postures: int, min_frames: int = MIN_FRAMES_PER_DECODER
) -> dict[int, np.ndarray]:
    """Frame indices per decoder: those whose predicted posture routes to it (as at run time).

    A decoder that too few frames route to is topped up with frames of that ground-truth
    posture when known, else with all frames, so its ranges are not set by a handful of
    samples. Returned in the manifest as counts.
    """
    routes: dict[int, np.ndarray] = {}
    n = len(predicted)
    for k in range(n_postures):
        idx = np.flatnonzero(predicted == k)
        if len(idx) < min(min_frames, n):
            extra = np.flatnonzero(truth == k) if truth is not None else np.arange(n)
            if len(np.union1d(idx, extra)) < min(min_frames, n):
                extra = np.arange(n)
            idx = np.union1d(idx, extra)
        routes[k] = idx
    return routes


def quantize_graphs(
    encoder: Path,
    decoders: Mapping[str, Path],
    cal: CalibrationSet,
    settings: QuantizeSettings,
    out_dir: Path,
    embedding_output: str = "embedding",
    posture_output: str = "posture_logits",
) -> QuantizeResult:
    """Quantize an encoder and its posture decoders into `out_dir` (files named `<stem>.<precision>.onnx`).

    `decoders` maps posture name (in class-index order) to the decoder's FP32 ONNX.
    """
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    prec = settings.precision
    enc_out = encoder_outputs(encoder, cal.inputs)
    if posture_output not in enc_out:
        raise BundleError(f"{encoder.name} has no output {posture_output!r}; outputs are {sorted(enc_out)}")
    predicted = enc_out[posture_output].argmax(axis=1)
    problems = check_coverage(cal, predicted)
    if problems:
        raise DataError(
            f"calibration set {cal.path} does not cover the model's inputs: {'; '.join(problems)}; "
            "use data with all five postures, concealed and unconcealed"
        )
    posture_names = list(decoders)
    routes = route_for_decoders(predicted, cal.postures, len(posture_names))
    calibration = {
        "sha256": cal.sha256,
        "source": cal.source,
        "path": cal.path,
        "coverage": cal.coverage(),
        "routing": f"predicted posture (FP32 encoder), topped up below {MIN_FRAMES_PER_DECODER} frames",
        "frames_per_decoder": {posture_names[k]: int(len(v)) for k, v in routes.items()},
    }
    graphs: list[QuantizedGraph] = []

    def _dst(src: Path) -> Path:
        return out_dir / f"{src.stem}.{prec}.onnx"

    enc_in, _ = graph_io_names(encoder)
    jobs: list[tuple[str, Path, CalibrationFeeds, int]] = [
        ("encoder", encoder, CalibrationFeeds({enc_in[0]: cal.inputs}), len(cal.inputs))
    ]
    for k, (name, dec) in enumerate(decoders.items()):
        dec_in, _ = graph_io_names(dec)
        missing = [n for n in dec_in if n not in enc_out]
        if missing:
            raise BundleError(
                f"decoder {dec.name} needs {missing}, which the encoder does not output ({sorted(enc_out)})"
            )
        idx = routes[k]
        jobs.append((name, dec, CalibrationFeeds({n: enc_out[n][idx] for n in dec_in}), len(idx)))

    for graph, src, feeds, n in jobs:
        dst = _dst(src)
        if prec == "int8":
            model = onnx.load(str(src))
            _ensure_node_names(model)  # the names _quantize_ort gives the graph it quantizes
            keep = nodes_to_keep_float(model, settings.keep_float, embedding_output)
            quantizer = quantize_onnx_int8(src, dst, feeds, settings, keep)
            qdq = count_qdq(dst)
        else:
            keep = []
            quantizer = convert_onnx_fp16(src, dst, settings)
            qdq = {}
        log.info("quantized %s -> %s (%s, %d frames)", src.name, dst.name, quantizer, n)
        graphs.append(QuantizedGraph(graph, dst, sha256_file(src), quantizer, n, qdq, keep))
    return QuantizeResult(prec, settings, graphs, calibration)


def dumps(obj: Any) -> str:
    """Stable JSON for manifests and reports."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------
# Quantize, gate, add to the bundle
# --------------------------------------------------------------------------------------------


def add_variant(
    bundle_dir: Path,
    precision: str,
    graph_files: Mapping[str, Path],
    entry: Mapping[str, Any],
    report: Any | None = None,
) -> None:
    """Add a variant's graphs to a bundle (export.bundle_writer) and, if given, its gate report.

    Graphs go to `<precision>/<graph>.onnx` with sha256 entries, so `Bundle.open` verifies them
    like the fp32 graphs. The report is stored in the manifest (`accuracy_gates[precision]`,
    covered by the bundle id) and, with its rendered table, in `<precision>/gate_report.json`.
    """
    bundle_dir = Path(bundle_dir)
    write_variant(bundle_dir, precision, graph_files, info=entry, replace=True)
    if report is None:
        return
    set_accuracy_gate(bundle_dir, precision, report.to_dict())
    # JSON (packaged with the bundle like the manifest) holding the report and its table.
    rel = f"{precision}/gate_report.json"
    doc = {"table": report.render().splitlines(), **report.to_dict()}
    (bundle_dir / rel).write_text(dumps(doc) + "\n", encoding="utf-8")
    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest["files"][rel] = file_entry(bundle_dir, rel)
    manifest["variants"][precision]["gate"] = {"passed": report.passed, "report": rel}
    save_manifest(bundle_dir, manifest)


@dataclass
class QuantizeOutcome:
    """What `quantize_bundle` did: the gate report, and whether the variant was added."""

    precision: str
    added: bool
    report: Any  # export.gate.GateReport
    result: QuantizeResult


def quantize_bundle(
    bundle_path: Path,
    calibration: Path,
    settings: QuantizeSettings,
    data_dir: Path,
    triplets_csv: Path,
    tolerances: Any | None = None,
    target_far: float | None = None,
    profile: Path | None = None,
    speed_seconds: float = 1.0,
) -> QuantizeOutcome:
    """Quantize a bundle, run the accuracy gate on a scratch copy, and add the variant if it passes."""
    bundle = Bundle.open(bundle_path)
    exclude: list[Path] = []
    try:
        for t in read_triplets(triplets_csv, data_dir=data_dir):
            exclude.extend((t.anchor, t.positive, t.negative))
    except (DataError, OSError):
        pass  # the gate reports a missing CSV itself, with a clearer message
    cal = load_calibration_set(calibration, settings.samples, settings.seed, profile, exclude=exclude)
    decoders = {name: bundle.decoder_file(k) for k, name in enumerate(bundle.postures)}
    with tempfile.TemporaryDirectory(prefix="thzedge-quantize-") as tmp:
        staged = Path(tmp) / "staged"
        result = quantize_graphs(bundle.encoder_file("fp32"), decoders, cal, settings, staged)
        graph_files = {"encoder": result.graphs[0].path}
        for k, g in enumerate(result.graphs[1:]):
            graph_files[f"decoder_{k}"] = g.path
        entry: dict[str, Any] = {
            "precision": settings.precision,
            "quantization": result.manifest_entry(),
        }
        # The gate runs on a scratch copy so the real bundle changes only if the variant passes.
        work = Path(tmp) / "bundle"
        shutil.copytree(bundle.path, work, ignore=shutil.ignore_patterns("engines", ".*"))
        add_variant(work, settings.precision, graph_files, entry)
        report = run_gate(work, settings.precision, data_dir, triplets_csv, tolerances, target_far,
                          speed_seconds=speed_seconds)  # fmt: skip
        if report.passed:
            chosen = report.threshold
            entry["verification"] = {
                "threshold": chosen["threshold"],
                "metric": "euclidean",
                "method": chosen["method"],
                "chosen_on": {"data": chosen["data"], "n_pairs": chosen["n_pairs"], "eer": chosen["eer"],
                              "far_target": chosen["far_target"],
                              "fp32_threshold_same_data": chosen["reference"]},
            }  # fmt: skip
            add_variant(bundle.path, settings.precision, graph_files, entry, report=report)
    return QuantizeOutcome(settings.precision, report.passed, report, result)
