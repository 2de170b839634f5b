"""Inference backends: one small lifecycle (load, infer, close) shared by ONNX Runtime and TensorRT.

A backend runs the graphs of one bundle at one precision. The public `infer` holds the shared
policy (is it open, is the graph known, do the feeds match the bundle's tensor specs); each
backend implements `_infer` for the work itself. Backends are built only through
`create_backend`, which imports the TensorRT one lazily so a device without TensorRT still works.

Contract for `edge/backends/trt.py`: it defines
`create(bundle, precision, **options) -> Backend` (raising a ThzEdgeError subclass when no
matching engine exists) and may define `can_run(bundle, precision, **options) -> bool`, which `auto` asks
before choosing TensorRT over ONNX Runtime.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from edge.bundle import Bundle, GraphSpec, TensorSpec
from scanner_io.choices import Choice
from scanner_io.errors import DataError, InternalError, MissingDependencyError, ThzEdgeError

log = logging.getLogger(__name__)


class BackendKind(Choice):
    """Inference backend: auto takes a matching TensorRT engine if there is one, else ONNX Runtime."""

    auto = "auto"
    ort = "ort"
    trt = "trt"


class Backend(ABC):
    """Runs a bundle's graphs: `infer(graph, feeds) -> outputs`; `close()` frees sessions/engines."""

    name: str = "backend"
    # Why `auto` runs this backend instead of the one it preferred (R-NEW-14: said in STATUS).
    fallback_reason: str | None = None

    def __init__(self, bundle: Bundle, precision: str = "fp32") -> None:
        bundle.variant(precision)  # a clear BundleError if the bundle lacks this precision
        self.bundle = bundle
        self.precision = precision
        self.input_spec: dict[str, GraphSpec] = dict(bundle.graphs)
        self.max_batch = bundle.max_batch
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def infer(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph ("encoder" or "decoder_<k>") on named float32 inputs; returns named outputs."""
        if self._closed:
            # Callers own the backend's lifetime: using one after close() is a bug in thzedge.
            raise InternalError(f"{self.name} backend is closed; create a new one with create_backend()")
        spec = self.input_spec.get(graph)
        if spec is None:
            raise DataError(f"unknown graph {graph!r}; this bundle has {', '.join(self.input_spec)}")
        checked = check_feeds(graph, spec, feeds, self.max_batch)
        return self._infer(graph, checked)

    def close(self) -> None:
        """Release sessions or engines; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def _infer(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Backend work: feeds are already validated, C-contiguous float32."""

    @abstractmethod
    def _close(self) -> None:
        """Backend work of close()."""

    def describe(self) -> dict[str, Any]:
        """Short provenance of this backend for logs and results (no tensor data)."""
        return {"backend": self.name, "precision": self.precision, "bundle": self.bundle.id}


def check_feeds(
    graph: str, spec: GraphSpec, feeds: Mapping[str, np.ndarray], max_batch: int
) -> dict[str, np.ndarray]:
    """Check feed names, dtypes and shapes against a graph spec; one batch size in 1..max_batch."""
    expected = [t.name for t in spec.inputs]
    if set(feeds) != set(expected):
        raise DataError(f"graph {graph} takes inputs {expected}, got {sorted(feeds)}")
    out: dict[str, np.ndarray] = {}
    batch: int | None = None
    for t in spec.inputs:
        arr = feeds[t.name]
        if not isinstance(arr, np.ndarray):
            raise DataError(f"{graph} input {t.name} must be a numpy array, got {type(arr).__name__}")
        if arr.dtype != np.dtype(t.dtype):
            raise DataError(f"{graph} input {t.name} must be {t.dtype}, got {arr.dtype}")
        _check_shape(graph, t, arr.shape)
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise DataError(f"{graph} inputs disagree on batch size ({batch} vs {arr.shape[0]} in {t.name})")
        out[t.name] = np.ascontiguousarray(arr)
    assert batch is not None
    if not 1 <= batch <= max_batch:
        raise DataError(f"{graph} batch of {batch} is outside 1..{max_batch} (the bundle's max batch)")
    return out


def _check_shape(graph: str, t: TensorSpec, shape: tuple[int, ...]) -> None:
    want = t.shape
    ok = len(shape) == len(want) and all(
        isinstance(w, str) or w == s for w, s in zip(want, shape, strict=True)
    )
    if not ok:
        shown = "[" + ",".join(str(w) for w in want) + "]"
        raise DataError(f"{graph} input {t.name} must have shape {shown}, got {list(shape)}")


def _trt_module() -> Any | None:
    """The TensorRT backend module, or None when it (or TensorRT itself) is not importable."""
    try:
        return importlib.import_module("edge.backends.trt")
    except ModuleNotFoundError as exc:
        log.debug("TensorRT backend unavailable: %s", exc)
        return None


def create_backend(
    bundle: Bundle, kind: BackendKind | str = BackendKind.auto, precision: str = "fp32", **options: Any
) -> Backend:
    """Build a backend for a bundle: "ort", "trt", or "auto" (TensorRT when it can run, else ORT)."""
    kind = BackendKind.parse(kind, "backend")
    if kind in (BackendKind.trt, BackendKind.auto):
        trt = _trt_module()
        if trt is None:
            if kind is BackendKind.trt:
                raise MissingDependencyError(
                    "the TensorRT backend is not available here (needs TensorRT and a CUDA GPU, "
                    "`pip install thzedge[tensorrt]` or JetPack); use --backend ort"
                )
        else:
            fallback: str | None = None
            can_run = getattr(trt, "can_run", None)
            if kind is BackendKind.trt or can_run is None or can_run(bundle, precision, **options):
                try:
                    return trt.create(bundle, precision, **options)
                except ThzEdgeError as exc:
                    if kind is BackendKind.trt:
                        raise
                    log.warning("TensorRT backend refused (%s); falling back to ONNX Runtime", exc)
                    fallback = f"TensorRT refused: {exc}"
            else:
                fallback = "no TensorRT engine for this device in the engine cache (thzedge export engine)"
            from edge.backends.ort import OrtBackend

            ort = OrtBackend(bundle, precision, **options)
            ort.fallback_reason = fallback
            return ort
    from edge.backends.ort import OrtBackend

    return OrtBackend(bundle, precision, **options)
