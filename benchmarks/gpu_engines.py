"""Build, check and time TensorRT engines for a bundle in one go, on a machine with a GPU + TensorRT.

    python benchmarks/gpu_engines.py [--bundle DIR] [--precision fp32,fp16,int8] [--max-batch 8]
                                     [--data DATASET_DIR] [--seconds 5]

For each precision: build one engine per graph (`export.engine`, manifests beside the plans),
load them through the trt backend (which checks the manifests first), compare with the FP32
ONNX Runtime reference on the same inputs (embedding cosine, posture agreement, reconstruction
PSNR), then print `thzedge bench`'s table for ort vs trt. Precisions the bundle cannot build
(no int8 variant on TensorRT 11, ...) are reported and skipped.

Without TensorRT or a GPU it stops at once with one line saying what is missing (exit 69).
It has not been run in CI (no GPU there); see docs/quantization.md for what is verified.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from scanner_io.errors import ThzEdgeError

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="bundle dir (default: the demo bundle)")
    ap.add_argument("--precision", default="fp32,fp16,int8")
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--workspace", type=int, default=1024, help="MB")
    ap.add_argument("--data", type=Path, default=None, help="dataset dir whose crops are the inputs")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    try:
        return run(args)
    except ThzEdgeError as exc:
        print(f"gpu_engines: {exc}", file=sys.stderr)
        return exc.exit_code


def run(args: argparse.Namespace) -> int:
    from edge.backends.trt import current_platform, import_tensorrt
    from edge.bench import bench_inputs, bench_model, render_bench
    from edge.bundle import Bundle, demo_bundle_path
    from edge.evaluation import psnr
    from edge.runner import Runner
    from export.engine import EngineSettings, build_bundle_engines
    from scanner_io.errors import ThzEdgeError

    trt = import_tensorrt()  # one line and exit 69 when missing
    platform = current_platform(trt)
    bundle_path = args.bundle or demo_bundle_path()
    bundle = Bundle.open(bundle_path)
    max_batch = args.max_batch or bundle.max_batch
    print(f"TensorRT {platform.tensorrt_version} on {platform.gpu_name} (sm {platform.compute_capability}), "
          f"bundle {bundle.path} ({', '.join(bundle.precisions)})")  # fmt: skip
    x = bench_inputs(64, data_dir=args.data)
    ref_runner = Runner.from_bundle(bundle, backend="ort", precision="fp32")
    ref = ref_runner.infer(x[:max_batch])
    ref_runner.close()
    built: list[str] = []
    for precision in [p.strip() for p in args.precision.split(",") if p.strip()]:
        settings = EngineSettings(precision, max_batch=max_batch, workspace_mb=args.workspace)
        try:
            mans = build_bundle_engines(bundle.path, settings, trt=trt, platform=platform)
        except ThzEdgeError as exc:
            print(f"{precision}: not built: {exc}")
            continue
        print(f"{precision}: built {len(mans)} engines from the {mans[0]['onnx_variant']} graphs")
        runner = Runner.from_bundle(bundle.path, backend="trt", precision=precision)
        try:
            out = runner.infer(x[:max_batch], postures=ref.posture)
        finally:
            runner.close()
        cos = np.sum(out.embedding * ref.embedding, axis=1)
        p = np.minimum(psnr(out.reconstruction, ref.reconstruction), 100.0)
        print(f"  vs ORT fp32: embedding cosine median {np.median(cos):.5f} min {cos.min():.5f}, "
              f"posture agreement {np.mean(out.posture == ref.posture):.3f}, "
              f"reconstruction PSNR median {np.median(p):.1f} dB")  # fmt: skip
        built.append(precision)
    if not built:
        print("no engine built", file=sys.stderr)
        return 1
    batches = sorted({1, max_batch})
    rows = bench_model(bundle.path, ["ort", "trt"], ["fp32", *[p for p in built if p != "fp32"]], batches,
                       seconds=args.seconds, data_dir=args.data)  # fmt: skip
    print(render_bench(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
