"""Calibration on the simulator, scored against its truth: every figure docs/calibration.md quotes.

    PYTHONPATH=. python benchmarks/calibration_figures.py [--seeds 0 1 2] [--dark 64 --flat 32]
        [--eval] [--report-dir DIR]

1. For each seed: dark + two flat levels captured over a real socket from `thzedge scanner serve`
   (`sim?seed=S&defects=full`), a profile built from those captures alone, then scored against
   the simulator's true maps: bad-pixel recall/precision per class, dark and gain error against
   the read-noise limit, DSNU/PRNU before and after correction.
2. `calibrate check`: ten undrifted checks (minutes after calibration), a +3 °C and a 10 % gain drift.
3. The input monitor's and the frame-quality check's cost per frame.
4. `--eval`: the demo model on raw simulated frames (seed 1, as docs/demo-model.md) conditioned
   with the estimated profile, the true profile and no profile, side by side.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calibration.build import build_profile  # noqa: E402
from calibration.capture import capture_set_from_frames, read_capture, record_capture  # noqa: E402
from calibration.check import Verdict, check_capture_against  # noqa: E402
from calibration.profile import BadPixelClass, CalibrationProfile  # noqa: E402
from scanner_io.simulator import ScannerSimulator, full_defects_config  # noqa: E402
from scanner_io.sources import open_source  # noqa: E402


def capture_over_socket(uri: str, kind: str, level: float | None, frames: int, out: Path) -> Path:
    """Serve `uri` with `thzedge scanner serve` on an ipc socket and record a capture from it."""
    bind = f"ipc://{out}/s-{kind}-{level}.sock"
    cmd = [sys.executable, "-m", "edge", "scanner", "serve", "--source", uri, "--bind", bind, "--rate", "max"]
    server = subprocess.Popen(
        [*cmd, "--frames", str(frames)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        result = record_capture(bind, kind, frames, out / "captures", level=level, timeout_s=120)
    finally:
        server.wait(60)
    if not result.check.ok:
        raise SystemExit(f"capture refused: {result.check.line()}")
    return result.path


def calibrate_seed(
    seed: int, n_dark: int, n_flat: int, tmp: Path, defects: str = "full"
) -> CalibrationProfile:
    base = f"sim?seed={seed}&defects={defects}"
    paths = [capture_over_socket(f"{base}&scene=dark", "dark", None, n_dark, tmp)]
    for level in (0.5, 1.0):
        paths.append(capture_over_socket(f"{base}&scene=flat&level={level}", "flat", level, n_flat, tmp))
    t0 = time.perf_counter()
    profile = build_profile([read_capture(p) for p in paths])
    print(f"  build: {time.perf_counter() - t0:.2f} s for {n_dark} dark + 2×{n_flat} flat frames")
    return profile


def score(seed: int, profile: CalibrationProfile, n_dark: int, n_flat: int, tmp: Path) -> None:
    sim = ScannerSimulator(seed=seed, config=full_defects_config())
    truth = sim.defect_maps()
    print(f"  {'class':<11} {'true':>5} {'found':>6} {'recall':>7} {'precision':>9}")
    for cls in BadPixelClass:
        t, e = truth[cls.value], profile.class_mask(cls)
        tp = int((t & e).sum())
        print(
            f"  {cls.value:<11} {int(t.sum()):>5} {int(e.sum()):>6} "
            f"{tp / max(t.sum(), 1):>7.3f} {tp / max(e.sum(), 1):>9.3f}"
        )
    dark_cap = read_capture(next((tmp / "captures").glob("dark-*.mcap")))
    maps = sim.sensor_maps(dark_cap.mean_temp_c)
    good = ~maps.bad_pixels
    read = sim.config.read_noise
    err = (profile.dark - maps.dark)[good]
    lim = read / np.sqrt(n_dark)
    print(
        f"  dark error: RMS {err.std():.2f} DN, max {np.abs(err).max():.2f} DN, mean {err.mean():+.3f} DN; "
        f"read-noise limit σ/√N = {lim:.2f} DN (RMS/limit {err.std() / lim:.2f})"
    )
    ratio = profile.gain / maps.gain
    ratio = ratio / np.median(ratio[good])
    lv = profile.qa["flat_levels_dn"]
    glim = read * np.sqrt(2.0 / n_flat) / (lv[1] - lv[0])
    rel = (ratio - 1.0)[good]
    print(
        f"  gain error (relative): RMS {rel.std():.5f}, max {np.abs(rel).max():.5f}; "
        f"read-noise limit {glim:.5f} (RMS/limit {rel.std() / glim:.2f})"
    )
    qa = profile.qa
    b, a = qa["before"], qa["after"]
    for name, unit, key in (("DSNU", "DN", "dsnu_dn"), ("PRNU", "%", "prnu_pct")):
        parts = " ".join(f"{p} {b[key][p]:.3f}→{a[key][p]:.3f}" for p in ("total", "row", "column", "pixel"))
        ratio_ = a[key]["total"] / max(b[key]["total"], 1e-12)
        print(f"  {name} ({unit}) before→after: {parts}  (after/before {ratio_:.4f})")
    print(
        f"  temporal dark noise {b['temporal_dark_noise_dn']:.2f} DN; "
        f"non-linearity {qa['nonlinearity_pct']:.4f} %; "
        f"{100 * qa['bad_pixel_fraction']:.2f} % bad, {len(qa['clusters'])} clusters, columns {qa['columns']}"
    )


def frames_of(uri: str, n: int) -> list:
    src = open_source(uri)
    try:
        return [src.read(1.0) for _ in range(n)]
    finally:
        src.close()


def checks(seed: int, profile: CalibrationProfile, n: int) -> None:
    base = f"sim?seed={seed}&defects=full"
    verdicts = []
    for start in range(0, 300, 30):
        r = check_capture_against(
            profile, capture_set_from_frames("dark", frames_of(f"{base}&scene=dark&start={start}", n))
        )
        verdicts.append(r.verdict)
    for start in range(0, 300, 30):
        cap = capture_set_from_frames("flat", frames_of(f"{base}&scene=flat&level=1&start={start}", n), 1.0)
        verdicts.append(check_capture_against(profile, cap).verdict)
    alarms = sum(v is not Verdict.PASS for v in verdicts)
    print(
        f"  undrifted: {alarms} false alarms in {len(verdicts)} checks "
        "(10 dark + 10 flat, starts 0..270 frames)"
    )
    warm = check_capture_against(
        profile, capture_set_from_frames("dark", frames_of(f"{base}&scene=dark&temp_offset_c=3", n))
    )
    print(f"  +3 °C: {warm.line()}")
    gain = check_capture_against(
        profile,
        capture_set_from_frames("flat", frames_of(f"{base}&scene=flat&level=1&gain_drift=0.1", n), 1.0),
    )
    print(f"  gain +10 %: {gain.line()}")


def costs() -> None:
    from calibration.conditioning import calibrate
    from calibration.monitor import InputMonitor
    from calibration.quality import assess_frame
    from calibration.simulated import true_profile

    sim = ScannerSimulator(seed=0, identities=5)
    profile = true_profile(sim)
    frames = [sim.next_frame().data for _ in range(300)]
    mon = InputMonitor(profile)
    t0 = time.perf_counter()
    c0 = time.process_time()
    for f in frames:
        mon.update(f)
    wall, cpu = (time.perf_counter() - t0) / len(frames), (time.process_time() - c0) / len(frames)
    print(f"  input monitor: {wall * 1e6:.0f} µs/frame wall, {cpu * 1e6:.0f} µs CPU (128×128 uint16)")
    powers = [calibrate(f, profile) for f in frames]
    t0 = time.perf_counter()
    c0 = time.process_time()
    for f, p in zip(frames, powers, strict=True):
        assess_frame(f, p)
    wall, cpu = (time.perf_counter() - t0) / len(frames), (time.process_time() - c0) / len(frames)
    print(f"  frame quality: {wall * 1e6:.0f} µs/frame wall, {cpu * 1e6:.0f} µs CPU")


def evaluate_profiles(tmp: Path, n_dark: int, n_flat: int) -> None:
    from calibration.simulated import CalibratedSimulator, true_profile, write_dataset
    from edge.evaluation import evaluate
    from edge.runner import Runner

    seed, identities, samples = 1, 12, 2
    estimated = calibrate_seed(seed, n_dark, n_flat, tmp / "eval-capture", defects="default")
    sim = ScannerSimulator(seed=seed, identities=identities)
    variants = {
        "estimated (calibrate build)": estimated,
        "true (simulator maps)": true_profile(sim),
        "none (raw counts)": CalibrationProfile.identity(sim.scanner, sim.shape),
    }
    rows = []
    for name, prof in variants.items():
        out = tmp / f"eval-{len(rows)}"
        write_dataset(
            out,
            identities,
            samples,
            seed,
            test_identities=identities,
            simulator=CalibratedSimulator(sim, profile=prof),
        )
        with Runner.from_bundle(REPO / "edge" / "demo_bundle", backend="ort") as runner:
            r = evaluate(runner, out, out / "test.csv").to_dict()["overall"]
        v, p, rec = r["verification"], r["posture"], r["reconstruction"]
        rows.append((name, v["triplet_accuracy"], v["roc_auc"], v["eer"], p["accuracy"], rec["ssim_mean"]))
    print("| profile | triplet accuracy | ROC AUC | EER | posture accuracy | reconstruction SSIM |")
    print("|---|---|---|---|---|---|")
    for name, *vals in rows:
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in vals) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dark", type=int, default=64)
    ap.add_argument("--flat", type=int, default=32)
    ap.add_argument("--check-frames", type=int, default=16)
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--report-dir", type=Path, default=None, help="also write seed 0's report here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="thzedge-calib-bench-") as t:
        tmp = Path(t)
        for seed in args.seeds:
            print(
                f"seed {seed}: {args.dark} dark + 2 levels × {args.flat} flat frames, "
                "over ipc from scanner serve"
            )
            sdir = tmp / f"seed{seed}"
            sdir.mkdir()
            profile = calibrate_seed(seed, args.dark, args.flat, sdir)
            score(seed, profile, args.dark, args.flat, sdir)
            checks(seed, profile, args.check_frames)
            if args.report_dir is not None and seed == args.seeds[0]:
                from calibration.report import write_report

                flat = read_capture(next((sdir / "captures").glob("flat-L1-*.mcap")), max_frames=1)
                write_report(profile, args.report_dir, raw_frame=flat.frames[0])
                print(f"  report written to {args.report_dir}")
        print("costs (one core, numbers include the machine's other load):")
        costs()
        if args.eval:
            print("demo model on raw simulated frames (seed 1, 12 identities × 5 postures × 2 samples):")
            evaluate_profiles(tmp, args.dark, args.flat)


if __name__ == "__main__":
    main()
