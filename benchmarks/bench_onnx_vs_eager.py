#!/usr/bin/env python3
"""ONNX Runtime bundle vs PyTorch eager on the research-size network, measured side by side.

One run: build the research-size MTL network (random weights, random BatchNorm statistics),
export it to a bundle with the real exporter, then time, each in its own child process (so
neither runtime's thread pool disturbs the other, see tensorrt-and-quantization.md §10b):

  * eager: the PyTorch deploy path (encoder once, decoder of the predicted posture), eval mode,
    `torch.inference_mode()`;
  * ort:   `edge.runner.Runner` on the bundle (encoder + predicted-posture decoder, input checks
    included), ONNX Runtime CPU.

Per-frame latency at batch 1 (median and p90) and throughput at batch 8, same thread count for
both, then the ratios. The two runtimes alternate in rounds (median over rounds), so on a shared
machine both see the same load; the 1-minute load average is printed with the figures. Usage:

    nice .venv/bin/python benchmarks/bench_onnx_vs_eager.py [--threads 2] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime_timing import random_frames, random_research_network, run_child, time_calls  # noqa: E402


def measure_eager(state_path: str, threads: int, seconds: float) -> dict[str, Any]:
    """Time the PyTorch eager deploy path (run in a child process)."""
    import torch

    from export.model import MTLNetwork

    torch.set_num_threads(threads)
    state = torch.load(state_path, weights_only=True)
    model = MTLNetwork(embedding_dim=128, num_postures=5, width=1.0)
    model.load_state_dict(state)
    model.eval()
    out = {}
    for batch in (1, 8):
        x = torch.from_numpy(random_frames(batch, seed=batch))

        def run(x: Any = x) -> None:
            with torch.inference_mode():
                model(x)  # encoder once, then the decoder of each frame's predicted posture

        out[f"b{batch}"] = time_calls(run, batch, seconds, warmup=5, min_calls=10)
    return {"runtime": f"torch {torch.__version__} eager", "threads": threads, **out}


def measure_ort(bundle: str, threads: int, seconds: float) -> dict[str, Any]:
    """Time the ONNX Runtime bundle through the Runner (run in a child process, no torch)."""
    import onnxruntime

    from edge.runner import Runner

    out = {}
    with Runner.from_bundle(bundle, backend="ort", threads=threads) as runner:
        for batch in (1, 8):
            x = random_frames(batch, seed=batch)
            out[f"b{batch}"] = time_calls(lambda x=x: runner.infer(x), batch, seconds, warmup=5, min_calls=10)
    assert "torch" not in sys.modules, "torch leaked into the ORT timing process"
    return {"runtime": f"onnxruntime {onnxruntime.__version__} CPU", "threads": threads, **out}


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the rounds of one runtime: median of the per-round figures."""
    out: dict[str, Any] = {"runtime": runs[0]["runtime"], "threads": runs[0]["threads"], "rounds": len(runs)}
    for key in ("b1", "b8"):
        out[key] = {
            stat: statistics.median(r[key][stat] for r in runs)
            for stat in ("ms_per_frame", "ms_per_frame_p90", "frames_per_s")
        }
        out[key]["calls"] = sum(r[key]["calls"] for r in runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seconds", type=float, default=10.0, help="timing window per runtime and batch")
    parser.add_argument("--rounds", type=int, default=3, help="alternate eager/ORT this many times")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, arg = args.child
        fn = measure_eager if kind == "eager" else measure_ort
        print(json.dumps(fn(arg, args.threads, args.seconds)))
        return

    import torch

    from export.bundle_writer import write_bundle
    from export.model import count_parameters

    load_before = os.getloadavg()[0]
    model = random_research_network()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.pt"
        torch.save(model.state_dict(), state)
        t0 = time.perf_counter()
        result = write_bundle(model, Path(tmp) / "bundle", variant="bench-random", max_batch=8)
        export_s = time.perf_counter() - t0
        # Alternate the two runtimes in rounds so both see the same (shared-machine) load over time.
        per_round = args.seconds / args.rounds
        eager_runs, ort_runs = [], []
        for _ in range(args.rounds):
            eager_runs.append(run_child(__file__, "eager", str(state), args.threads, per_round))
            ort_runs.append(run_child(__file__, "ort", str(result.bundle.path), args.threads, per_round))
        eager, ort = _combine(eager_runs), _combine(ort_runs)

    report = {
        "network": f"research size, {count_parameters(model):,} parameters, random weights",
        "export_seconds": round(export_s, 1),
        "export_parity_max_abs_error": result.parity.worst,
        "cpu_cores_visible": os.cpu_count(),
        # Shared machines distort both runtimes (eager most): report the load next to the figures.
        "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "eager": eager,
        "ort": ort,
        "speedup_latency_b1": eager["b1"]["ms_per_frame"] / ort["b1"]["ms_per_frame"],
        "speedup_throughput_b8": ort["b8"]["frames_per_s"] / eager["b8"]["frames_per_s"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['network']}; threads {args.threads}; {args.seconds:g} s per runtime and batch "
        f"in {args.rounds} alternating rounds"
    )
    print(f"load average (1 min) before/after: {report['load_average_1m_before_after']}")
    print(f"export + self-check: {export_s:.1f} s, max abs error vs PyTorch {result.parity.worst:.1e}")
    print(
        f"{'runtime':<32} {'b1 ms/frame (median)':>21} {'b1 p90':>8} {'b8 frames/s':>12} {'b8 ms/frame':>12}"
    )
    for r in (eager, ort):
        print(
            f"{r['runtime']:<32} {r['b1']['ms_per_frame']:>21.2f} {r['b1']['ms_per_frame_p90']:>8.2f} "
            f"{r['b8']['frames_per_s']:>12.1f} {r['b8']['ms_per_frame']:>12.2f}"
        )
    print(
        f"ORT vs eager: {report['speedup_latency_b1']:.2f}x at batch 1 (latency), "
        f"{report['speedup_throughput_b8']:.2f}x at batch 8 (throughput); target >= 2.5x at batch 1"
    )


if __name__ == "__main__":
    main()
