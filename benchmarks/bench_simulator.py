"""THz simulator and calibrate-and-condition speed, plus the simulator's learnability sanity figures.

Prints, measured in one run on one core (cv2 threads pinned to 1; rates are per CPU-second of
this process, so a machine shared with other jobs still gives one core's figure, wall-clock
rates beside them):
- simulator frames/s: `next_frame()` with the geometry cache warm (steady state) and cold
  (first visit of each identity/posture renders its geometry), and dataset pairs/s
  (`conditioned_pair`: a concealed capture plus a frame-averaged reference capture);
- `calibrate_and_condition` per-frame time for a 128×128 uint16 frame, and its two halves;
- sanity figures on identity-disjoint simulated data (no training involved):
  SSIM of the unconcealed target against the noise-free face (how clean the target is),
  SSIM of the concealed input against the target (how hard reconstruction is),
  a nearest-neighbour identity baseline on raw pixels (concealed probe vs unconcealed gallery of
  the same posture), and a nearest-class-mean posture baseline across identities.

Usage: python benchmarks/bench_simulator.py [--frames N] [--identities N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.conditioning import calibrate, calibrate_and_condition, condition  # noqa: E402
from calibration.simulated import CalibratedSimulator  # noqa: E402
from scanner_io.simulator import ScannerSimulator  # noqa: E402


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM, data range 1, 11×11 gaussian σ 1.5 (valid region), like edge.evaluation."""
    c1, c2 = 0.01**2, 0.03**2
    a, b = a.astype(np.float64), b.astype(np.float64)

    def g(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (11, 11), 1.5)

    ma, mb = g(a), g(b)
    saa, sbb, sab = g(a * a) - ma * ma, g(b * b) - mb * mb, g(a * b) - ma * mb
    m = ((2 * ma * mb + c1) * (2 * sab + c2)) / ((ma * ma + mb * mb + c1) * (saa + sbb + c2))
    return float(m[5:-5, 5:-5].mean())


class _Clock:
    """CPU seconds of this process (what one core delivers, whatever else runs) and wall seconds."""

    def __enter__(self) -> _Clock:
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.cpu0
        self.wall = time.perf_counter() - self.wall0


def bench_speed(frames: int) -> dict[str, float]:
    sim = ScannerSimulator(seed=0, identities=20)
    with _Clock() as cold:
        for _ in range(frames):
            sim.next_frame()
    for i in range(20):  # warm the geometry cache: every identity in every posture
        for p in range(5):
            sim._geometry(i, p)
    with _Clock() as warm:
        for _ in range(frames):
            sim.next_frame()
    n_pairs = max(20, frames // 4)
    cal_sim = CalibratedSimulator(sim)
    with _Clock() as pairs:
        for k in range(n_pairs):
            cal_sim.conditioned_pair(k % 20, k % 5, 1000 + k)
    fresh = ScannerSimulator(seed=0, identities=30)
    with _Clock() as geo:
        for i in range(20, 30):
            fresh._geometry(i, 0)  # includes the identity's surface (shared by its 5 postures)

    raws = [sim.next_frame().data for _ in range(50)]
    prof = cal_sim.profile
    powers = [calibrate(r, prof) for r in raws]
    reps = 40
    with _Clock() as cc:
        for _ in range(reps):
            for r in raws:
                calibrate_and_condition(r, prof)
    with _Clock() as cal:
        for _ in range(reps):
            for r in raws:
                calibrate(r, prof)
    with _Clock() as cond:
        for _ in range(reps):
            for pw in powers:
                condition(pw, prof.conditioning)
    n = reps * len(raws)
    return {
        "sim_frames_per_cpu_s_warm": frames / warm.cpu,
        "sim_frames_per_wall_s_warm": frames / warm.wall,
        "sim_frames_per_cpu_s_cold": frames / cold.cpu,
        "dataset_pairs_per_cpu_s": n_pairs / pairs.cpu,
        "geometry_ms_cpu_first_posture": geo.cpu / 10 * 1e3,
        "calibrate_and_condition_us_cpu": cc.cpu / n * 1e6,
        "calibrate_and_condition_us_wall": cc.wall / n * 1e6,
        "calibrate_us_cpu": cal.cpu / n * 1e6,
        "condition_us_cpu": cond.cpu / n * 1e6,
        "load_average_1min": os.getloadavg()[0],
    }


def bench_sanity(identities: int, samples: int = 4) -> dict[str, float]:
    # Identities 1000+ were never part of any default training set (test-like, unseen people).
    first = 1000
    sim = CalibratedSimulator(ScannerSimulator(seed=0, identities=first + identities))
    n, p_n = identities, 5
    x = np.zeros((n, p_n, samples, 64, 64), np.float32)
    y = np.zeros_like(x)
    s_target, s_input = [], []
    for i in range(n):
        for p in range(p_n):
            for s in range(samples):
                xi, yi, roi = sim.conditioned_pair(first + i, p, s + 1)
                x[i, p, s], y[i, p, s] = xi, yi
                if s == 0:
                    s_target.append(ssim(yi, sim.clean_target(first + i, p, s + 1, roi)))
                    s_input.append(ssim(xi, yi))
    correct = total = 0
    for p in range(p_n):
        gallery = y[:, p, 0].reshape(n, -1)
        for s in range(1, samples):
            probe = x[:, p, s].reshape(n, -1)
            d = ((probe[:, None] - gallery[None]) ** 2).sum(-1)
            correct += int((d.argmin(1) == np.arange(n)).sum())
            total += n
    half = n // 2
    means = x[:half].mean(axis=(0, 2)).reshape(p_n, -1)
    probes = x[half:].reshape(-1, 64 * 64)
    labels = np.tile(np.repeat(np.arange(p_n), samples), n - half)
    d = ((probes[:, None] - means[None]) ** 2).sum(-1)
    return {
        "ssim_target_vs_noise_free_mean": float(np.mean(s_target)),
        "ssim_target_vs_noise_free_min": float(np.min(s_target)),
        "ssim_concealed_vs_target_mean": float(np.mean(s_input)),
        "nn_identity_accuracy_raw_pixels": correct / total,
        "nn_identity_chance": 1.0 / n,
        "posture_nearest_mean_accuracy": float((d.argmin(1) == labels).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--identities", type=int, default=16, help="identities for the sanity figures")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    res = bench_speed(args.frames) | bench_sanity(args.identities)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    load = res["load_average_1min"]
    print(f"THz simulator (one core: rates per CPU-second; 1-min load average {load:.1f})")
    print(
        f"  next_frame, geometry cached     {res['sim_frames_per_cpu_s_warm']:8.0f} frames/s "
        f"(wall {res['sim_frames_per_wall_s_warm']:.0f})"
    )
    print(f"  next_frame, cold (first visits) {res['sim_frames_per_cpu_s_cold']:8.0f} frames/s")
    print(f"  conditioned_pair (dataset)      {res['dataset_pairs_per_cpu_s']:8.0f} pairs/s")
    print(f"  geometry, first posture of a new identity {res['geometry_ms_cpu_first_posture']:.0f} ms")
    print("calibrate_and_condition (128×128 uint16 → 64×64 float32)")
    print(
        f"  total                           {res['calibrate_and_condition_us_cpu']:8.0f} µs/frame "
        f"(wall {res['calibrate_and_condition_us_wall']:.0f})"
    )
    print(
        f"  calibrate | condition           {res['calibrate_us_cpu']:8.0f} | {res['condition_us_cpu']:.0f} µs"
    )
    print(f"sanity on {args.identities} unseen identities (no training)")
    print(
        f"  SSIM target vs noise-free face  {res['ssim_target_vs_noise_free_mean']:.3f} "
        f"(min {res['ssim_target_vs_noise_free_min']:.3f})"
    )
    print(f"  SSIM concealed input vs target  {res['ssim_concealed_vs_target_mean']:.3f}")
    print(
        f"  NN identity, raw pixels         {res['nn_identity_accuracy_raw_pixels']:.3f} "
        f"(chance {res['nn_identity_chance']:.3f})"
    )
    print(f"  posture nearest class mean      {res['posture_nearest_mean_accuracy']:.3f} (chance 0.200)")


if __name__ == "__main__":
    main()
