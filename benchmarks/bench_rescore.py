"""`thzedge rescore` side by side in one run: local vs Ray Data with 1 and 2 actors; flip rates.

Simulated recordings (each with its true calibration profile) are re-scored with the demo
bundle's INT8 variant against its FP32 variant, on each engine in turn (alternating, `--repeat`
rounds, best time kept; each Ray run includes starting its actors, as a real job does). Rows
of every engine are hashed and must be identical. Then the flip rates of INT8 vs FP32 and of a
deliberately worse bundle (noisy encoder weights) vs FP32.

    .venv/bin/python benchmarks/bench_rescore.py [--recordings 24] [--frames 25] [--repeat 2]

Needs the fleet extra (ray[data], pyarrow) and onnx (export extra) for the worse bundle.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recordings", type=int, default=24)
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads per session")
    args = ap.parse_args()

    import ray

    from edge.bundle import demo_bundle_path
    from edge.fleet import demo
    from edge.fleet.engines import actor_cpus, run_local, run_ray
    from edge.fleet.rescore import ModelSpec, RescoreJob, rows_digest, summarize

    cpus = len(os.sched_getaffinity(0))
    bundle = str(demo_bundle_path())
    with tempfile.TemporaryDirectory(prefix="bench-rescore-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        recs = demo.write_sim_recordings(root / "recs", args.recordings, args.frames)
        gallery = str(demo.enroll_sim_gallery(demo_bundle_path(), root / "g.npz"))
        worse = demo.perturbed_bundle(demo_bundle_path(), root / "worse", scale=0.8)
        worse_gallery = str(demo.enroll_sim_gallery(worse, root / "gw.npz"))
        n = args.recordings * args.frames
        made = time.perf_counter() - t0
        print(f"{args.recordings} recordings x {args.frames} frames = {n} frames ({made:.1f} s to make)")
        base = ModelSpec(bundle, "fp32", gallery=gallery)
        job = RescoreJob(
            model=ModelSpec(bundle, "int8", gallery=gallery), baseline=base, threads=args.threads
        )

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        engines = {
            "local": lambda: run_local(recs, job),
            "ray x1": lambda: run_ray(recs, job, actors=1),
            "ray x2": lambda: run_ray(recs, job, actors=2),
        }
        best: dict[str, float] = {}
        digests: dict[str, str] = {}
        try:
            for _ in range(args.repeat):
                for name, fn in engines.items():
                    t = time.perf_counter()
                    rows = fn()
                    best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
                    digests[name] = rows_digest(rows)
        finally:
            ray.shutdown()
        print(
            f"\n{cpus} CPUs; Ray actors ask for {actor_cpus(cpus, 1, args.threads):g} (x1) / "
            f"{actor_cpus(cpus, 2, args.threads):g} (x2) CPU each; best of {args.repeat}"
        )
        print(f"{'engine':<8} {'seconds':>8} {'frames/s':>9} {'vs local':>9} {'vs ray x1':>10}  rows sha256")
        for name, s in best.items():
            print(
                f"{name:<8} {s:>8.2f} {n / s:>9.1f} {best['local'] / s:>8.2f}x "
                f"{best['ray x1'] / s:>9.2f}x  {digests[name][:16]}"
            )
        same = len(set(digests.values())) == 1
        print(f"rows identical across engines: {same}")

        int8 = run_local(recs, job)
        worse_job = RescoreJob(model=ModelSpec(str(worse), "fp32", gallery=worse_gallery), baseline=base)
        worse_rows = run_local(recs, worse_job)
        print()
        for label, rows, j in (("INT8 vs FP32", int8, job), ("worse vs FP32", worse_rows, worse_job)):
            o = summarize(rows, j, "local").overall
            print(
                f"{label:<14} posture flips {o.posture_flips}/{o.frames} "
                f"({100 * o.posture_flip_rate:.2f} %), "
                f"decision flips {o.decision_flips}/{o.decisions} ({100 * o.decision_flip_rate:.2f} %), "
                f"recon SSIM vs FP32 {o.mean_recon_ssim:.4f}"
            )
        if not same:
            raise SystemExit("engines disagree")


if __name__ == "__main__":
    main()
