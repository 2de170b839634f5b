"""The technician's first run on a new device: check it, build the engines, verify them, time them.

    python benchmarks/gpu_engines.py [--bundle DIR] [--precision fp32,fp16,int8] [--batch 1,8]
                                     [--max-batch N] [--workspace MB] [--dla-core K]
                                     [--engine-cache DIR] [--data DATASET_DIR] [--seconds 3]
                                     [--json-out FILE]

1. Device: on a Jetson, the `thzedge doctor` Jetson checks (edge/jetson.py) — release,
   TensorRT/CUDA and whether they fit, engine cache, device nodes, a tegrastats sample.
2. Build: one engine per graph and precision into the engine cache (export.engine, with the
   progress lines of export/build_progress.py and the Jetson workspace cap).
3. Verify, per output, each precision's TensorRT engines against FP32 ONNX Runtime on the same
   inputs: embedding cosine (min), posture argmax agreement, reconstruction PSNR (median) and
   max |difference|, each against the limit for that precision (`LIMITS`).
4. Time p50/p99 and frames/s per precision x batch (`thzedge bench`'s code) for ORT fp32 and
   every built TensorRT precision.

Prints one table per step and then everything as one JSON document on the last line (also
written to --json-out). Exit 0 when every built precision passes its limits, 1 when one does not
(or none could be built), 69 without TensorRT or a GPU. docs/quantization.md shows the expected
output; nothing here has run on a device yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Per precision: embedding cosine (min), posture agreement, reconstruction PSNR median (dB).
# fp32 engines differ from ORT only by kernel order; fp16/int8 by rounding (the gate's limits).
LIMITS: dict[str, dict[str, float]] = {
    "fp32": {"cosine_min": 0.9999, "agreement": 0.99, "psnr_db": 60.0},
    "fp16": {"cosine_min": 0.999, "agreement": 0.98, "psnr_db": 40.0},
    "int8": {"cosine_min": 0.99, "agreement": 0.95, "psnr_db": 30.0},
}


def main(argv: list[str] | None = None) -> int:
    from scanner_io.errors import ThzEdgeError

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="bundle dir (default: the demo bundle)")
    ap.add_argument("--precision", default="fp32,fp16,int8")
    ap.add_argument("--batch", default="1,8", help="batch sizes to time (at most the max batch)")
    ap.add_argument("--max-batch", type=int, default=None, help="engine profile max (default: bundle's)")
    ap.add_argument("--workspace", type=int, default=None, help="MB (default: the Jetson cap, else 1024)")
    ap.add_argument("--dla-core", type=int, default=None)
    ap.add_argument("--engine-cache", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None, help="dataset dir whose crops are the inputs")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing budget per row")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        return run(args)
    except ThzEdgeError as exc:
        print(f"gpu_engines: {exc}", file=sys.stderr)
        return exc.exit_code


def verify_outputs(precision: str, out: Any, ref: Any) -> list[dict[str, Any]]:
    """One row per output and metric: value, limit, ok (TensorRT `out` vs FP32 ORT `ref`)."""
    from edge.evaluation import psnr

    limits = LIMITS.get(precision, LIMITS["int8"])
    cos = np.sum(out.embedding * ref.embedding, axis=1)
    agree = float(np.mean(out.posture == ref.posture))
    p = np.minimum(psnr(out.reconstruction, ref.reconstruction), 100.0)
    rows = [
        ("embedding", "cosine min", float(cos.min()), limits["cosine_min"]),
        ("posture_logits", "argmax agreement", agree, limits["agreement"]),
        ("reconstruction", "PSNR median (dB)", float(np.median(p)), limits["psnr_db"]),
    ]
    out_rows = [{"precision": precision, "output": o, "metric": m, "value": v, "limit": lim, "ok": v >= lim}
                for o, m, v, lim in rows]  # fmt: skip
    diff = float(np.max(np.abs(out.reconstruction - ref.reconstruction)))
    out_rows.append({"precision": precision, "output": "reconstruction", "metric": "max |diff|",
                     "value": diff, "limit": None, "ok": True})  # fmt: skip
    return out_rows


def render_verify(rows: list[dict[str, Any]]) -> str:
    """The per-output table."""
    lines = [f"{'precision':<10} {'output':<15} {'metric':<19} {'value':>9}  {'limit':<9} ok"]
    for r in rows:
        limit = f">= {r['limit']:g}" if r["limit"] is not None else ""
        lines.append(f"{r['precision']:<10} {r['output']:<15} {r['metric']:<19} {r['value']:>9.4f}  "
                     f"{limit:<9} {'yes' if r['ok'] else 'NO'}")  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from edge.backends.engine_cache import ENGINE_CACHE_ENV, resolve_engine_cache
    from edge.backends.trt import current_platform, import_tensorrt
    from edge.bench import bench_inputs, bench_model, render_bench
    from edge.bundle import Bundle, demo_bundle_path
    from edge.config import load_model_config
    from edge.jetson import jetson_checks
    from edge.runner import Runner
    from export.engine import EngineSettings, build_bundle_engines
    from scanner_io.errors import ThzEdgeError

    trt = import_tensorrt()  # one line and exit 69 when missing
    platform = current_platform(trt)
    cache = resolve_engine_cache(args.engine_cache or load_model_config(None).engine_cache)
    # bench_model opens its runners with the default cache: point it at this one.
    os.environ[ENGINE_CACHE_ENV] = str(cache.root)
    bundle = Bundle.open(args.bundle or demo_bundle_path())
    max_batch = args.max_batch or bundle.max_batch
    batches = sorted({int(b) for b in args.batch.split(",") if b.strip()})
    report: dict[str, Any] = {
        "device": {
            "tensorrt": platform.tensorrt_version,
            "gpu": platform.gpu_name,
            "compute_capability": platform.compute_capability,
            "cuda": platform.cuda_runtime_version,
            "l4t": platform.l4t,
        },  # fmt: skip
        "bundle": {"path": str(bundle.path), "id": bundle.id, "precisions": list(bundle.precisions)},
        "engine_cache": str(cache.root),
    }
    print(
        f"device: L4T {platform.l4t or '-'}, TensorRT {platform.tensorrt_version}, CUDA "
        f"{platform.cuda_runtime_version}, {platform.gpu_name} sm {platform.compute_capability}"
    )
    checks = jetson_checks(engine_cache=cache, python_tensorrt=lambda: platform.tensorrt_version)
    for c in checks:
        print(f"  {c.status.value:<4} {c.name:<17} {c.detail}")
    report["checks"] = [{"name": c.name, "status": c.status.value, "detail": c.detail} for c in checks]

    workspace = EngineSettings("fp32", workspace_mb=args.workspace).with_workspace_for(platform).workspace_mb
    print(f"engine cache {cache.root} ({cache.source}); workspace {workspace} MB")
    x = bench_inputs(max_batch, data_dir=args.data)
    with Runner.from_bundle(bundle, backend="ort", precision="fp32") as ref_runner:
        ref = ref_runner.infer(x)
    built: list[str] = []
    verify: list[dict[str, Any]] = []
    report["builds"] = {}
    for precision in [p.strip() for p in args.precision.split(",") if p.strip()]:
        try:
            settings = EngineSettings(precision, max_batch=max_batch, workspace_mb=args.workspace,
                                      dla_core=args.dla_core)  # fmt: skip
            mans = build_bundle_engines(bundle.path, settings, trt=trt, platform=platform, cache=cache)
        except ThzEdgeError as exc:
            print(f"{precision}: not built: {exc}")
            report["builds"][precision] = {"built": False, "reason": str(exc)}
            continue
        first = mans[0]
        report["builds"][precision] = {
            "built": True,
            "engines": len(mans),
            "onnx_variant": first["onnx_variant"],
            "workspace_mb": first["workspace_mb"],
        }
        with Runner.from_bundle(bundle.path, backend="trt", precision=precision, engine_cache=cache,
                                dla_core=args.dla_core) as runner:  # fmt: skip
            out = runner.infer(x, postures=ref.posture)
        verify += verify_outputs(precision, out, ref)
        built.append(precision)
    report["verify"] = verify
    if verify:
        print(render_verify(verify))
    rows = bench_model(bundle.path, ["ort"], ["fp32"], batches, seconds=args.seconds, data_dir=args.data)
    if built:
        rows += bench_model(bundle.path, ["trt"], built, batches, seconds=args.seconds, data_dir=args.data)
    print(render_bench(rows))
    report["timing"] = [dataclasses.asdict(r) for r in rows]
    ok = bool(built) and all(r["ok"] for r in verify)
    report["passed"] = ok
    text = json.dumps(report, default=str)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n", encoding="utf-8")
    print(text)
    if not built:
        print("gpu_engines: no engine built", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
