"""ONNX Runtime backend: one InferenceSession per bundle graph, CPU everywhere, GPU EPs when present.

Several sessions share a few cores (encoder + one decoder per posture), so every session runs
with intra-op spinning off: spinning pools of idle sessions otherwise fight the running one
and a frame takes more than twice as long (tensorrt-and-quantization.md §10b). Every graph runs
fully optimised by default. The CPU QDQ fusions can change int8 numerics (§10), so the accuracy
gate checks a Q/DQ variant with optimisations off (`optimize=False`) and admits it only when the
optimised run agrees with that (export/gate.py): the daemon then gets the int8 speed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge.backends import Backend
from edge.bundle import Bundle
from scanner_io.errors import BundleError, MissingDependencyError

log = logging.getLogger(__name__)

# Order of preference; only those the installed onnxruntime offers are used.
_GPU_PROVIDERS = ("CUDAExecutionProvider",)
_CPU = "CPUExecutionProvider"


def default_threads() -> int:
    """Intra-op threads per session: the cores this process may use, at most 4 (small graphs)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Execution providers to use: the requested ones that exist, else CUDA (if present) then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise MissingDependencyError(
                f"onnxruntime here lacks {', '.join(missing)} (it has {', '.join(available)}); "
                "install onnxruntime-gpu or drop that provider"
            )
        chosen = list(requested)
    else:
        chosen = [p for p in _GPU_PROVIDERS if p in available]
    if _CPU not in chosen:
        chosen.append(_CPU)
    return chosen


class OrtBackend(Backend):
    """Runs a bundle with ONNX Runtime sessions (all graphs loaded up front, so latency is steady)."""

    name = "ort"

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "fp32",
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        optimize: bool | None = None,
        **_ignored: Any,
    ) -> None:
        super().__init__(bundle, precision)
        try:
            import onnxruntime as ort
        except ImportError as exc:  # a runtime dependency, but say so rather than crash
            raise MissingDependencyError("onnxruntime is not installed; `pip install onnxruntime`") from exc
        self.threads = threads or default_threads()
        self.providers = choose_providers(providers)
        if optimize is None:
            optimize = True  # int8 variants were admitted only if optimised numerics agree (gate)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        level = ort.GraphOptimizationLevel
        opts.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
        opts.log_severity_level = 3  # errors only: ORT warnings are noise in a daemon's journal
        # Q/DQ graphs carry one QuantizeLinear per consumer so ORT fuses every conv to QLinearConv;
        # common-subexpression elimination would merge them back (export/quantize.py).
        disabled = ["CommonSubexpressionElimination"] if precision == "int8" and optimize else []
        self._sessions: dict[str, Any] = {}
        self._outputs: dict[str, list[str]] = {}
        try:
            for graph in self.input_spec:
                # Bytes are re-verified against the manifest sha256 right before they are parsed.
                model = bundle.graph_bytes(graph, precision)
                try:
                    sess = ort.InferenceSession(
                        model, sess_options=opts, providers=self.providers, disabled_optimizers=disabled
                    )
                except Exception as exc:  # ORT raises its own exception types
                    raise BundleError(
                        f"ONNX Runtime cannot load graph {graph} ({precision}) of {bundle.path}: {exc}"
                    ) from None
                self._check_io(graph, sess)
                self._sessions[graph] = sess
                self._outputs[graph] = [o.name for o in sess.get_outputs()]
        except BaseException:
            self._sessions.clear()
            raise
        log.debug("ort: %d sessions, %d threads, %s", len(self._sessions), self.threads, self.providers)

    def _check_io(self, graph: str, sess: Any) -> None:
        spec = self.input_spec[graph]
        have_in = [i.name for i in sess.get_inputs()]
        have_out = [o.name for o in sess.get_outputs()]
        want_in = [t.name for t in spec.inputs]
        want_out = [t.name for t in spec.outputs]
        if sorted(have_in) != sorted(want_in) or sorted(have_out) != sorted(want_out):
            raise BundleError(
                f"graph {graph} of {self.bundle.path} has inputs {have_in} / outputs {have_out}, but the "
                f"manifest says {want_in} / {want_out}; re-export the bundle"
            )

    def _infer(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self._outputs[graph]
        values = self._sessions[graph].run(names, feeds)
        return dict(zip(names, values, strict=True))

    def _close(self) -> None:
        self._sessions.clear()
        self._outputs.clear()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": list(self.providers), "threads": self.threads}
