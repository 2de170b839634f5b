#!/usr/bin/env python3
"""The research code's inference call (eager PyTorch) beside thzedge's FP32 and INT8 bundles, one run.

One run, research width (1.0), random weights with random BatchNorm statistics:

1. A checkpoint is written in the research trainer's format (`model_state_dict` with the
   research key names, optimizer and scheduler state; tests/model_factory.py) and imported with
   `export.checkpoint.import_checkpoint`, as a user would.
2. **research**: the THz-only model's own forward as its inference script calls it,
   `model(anchor, positive, negative, posture)`: the shared encoder on the concatenated triplet
   (3B images), the encoder on the anchor again for reconstruction, and the decoder of each
   anchor's ground-truth posture by masking (research-model.md §5.2-5.4), eager, eval mode,
   `torch.inference_mode()`. Its per-frame time is per triplet (one anchor frame), since that
   is what one item of the call delivers.
3. **eager deploy**: the same PyTorch weights on thzedge's deploy path (encoder once, decoder of
   the predicted posture), to separate "less work" from "faster runtime".
4. **thzedge fp32 / int8**: bundles exported from the imported checkpoint (`write_bundle`, then
   `export.quantize.quantize_graphs` on simulated conditioned frames; random weights, so this is
   speed only: the accuracy gate is for trained models), run through `edge.runner.Runner`.
5. **batch 1 vs batch 8** (ORT, fp32, encoder + one decoder as raw sessions): the per-frame time
   at both batches under several session settings (intra-op spinning, thread count, graph
   optimisation level), to see what closes the gap.

Each runtime runs in its own child process (thread pools never overlap) with the same thread
count and OMP_WAIT_POLICY=PASSIVE, alternating in rounds, median over rounds; the 1-minute load
average is printed. Usage:

    nice .venv/bin/python benchmarks/bench_research.py [--threads 2] [--seconds 3] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # model_factory: the research checkpoint format

from runtime_timing import random_frames, random_research_network, run_child, time_calls  # noqa: E402

BATCHES = (1, 8)


# --- children -------------------------------------------------------------------------------


def measure_research(checkpoint: str, threads: int, seconds: float) -> dict[str, Any]:
    """The research forward and the eager deploy path, on the imported research checkpoint."""
    import torch

    from export.checkpoint import import_checkpoint

    torch.set_num_threads(threads)
    net = import_checkpoint(Path(checkpoint)).model.eval()

    def research_call(anchor: Any, positive: Any, negative: Any, posture: Any) -> Any:
        # THz-only forward: one encoder pass on the triplet batch, a second on the anchor for
        # reconstruction, decoder by the ground-truth posture (masking inside `decode`).
        b = anchor.shape[0]
        trip = net.encoder(torch.cat([anchor, positive, negative]))
        again = net.encoder(anchor)
        recon = net.decode(again, posture)
        return trip.embedding.split(b), trip.posture_logits.split(b), recon

    out: dict[str, Any] = {"runtime": f"torch {torch.__version__} eager", "threads": threads}
    for batch in BATCHES:
        a, p, n = (torch.from_numpy(random_frames(batch, seed)) for seed in (1, 2, 3))
        posture = torch.arange(batch) % 5

        def research(a: Any = a, p: Any = p, n: Any = n, posture: Any = posture) -> None:
            with torch.inference_mode():
                research_call(a, p, n, posture)

        def deploy(a: Any = a) -> None:
            with torch.inference_mode():
                net(a)  # encoder once, decoder of each frame's predicted posture

        out[f"research_b{batch}"] = time_calls(research, batch, seconds)
        out[f"eager_deploy_b{batch}"] = time_calls(deploy, batch, seconds)
    return out


def measure_thzedge(bundle: str, threads: int, seconds: float) -> dict[str, Any]:
    """thzedge's Runner on the fp32 and int8 variants (no torch in this process)."""
    import onnxruntime

    from edge.runner import Runner

    out: dict[str, Any] = {"runtime": f"onnxruntime {onnxruntime.__version__} CPU", "threads": threads}
    for precision in ("fp32", "int8"):
        with Runner.from_bundle(bundle, backend="ort", precision=precision, threads=threads) as r:
            for batch in BATCHES:
                x = random_frames(batch, seed=batch)
                out[f"{precision}_b{batch}"] = time_calls(lambda x=x, r=r: r.infer(x), batch, seconds)
    assert "torch" not in sys.modules, "torch leaked into the ORT timing process"
    return out


# Session settings tried for the batch-1 gap: (name, spinning, threads factor, optimisation level).
ORT_SETTINGS = (
    ("thzedge default (spin off)", False, 1, "all"),
    ("intra-op spinning on", True, 1, "all"),
    ("1 intra-op thread", False, 0, "all"),
    ("optimisation extended", False, 1, "extended"),
)


def measure_ort_settings(bundle: str, threads: int, seconds: float) -> dict[str, Any]:
    """Encoder + decoder_0 as raw ORT sessions, per frame at batch 1 and 8, per session setting."""
    import onnxruntime as ort

    from edge.bundle import Bundle

    b = Bundle.open(bundle)
    out: dict[str, Any] = {}
    for name, spin, factor, level in ORT_SETTINGS:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads if factor else 1
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        }
        so.graph_optimization_level = levels[level]
        so.log_severity_level = 3
        enc = ort.InferenceSession(b.graph_bytes("encoder"), so, providers=["CPUExecutionProvider"])
        dec = ort.InferenceSession(b.graph_bytes("decoder_0"), so, providers=["CPUExecutionProvider"])
        feats = [i.name for i in dec.get_inputs()]
        row = {}
        for batch in BATCHES:
            x = random_frames(batch, seed=batch)

            def run(x: Any = x, enc: Any = enc, dec: Any = dec, feats: list[str] = feats) -> None:
                names = [v.name for v in enc.get_outputs()]
                o = dict(zip(names, enc.run(None, {"thz": x}), strict=True))
                dec.run(None, {k: o[k] for k in feats})

            row[f"b{batch}"] = time_calls(run, batch, seconds)
        out[name] = row
    return out


CHILDREN = {"research": measure_research, "thzedge": measure_thzedge, "ort_settings": measure_ort_settings}


def _median_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds of every timed entry (nested one level for the settings table)."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, dict) and "ms_per_frame" in value:
            out[key] = {
                s: statistics.median(r[key][s] for r in runs) for s in ("ms_per_frame", "frames_per_s")
            }
        elif isinstance(value, dict):
            out[key] = _median_rounds([r[key] for r in runs])
        else:
            out[key] = value
    return out


def build_artifacts(work: Path) -> tuple[Path, Path, str]:
    """Research-format checkpoint of a random research-width network, and fp32 + int8 bundles from it."""
    import numpy as np
    from bench_int8 import calibration_inputs
    from model_factory import save_research_checkpoint

    from export.bundle_writer import add_variant, write_bundle
    from export.checkpoint import import_checkpoint
    from export.model import count_parameters
    from export.quantize import CalibrationSet, QuantizeSettings, quantize_graphs

    model = random_research_network()
    ckpt = save_research_checkpoint(work / "research.pth", model)
    imported = import_checkpoint(ckpt)
    result = write_bundle(imported.model, work / "bundle", variant="bench-research-random", max_batch=8)
    bundle = result.bundle
    x = calibration_inputs(64, random=False)
    cal = CalibrationSet(inputs=x, postures=np.arange(len(x)) % 5, concealed=None, source="npy", path="sim")
    decoders = {name: bundle.decoder_file(k) for k, name in enumerate(bundle.postures)}
    q = quantize_graphs(bundle.encoder_file("fp32"), decoders, cal, QuantizeSettings(samples=64), work / "q")
    files = {"encoder": q.graphs[0].path, **{f"decoder_{k}": g.path for k, g in enumerate(q.graphs[1:])}}
    add_variant(bundle.path, "int8", files, {"quantization": q.manifest_entry()})
    return ckpt, bundle.path, f"research width, {count_parameters(model):,} parameters, random weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seconds", type=float, default=3.0, help="timing window per entry and round")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the runtimes this many times")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, arg = args.child
        print(json.dumps(CHILDREN[kind](arg, args.threads, args.seconds)))
        return

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_research.") as tmp:
        ckpt, bundle, network = build_artifacts(Path(tmp))
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in CHILDREN}

        def child(kind: str, arg: str) -> dict[str, Any]:
            return run_child(__file__, kind, arg, args.threads, args.seconds, passive_omp=True)

        for _ in range(args.rounds):
            runs["research"].append(child("research", str(ckpt)))
            runs["thzedge"].append(child("thzedge", str(bundle)))
            runs["ort_settings"].append(child("ort_settings", str(bundle)))
    res, thz, settings = (_median_rounds(runs[k]) for k in CHILDREN)
    report: dict[str, Any] = {
        "network": network,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "research": res,
        "thzedge": thz,
        "ort_settings": settings,
        "ratios": {},
    }
    for b in BATCHES:
        r = res[f"research_b{b}"]["ms_per_frame"]
        for p in ("fp32", "int8"):
            report["ratios"][f"research/{p} b{b}"] = r / thz[f"{p}_b{b}"]["ms_per_frame"]
        report["ratios"][f"eager_deploy/fp32 b{b}"] = (
            res[f"eager_deploy_b{b}"]["ms_per_frame"] / thz[f"fp32_b{b}"]["ms_per_frame"]
        )
        report["ratios"][f"fp32/int8 b{b}"] = (
            thz[f"fp32_b{b}"]["ms_per_frame"] / thz[f"int8_b{b}"]["ms_per_frame"]
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{network}; {args.threads} threads; {args.rounds} alternating rounds of {args.seconds:g} s per entry"
    )
    print(
        f"load average (1 min) before/after: {report['load_average_1m_before_after']}"
        f" on {os.cpu_count()} cpus"
    )
    print(f"{'ms per frame (median over rounds)':44} {'batch 1':>9} {'batch 8':>9}")
    rows = [
        ("research model(anchor, positive, negative, posture)", res, "research"),
        ("eager deploy path (encoder once, predicted decoder)", res, "eager_deploy"),
        ("thzedge fp32 (ORT, Runner)", thz, "fp32"),
        ("thzedge int8 (ORT, Runner)", thz, "int8"),
    ]
    for label, src, key in rows:
        print(
            f"{label[:44]:44} {src[f'{key}_b1']['ms_per_frame']:9.2f} {src[f'{key}_b8']['ms_per_frame']:9.2f}"
        )
    for k, v in report["ratios"].items():
        print(f"  ratio {k:38} {v:6.2f}x")
    print("ORT fp32 encoder + decoder_0, raw sessions: ms per frame")
    for name, row in settings.items():
        print(f"  {name:42} {row['b1']['ms_per_frame']:9.2f} {row['b8']['ms_per_frame']:9.2f}"
              f"   b1/b8 {row['b1']['ms_per_frame'] / row['b8']['ms_per_frame']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
