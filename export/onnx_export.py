"""Export the deploy graphs of an MTLNetwork to ONNX and check them against PyTorch.

One encoder graph (thz -> embedding, posture_logits, feat1..feat4) and one decoder graph per
posture (feat1..feat4 -> reconstruction), each with a dynamic batch axis "N". The default is
the TorchScript exporter at opset 17, which TensorRT 8.6 (JetPack 6.0) parses; the dynamo
exporter cannot go below opset 18 (tensorrt-and-quantization.md §11). Weights stay inside the
.onnx files (no external data): the graphs are far below 2 GB.

Every export checks itself: `onnx.checker` (full check), then ONNX Runtime against the eval-mode
PyTorch graph on the same inputs at batch 1 and at max batch; a max abs error above 1e-4 (scaled
by the output's magnitude where that exceeds 1, see ParityReport) on any output fails the export.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import DECODER_INPUTS, DECODER_OUTPUT, ENCODER_GRAPH, ENCODER_OUTPUTS, INPUT_NAME, INPUT_SIZE
from edge.bundle import decoder_graph_name as _decoder
from scanner_io.errors import ThzEdgeError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
DEFAULT_MAX_BATCH = 8
PARITY_TOLERANCE = 1e-4
MIN_OPSET, MAX_OPSET = 13, 20  # TorchScript exporter range we support (TRT 8.6 needs <= 17)


class ExportError(ThzEdgeError):
    """An export failed its own checks (ONNX checker or ORT-vs-PyTorch parity); exit 1, nothing written."""


@dataclass
class ParityReport:
    """Max abs error per graph output between ONNX Runtime and PyTorch, over the checked batches.

    An output passes when its max abs error is at most `tolerance` x max(1, max |reference|):
    exactly the absolute tolerance for outputs within [-1, 1] (embedding, reconstruction), and
    relative to the magnitude for larger ones (logits, skip features of a trained network reach
    tens, where float32 kernels that differ only in summation order already differ by ~1e-5).
    """

    tolerance: float
    batches: tuple[int, ...]
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # graph -> output -> max err
    scales: dict[str, dict[str, float]] = field(default_factory=dict)  # graph -> output -> max |ref|

    def limit(self, graph: str, output: str) -> float:
        """The error allowed for one output."""
        return self.tolerance * max(1.0, self.scales.get(graph, {}).get(output, 0.0))

    def record(self, graph: str, output: str, err: float, scale: float) -> None:
        """Fold one comparison into the report (keeps the worst error and largest magnitude)."""
        errs, scales = self.errors.setdefault(graph, {}), self.scales.setdefault(graph, {})
        errs[output] = max(errs.get(output, 0.0), err)
        scales[output] = max(scales.get(output, 0.0), scale)

    @property
    def worst(self) -> float:
        return max((e for outs in self.errors.values() for e in outs.values()), default=0.0)

    def failures(self) -> list[str]:
        """`graph/output` names whose error exceeds their limit."""
        return [
            f"{g}/{o}" for g, outs in self.errors.items() for o, e in outs.items() if e > self.limit(g, o)
        ]

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        return {
            "tolerance": self.tolerance,
            "rule": "max abs error <= tolerance * max(1, max |pytorch output|)",
            "batches": list(self.batches),
            "max_abs_error": {
                g: {o: float(f"{e:.3e}") for o, e in outs.items()} for g, outs in self.errors.items()
            },
            "max_abs_reference": {
                g: {o: float(f"{v:.4g}") for o, v in outs.items()} for g, outs in self.scales.items()
            },
            "passed": self.passed,
        }

    def render(self) -> str:
        """A small table: one row per graph output, with its max abs error, limit and verdict."""
        lines = [
            f"{'graph':<12} {'output':<16} {'max abs err':>12} {'max |ref|':>10} {'limit':>9}  "
            f"(batches {', '.join(map(str, self.batches))})"
        ]
        for g, outs in self.errors.items():
            for o, e in outs.items():
                lim = self.limit(g, o)
                verdict = "ok" if e <= lim else "FAIL"
                lines.append(f"{g:<12} {o:<16} {e:>12.2e} {self.scales[g][o]:>10.3g} {lim:>9.1e}  {verdict}")
        return "\n".join(lines)


def check_opset(opset: int) -> None:
    """Refuse opsets the TorchScript exporter path is not tested with."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ThzEdgeError(
            f"opset {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET} "
            "(17 builds on JetPack 6.0's TensorRT 8.6)"
        )


def _export(
    module: Any, args: tuple[Any, ...], path: Path, inputs: list[str], outputs: list[str], opset: int
) -> None:
    import torch

    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in torch 2.9+ but is the one that emits opset 17.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: {0: "N"} for name in (*inputs, *outputs)},
            do_constant_folding=True,
            external_data=False,
        )


def export_graphs(model: Any, out_dir: Path, opset: int = DEFAULT_OPSET) -> dict[str, str]:
    """Write encoder.onnx and decoder_<k>.onnx for an MTLNetwork; returns graph -> file name."""
    import torch

    check_opset(opset)
    model.eval()
    out_dir = Path(out_dir)
    files: dict[str, str] = {}
    x = torch.rand(2, 1, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoder = model.encoder_graph().eval()
        _export(encoder, (x,), out_dir / "encoder.onnx", [INPUT_NAME], list(ENCODER_OUTPUTS), opset)
        files[ENCODER_GRAPH] = "encoder.onnx"
        feats = encoder(x)[2:]
        for k in range(model.config.num_postures):
            name = f"decoder_{k}.onnx"
            _export(
                model.decoder_graph(k).eval(),
                tuple(feats),
                out_dir / name,
                list(DECODER_INPUTS),
                [DECODER_OUTPUT],
                opset,
            )
            files[_decoder(k)] = name
    return files


def check_graphs(out_dir: Path, files: dict[str, str]) -> None:
    """`onnx.checker.check_model(full_check=True)` on every exported graph."""
    import onnx

    for graph, name in files.items():
        try:
            onnx.checker.check_model(onnx.load(str(Path(out_dir) / name)), full_check=True)
        except Exception as exc:  # onnx raises ValidationError and friends
            raise ExportError(
                f"exported {graph} graph fails the ONNX checker: {str(exc).splitlines()[0]}"
            ) from None


def cpu_session(path: Path) -> Any:
    """Open an ONNX Runtime CPU session for export-time checks (quiet, no spinning threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def check_parity(
    model: Any,
    out_dir: Path,
    files: dict[str, str],
    max_batch: int = DEFAULT_MAX_BATCH,
    tolerance: float = PARITY_TOLERANCE,
    seed: int = 0,
) -> ParityReport:
    """ONNX Runtime vs eval-mode PyTorch on the same inputs at batch 1 and max batch."""
    import torch

    model.eval()
    batches = tuple(sorted({1, max_batch}))
    report = ParityReport(tolerance=tolerance, batches=batches)
    gen = torch.Generator().manual_seed(seed)
    sessions = {g: cpu_session(Path(out_dir) / name) for g, name in files.items()}
    encoder = model.encoder_graph().eval()

    with torch.no_grad():
        for n in batches:
            x = torch.rand(n, 1, INPUT_SIZE, INPUT_SIZE, generator=gen)
            ref = [t.numpy() for t in encoder(x)]
            got = sessions[ENCODER_GRAPH].run(list(ENCODER_OUTPUTS), {INPUT_NAME: x.numpy()})
            for name, r, g in zip(ENCODER_OUTPUTS, ref, got, strict=True):
                report.record(ENCODER_GRAPH, name, float(np.max(np.abs(r - g))), float(np.max(np.abs(r))))
            # Decoders see the real feature distribution: PyTorch's encoder features of x.
            feats = dict(zip(ENCODER_OUTPUTS[2:], ref[2:], strict=True))
            for k in range(model.config.num_postures):
                graph = _decoder(k)
                r = (
                    model.decoder_graph(k)
                    .eval()(*(torch.from_numpy(feats[f]) for f in DECODER_INPUTS))
                    .numpy()
                )
                (g,) = sessions[graph].run([DECODER_OUTPUT], {f: feats[f] for f in DECODER_INPUTS})
                report.record(graph, DECODER_OUTPUT, float(np.max(np.abs(r - g))), float(np.max(np.abs(r))))
    return report
