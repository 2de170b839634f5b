"""INT8 (Q/DQ, ONNX Runtime CPU) vs FP32 throughput on the research-size network, in one run.

Random weights (speed only: accuracy is the gate's job on a trained model). The encoder and
one posture decoder are exported with the project's exporter, the INT8 copies are made with
`export.quantize` (TensorRT settings: symmetric int8, per-channel weights, Q/DQ), calibrated on
simulated conditioned frames (or random inputs with --random), and both pipelines (encoder +
decoder, as one frame costs on the device) are timed alternately at the same batch, with ORT
graph optimisations on (speed) and intra-op spinning off. Agreement with FP32 is printed too.

    .venv/bin/python benchmarks/bench_int8.py [--batch 8] [--seconds 10] [--width 1.0]

Target from the issue: INT8 >= 1.5x FP32 frames/s at batch 8.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def calibration_inputs(n: int, random: bool, seed: int = 0) -> np.ndarray:
    """Conditioned simulator frames (all postures, concealed and not), or random [0,1] inputs."""
    if random:
        return np.random.default_rng(seed).random((n, 1, 64, 64), dtype=np.float32)
    from calibration.conditioning import calibrate_and_condition
    from calibration.simulated import true_profile
    from scanner_io.simulator import ScannerSimulator

    sim = ScannerSimulator(seed=seed, identities=10)
    profile = true_profile(sim)
    out = []
    for i in range(n):
        frame = sim.render(identity=i % 10, posture=i % 5, sample=i // 50, concealed=bool(i % 2))
        out.append(calibrate_and_condition(frame.data, profile))
    return np.stack(out)[:, None].astype(np.float32)


def session(path: Path, threads: int, optimize: bool = True, qdq: bool = False):  # -> InferenceSession
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    level = ort.GraphOptimizationLevel
    so.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    # As the ort backend does for Q/DQ graphs: CSE would merge the per-consumer Q nodes again.
    disabled = ["CommonSubexpressionElimination"] if qdq else []
    return ort.InferenceSession(
        str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )


class Pipeline:
    """Encoder then one decoder on the encoder's features: the per-frame work of the daemon."""

    def __init__(self, encoder: Path, decoder: Path, threads: int, qdq: bool = False) -> None:
        self.enc = session(encoder, threads, qdq=qdq)
        self.dec = session(decoder, threads, qdq=qdq)
        self.dec_inputs = [i.name for i in self.dec.get_inputs()]
        self.enc_outputs = [o.name for o in self.enc.get_outputs()]

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = dict(zip(self.enc_outputs, self.enc.run(None, {"thz": x}), strict=True))
        recon = self.dec.run(None, {k: outs[k] for k in self.dec_inputs})[0]
        return outs["embedding"], recon


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0, help="timing per pipeline, alternating rounds")
    ap.add_argument("--width", type=float, default=1.0, help="1.0 = research size")
    ap.add_argument("--samples", type=int, default=128, help="calibration frames")
    ap.add_argument("--method", default="max", choices=("max", "entropy", "percentile"))
    ap.add_argument("--random", action="store_true", help="calibrate on random inputs instead of simulated")
    ap.add_argument("--keep-float", default="embedding,latent,sigmoid", help="as `export quantize`")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()

    import torch

    from export.model import MTLNetwork, count_parameters
    from export.onnx_export import export_graphs
    from export.quantize import CalibrationFeeds, QuantizeSettings, nodes_to_keep_float, quantize_onnx_int8

    torch.manual_seed(0)
    model = MTLNetwork(embedding_dim=128, width=args.width).eval()
    print(f"network: width {args.width}, {count_parameters(model) / 1e6:.1f} M parameters (random weights)")
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        files = export_graphs(model, d)
        enc32, dec32 = d / files["encoder"], d / files["decoder_0"]
        print(f"exported fp32 graphs in {time.perf_counter() - t0:.1f} s")
        del model
        cal = calibration_inputs(args.samples, args.random)
        keep = tuple(k for k in args.keep_float.split(",") if k)
        settings = QuantizeSettings(method=args.method, samples=args.samples, keep_float=keep)
        import onnx

        t0 = time.perf_counter()
        enc8, dec8 = d / "encoder.int8.onnx", d / "decoder_0.int8.onnx"
        keep = nodes_to_keep_float(onnx.load(str(enc32)), settings.keep_float, "embedding")
        quantize_onnx_int8(enc32, enc8, CalibrationFeeds({"thz": cal}), settings, keep)
        ref_enc = session(enc32, args.threads)
        names = [o.name for o in ref_enc.get_outputs()]
        feats = dict(zip(names, ref_enc.run(None, {"thz": cal}), strict=True))
        dec_in = [i.name for i in session(dec32, 1).get_inputs()]
        keep_d = nodes_to_keep_float(onnx.load(str(dec32)), settings.keep_float, None)
        quantize_onnx_int8(dec32, dec8, CalibrationFeeds({k: feats[k] for k in dec_in}), settings, keep_d)
        took = time.perf_counter() - t0
        print(
            f"quantized encoder + decoder ({args.method}, {args.samples} frames, float: {args.keep_float}) "
            f"in {took:.1f} s"
        )

        fp32 = Pipeline(enc32, dec32, args.threads)
        int8 = Pipeline(enc8, dec8, args.threads, qdq=True)
        x = calibration_inputs(args.batch, random=True, seed=1)
        e32, r32 = fp32(x)
        e8, r8 = int8(x)
        cos = np.sum(e32 * e8, axis=1) / np.linalg.norm(e32, axis=1) / np.linalg.norm(e8, axis=1)
        mse = float(np.mean((r32 - r8) ** 2))
        # Alternate short rounds so both see the same machine load (the CPU is shared).
        times = {"fp32": [], "int8": []}
        rounds = 10
        for _ in range(rounds):
            for name, pipe in (("fp32", fp32), ("int8", int8)):
                t_end = time.perf_counter() + args.seconds / rounds
                while True:
                    t0 = time.perf_counter()
                    pipe(x)
                    times[name].append(time.perf_counter() - t0)
                    if time.perf_counter() >= t_end:
                        break
        fps = {k: args.batch / float(np.median(v)) for k, v in times.items()}
        print(f"\nbatch {args.batch}, {args.threads} intra-op threads, ORT graph optimisations on")
        print(f"{'':6}{'frames/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'runs':>6}")
        for k, v in times.items():
            arr = np.asarray(v) * 1e3
            p50, p99 = np.percentile(arr, 50), np.percentile(arr, 99)
            print(f"{k:6}{fps[k]:10.1f}{p50:10.2f}{p99:10.2f}{arr.size:6d}")
        ratio = fps["int8"] / fps["fp32"]
        print(f"INT8 / FP32 throughput: {ratio:.2f}x (target >= 1.5x)")
        psnr = 10 * np.log10(1 / max(mse, 1e-12))
        print(f"agreement on random inputs: embedding cosine median {np.median(cos):.4f} "
              f"min {cos.min():.4f}; reconstruction PSNR vs fp32 {psnr:.1f} dB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
