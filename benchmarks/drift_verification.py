"""Verification while the scanner warms up: a profile made at the start vs a temperature-compensated one.

The simulated sensor warms up by about 3 °C over its first few thousand frames (dark +10 DN/°C
per pixel with a 30 % spread). A profile built at the start of the day corrects the dark of
that moment only; the residual grows with every degree and the model's inputs drift away from
what it was trained on. This measures, per window of a long probe stream, rank-1 and TAR at
FAR 1 % (1:1 over the enrolled people) with three conditionings of the same frames:

- `start`: `calibrate build` on darks + two flat levels taken at the start of the probe session
  (what a site does when it calibrates each morning);
- `dark-tc`: the same plus darks taken after the warm-up, built with `--dark-tc` (the per-pixel
  dark temperature coefficient; the daemon follows each frame header's sensor temperature);
- `oracle`: the sensor's true maps at each frame's temperature (what no calibration can beat).

Enrolment (session 1, `--per-posture` captures of each posture per person) is the same for all
three: benchmarks/gallery_operating_point.py's, conditioned with that session's start profile.
Also prints the in-process cost of `calibrate` per frame with and without compensation,
alternated in one run.

Usage:
    .venv/bin/python benchmarks/drift_verification.py [--seed 7] [--probes 8000] [--window 800]
        [--enrolled 32] [--unenrolled 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import gallery_operating_point as gop  # noqa: E402

from calibration.build import BuildSettings, build_profile  # noqa: E402
from calibration.capture import CaptureKind, CaptureSet, capture_set_from_frames  # noqa: E402
from calibration.conditioning import calibrate, condition  # noqa: E402
from calibration.profile import CalibrationProfile  # noqa: E402
from calibration.simulated import profile_from_sensor_maps, sim_conditioning  # noqa: E402
from edge.bundle import Bundle, demo_bundle_path  # noqa: E402
from edge.evaluation import threshold_at_far  # noqa: E402
from edge.runner import Runner  # noqa: E402
from scanner_io.simulator import ScannerSimulator, SensorMaps  # noqa: E402

WARM_START = 9000  # stream frames: past three warm-up time constants


def scene_capture(
    seed: int, session: int, kind: str, frames: int, start: int = 0, level: float = 1.0
) -> CaptureSet:
    """`frames` calibration-scene frames of the probe session's sensor, from stream frame `start`."""
    sim = ScannerSimulator(seed=seed, session=session, scene=kind, level=level)
    sim.seek(start)
    return capture_set_from_frames(
        CaptureKind(kind), [sim.next_frame() for _ in range(frames)], level if kind == "flat" else None
    )


def built_profiles(seed: int, session: int, dark_frames: int, cond: Any) -> dict[str, CalibrationProfile]:
    """`calibrate build` profiles of the session: from the start only, and with warm darks + --dark-tc."""
    cold = scene_capture(seed, session, "dark", dark_frames)
    warm = scene_capture(seed, session, "dark", dark_frames, start=WARM_START)
    flats = [scene_capture(seed, session, "flat", 32, level=lv) for lv in (0.5, 1.0)]
    return {
        "start": build_profile([cold, *flats], cond),
        "dark-tc": build_profile([cold, warm, *flats], cond, BuildSettings(dark_tc=True)),
    }


def conditioned(raw: gop.Raw, how: str, profiles: dict[str, CalibrationProfile], cond: Any) -> np.ndarray:
    xs = []
    for f in raw.frames:
        if how == "oracle":
            t = f.truth
            maps = SensorMaps(
                scanner="sim0", shape=f.data.shape, dark=t.dark, gain=t.gain, bad_pixels=t.bad_pixels
            )
            power = calibrate(f.data, profile_from_sensor_maps(maps, cond))
        else:
            power = calibrate(f.data, profiles[how], f.header.sensor_temp_c)
        xs.append(condition(power, cond))
    return np.stack(xs).astype(np.float32)[:, None]


def window_figures(
    d: np.ndarray, truth: np.ndarray, n_enrolled: int, temps: np.ndarray, window: int
) -> list[dict[str, Any]]:
    """rank-1 and TAR at FAR 1 % (probes of enrolled people) per window of `window` probes."""
    rows = []
    for w0 in range(0, len(d), window):
        sl = slice(w0, w0 + window)
        dw, tw = d[sl], truth[sl]
        en = tw < n_enrolled
        de, te = dw[en], tw[en]
        r = np.arange(len(te))
        gen = de[r, te]
        mask = np.ones_like(de, bool)
        mask[r, te] = False
        imp = de[mask]
        t1 = threshold_at_far(gen, imp, 0.01)
        rows.append(
            {
                "frames": f"{w0}-{w0 + len(dw) - 1}",
                "sensor_temp_c": float(np.mean(temps[sl])),
                "rank1": float((de.argmin(axis=1) == te).mean()),
                "tar_at_far1": float((gen <= t1).mean()),
            }
        )
    return rows


def calibrate_cost(
    frames: list[Any], profiles: dict[str, CalibrationProfile], rounds: int = 5
) -> dict[str, float]:
    """µs per frame of `calibrate` with each profile, the two alternated `rounds` times (best round)."""
    best = {k: float("inf") for k in profiles}
    for _ in range(rounds):
        for k, prof in profiles.items():
            t0 = time.perf_counter()
            for f in frames:
                calibrate(f.data, prof, f.header.sensor_temp_c)
            best[k] = min(best[k], (time.perf_counter() - t0) / len(frames) * 1e6)
    return best


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    bundle = Bundle.open(Path(args.model) if args.model else demo_bundle_path())
    n_e, n_u = args.enrolled, args.unenrolled
    cond = sim_conditioning((128, 128))
    enrol_raw = gop.enrolment_frames(args.seed, range(n_e), args.per_posture)
    probe_raw = gop.probe_frames(args.seed, n_e + n_u, args.probes)
    profiles = built_profiles(args.seed, gop.PROBE_SESSION, args.dark_frames, cond)
    enrol_profile = gop.session_profile(args.seed, gop.ENROL_SESSION, cond)
    temps = np.array([f.header.sensor_temp_c for f in probe_raw.frames], np.float64)
    out: dict[str, Any] = {"seed": args.seed, "enrolled": n_e, "unenrolled": n_u, "probes": args.probes}
    out["profiles"] = {
        k: {"id": p.profile_id, "format": p.format, **((p.qa or {}).get("dark_tc") or {})}
        for k, p in profiles.items()
    }
    with Runner.from_bundle(bundle, backend="ort") as runner:
        enrol = gop.embed(runner, gop.conditioned(enrol_raw, "session", enrol_profile, cond), enrol_raw)
        windows: dict[str, list[dict[str, Any]]] = {}
        for how in ("start", "dark-tc", "oracle"):
            probes = gop.embed(runner, conditioned(probe_raw, how, profiles, cond), probe_raw)
            d = gop.gallery_distances(bundle, enrol, probes, n_e, None)
            windows[how] = window_figures(d, probe_raw.identity, n_e, temps, args.window)
    out["windows"] = windows
    out["calibrate_us_per_frame"] = calibrate_cost(probe_raw.frames[:1000], profiles)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def render(res: dict[str, Any]) -> str:
    p = res["profiles"]["dark-tc"]
    lines = [
        f"seed {res['seed']}: {res['enrolled']} enrolled (+{res['unenrolled']} unenrolled), "
        f"{res['probes']} probes "
        f"of session {gop.PROBE_SESSION}; dark-tc profile fitted over {p.get('min_c')}–{p.get('max_c')} °C, "
        f"median {p.get('tc_median_dn_per_c', float('nan')):.2f} DN/°C ({res['seconds']} s)",
        f"{'frames':>11} {'sensor °C':>9} | {'rank-1 start':>12} {'dark-tc':>8} {'oracle':>7} | "
        f"{'TAR@1% start':>12} {'dark-tc':>8} {'oracle':>7}",
    ]
    w = res["windows"]
    for i, row in enumerate(w["start"]):
        lines.append(
            f"{row['frames']:>11} {row['sensor_temp_c']:9.2f} | {row['rank1']:12.3f} "
            f"{w['dark-tc'][i]['rank1']:8.3f} {w['oracle'][i]['rank1']:7.3f} | {row['tar_at_far1']:12.3f} "
            f"{w['dark-tc'][i]['tar_at_far1']:8.3f} {w['oracle'][i]['tar_at_far1']:7.3f}"
        )
    c = res["calibrate_us_per_frame"]
    lines.append(
        f"calibrate, µs per frame (in-process, best of 5 alternated): start {c['start']:.1f}, "
        f"dark-tc {c['dark-tc']:.1f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="bundle directory (default: the shipped demo bundle)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--enrolled", type=int, default=32)
    ap.add_argument("--unenrolled", type=int, default=16)
    ap.add_argument("--per-posture", type=int, default=3)
    ap.add_argument("--probes", type=int, default=8000)
    ap.add_argument("--window", type=int, default=800)
    ap.add_argument("--dark-frames", type=int, default=64, help="frames per dark capture (cold, warm)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args)
    print(json.dumps(res, indent=1) if args.json else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
