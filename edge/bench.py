"""`thzedge bench`: latency and throughput per backend x precision x batch, with agreement to FP32.

Each combination runs the full per-frame work (encoder, then the decoder of the predicted
posture) through the same `Runner` the daemon uses, for a fixed time after a warm-up. Agreement
is measured on the same inputs against the FP32 ONNX Runtime reference: per-sample embedding
cosine (median, min) and posture argmax agreement. Combinations that cannot run here (no
TensorRT, no engine, no such variant) are listed with the reason instead of failing the bench.

ONNX Runtime runs with graph optimisations on for every precision here (speed); the accuracy
gate checks Q/DQ numerics with them off and states that the two agree (export/gate.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import Bundle
from edge.evaluation import row_cosine
from edge.runner import Runner
from scanner_io.dataset import load_crop
from scanner_io.errors import ThzEdgeError


@dataclass
class BenchRow:
    """One backend x precision x batch measurement (or the reason it was skipped)."""

    backend: str
    precision: str
    batch: int
    p50_ms: float | None = None
    p99_ms: float | None = None
    fps: float | None = None
    cosine_median: float | None = None
    cosine_min: float | None = None
    posture_agreement: float | None = None
    iterations: int = 0
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dict(self.__dict__)


def bench_inputs(n: int, seed: int = 0, data_dir: Path | None = None) -> np.ndarray:
    """Inputs to time and compare on: research crops from `data_dir` if given, else seeded random [0,1]."""
    if data_dir is not None:
        files = sorted(Path(data_dir).rglob("*.png"))[:n]
        if not files:
            raise ThzEdgeError(f"{data_dir}: no PNG crops to benchmark on")
        x = np.stack([load_crop(f) for f in files])[:, None].astype(np.float32)
        return np.resize(x, (n, *x.shape[1:])) if len(x) < n else x
    return np.random.default_rng(seed).random((n, 1, 64, 64), dtype=np.float32)


def _time(runner: Any, x: np.ndarray, seconds: float, min_iters: int = 5) -> list[float]:
    runner.infer(x)  # warm-up: first run allocates arenas and picks kernels
    lat: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(lat) < min_iters or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        runner.infer(x)
        lat.append(time.perf_counter() - t0)
    return lat


def bench_model(
    bundle_path: Path,
    backends: Sequence[str] = ("ort",),
    precisions: Sequence[str] = ("fp32",),
    batches: Sequence[int] = (1, 8),
    seconds: float = 2.0,
    data_dir: Path | None = None,
) -> list[BenchRow]:
    """Measure every backend x precision x batch; see the module docstring."""
    bundle = Bundle.open(bundle_path)
    max_b = max(batches)
    if max_b > bundle.max_batch or min(batches) < 1:
        raise ThzEdgeError(f"batch sizes must be in 1..{bundle.max_batch} (the bundle's max batch)")
    x = bench_inputs(max(32, max_b), data_dir=data_dir)
    ref_runner = Runner.from_bundle(bundle, backend="ort", precision="fp32", optimize=True)
    try:
        ref = ref_runner.infer(x, reconstruct=False)
    finally:
        ref_runner.close()
    rows: list[BenchRow] = []
    for backend in backends:
        for precision in precisions:
            try:
                runner = Runner.from_bundle(bundle, backend=backend, precision=precision, optimize=True)
            except ThzEdgeError as exc:
                rows += [BenchRow(backend, precision, b, skipped=str(exc).split(";")[0]) for b in batches]
                continue
            try:
                out = _infer_all(runner, x)
                cos = row_cosine(ref.embedding, out.embedding)
                agree = float(np.mean(ref.posture == out.posture))
                for b in batches:
                    lat = np.asarray(_time(runner, x[:b], seconds / len(batches)))
                    rows.append(
                        BenchRow(
                            backend=getattr(runner.backend, "name", backend),
                            precision=precision,
                            batch=b,
                            p50_ms=float(np.percentile(lat, 50) * 1e3),
                            p99_ms=float(np.percentile(lat, 99) * 1e3),
                            fps=float(b / lat.mean()),
                            cosine_median=float(np.median(cos)),
                            cosine_min=float(np.min(cos)),
                            posture_agreement=agree,
                            iterations=int(lat.size),
                        )
                    )
            finally:
                runner.close()
    return rows


def _infer_all(runner: Any, x: np.ndarray) -> Any:
    return runner.infer(x, reconstruct=False)


def render_bench(rows: Sequence[BenchRow]) -> str:
    """Plain-text table of bench rows."""
    headers = [
        "backend",
        "precision",
        "batch",
        "p50 ms",
        "p99 ms",
        "frames/s",
        "cos med",
        "cos min",
        "posture agr",
    ]
    body = []
    for r in rows:
        if r.skipped:
            body.append([r.backend, r.precision, str(r.batch), "skipped: " + r.skipped, "", "", "", "", ""])
            continue
        body.append(
            [
                r.backend,
                r.precision,
                str(r.batch),
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                f"{r.fps:.1f}",
                f"{r.cosine_median:.5f}",
                f"{r.cosine_min:.5f}",
                f"{r.posture_agreement:.3f}",
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body if not b[3].startswith("skipped"))) if any(
        not b[3].startswith("skipped") for b in body) else len(h) for i, h in enumerate(headers)]  # fmt: skip

    def fmt(cells: list[str]) -> str:
        if cells[3].startswith("skipped"):
            return "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]), cells[2].rjust(widths[2]),
                              cells[3]])  # fmt: skip
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines = [fmt(headers), "  ".join("-" * w for w in widths), *(fmt(b) for b in body)]
    lines.append("agreement: vs fp32 ONNX Runtime on the same inputs (embedding cosine, posture argmax)")
    return "\n".join(lines)
