"""Measure gallery verification with a bundle on simulated people it never saw: which matching
rule and which enrolment capture make the stored threshold work.

Setup (the daemon's path): `ScannerSimulator(seed=SEED)` frames go through
`calibrate_and_condition` with the simulator's true calibration profile
(`calibration.simulated.true_profile`), then through the bundle's encoder (ONNX Runtime, fp32).
The demo bundle was trained on seed 0, so any other seed gives new heads and a new sensor
pattern.

- Enrolment, per identity: one capture per posture (5 frames; `--enrol-samples K` takes K
  samples per posture) rendered at the calibration temperature, either **concealed**
  (`render(..., concealed=True)`, what a scanner sees at a checkpoint), **unconcealed**
  (`render(..., concealed=False)`, one single-look capture without clothing) or
  **unconcealed-avg** (the frame-averaged unconcealed capture, `capture(reference=True)`: the
  kind of image the research positive / reconstruction target is). Each reference keeps the
  posture the model predicts for it. `--enrol-postures 0,1` enrols only those postures (to
  measure the fallback of rule c).
- Probes (never enrolled): **stream** = concealed `next_frame()` captures (random visits and
  postures, pose jitter, sensor temperature drift; `--probes` frames from stream start plus
  `--warm-probes` after `seek(6000)`, a warmed-up sensor), and **render** = concealed renders of
  samples 1..2 of every identity and posture (calibration temperature).
- Rules: (a) `mean` distance to the re-normalised mean of all references (gallery format 1),
  (b) `nearest` reference, (c) `posture`: the reference(s) of the probe's predicted posture
  (nearest of them), falling back to the nearest reference when that posture is not enrolled.
  `gallery` runs rule (c) through `edge.gallery.Gallery` itself (the shipped code), to check
  it gives the same numbers.
- Figures per (enrolment, rule, probes): genuine mean distance, genuine accept rate (GAR) and
  impostor accept rate (FAR, 1:1 claims of every other enrolled identity) at the threshold,
  EER; 1:N: share of genuine probes identified correctly / as someone else at the threshold.

`--calibrate-seed S` additionally derives an EER threshold for rule (c) + the chosen enrolment on
simulator seed S (validation people, disjoint from SEED's figures) and reports SEED's figures at it.

Usage:
    .venv/bin/python benchmarks/gallery_operating_point.py [--model BUNDLE] [--seed 7]
        [--identities 12] [--probes 300] [--warm-probes 100] [--calibrate-seed 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibration.conditioning import calibrate_and_condition  # noqa: E402
from calibration.simulated import true_profile  # noqa: E402
from edge.bundle import Bundle, demo_bundle_path  # noqa: E402
from edge.evaluation import equal_error_rate, threshold_at_eer  # noqa: E402
from edge.runner import Runner  # noqa: E402
from scanner_io.frame import POSTURES  # noqa: E402
from scanner_io.simulator import ScannerSimulator  # noqa: E402

ENROLMENTS = ("concealed", "unconcealed", "unconcealed-avg")
RULES = ("mean", "nearest", "posture")


@dataclass
class Embedded:
    """Embeddings [N, D], predicted postures [N] and true identities [N] of a set of captures."""

    emb: np.ndarray
    posture: np.ndarray
    identity: np.ndarray


def _embed(runner: Runner, xs: list[np.ndarray], ids: list[int]) -> Embedded:
    x = np.stack(xs).astype(np.float32)[:, None]
    r = runner.infer(x, reconstruct=False)
    return Embedded(np.asarray(r.embedding, np.float32), np.asarray(r.posture), np.asarray(ids))


def enrolment_set(
    sim: ScannerSimulator,
    profile: Any,
    runner: Runner,
    kind: str,
    identities: int,
    samples: int,
    postures: tuple[int, ...],
) -> Embedded:
    """Conditioned and embedded enrolment captures: `samples` per (identity, posture), sample 0.."""
    xs, ids = [], []
    for i in range(identities):
        for p in postures:
            for s in range(samples):
                # Enrolment samples are numbered from 100 so they never coincide with probe renders.
                n = 100 + s
                if kind == "unconcealed-avg":
                    raw = sim.capture(i, p, n, concealed=False, reference=True).raw
                else:
                    raw = sim.render(i, p, n, concealed=(kind == "concealed")).data
                xs.append(calibrate_and_condition(raw, profile, profile.conditioning))
                ids.append(i)
    return _embed(runner, xs, ids)


def probe_sets(
    seed: int, identities: int, profile: Any, runner: Runner, probes: int, warm_probes: int
) -> dict[str, Embedded]:
    """The concealed probe sets: a drifting stream and renders of other samples."""
    sim = ScannerSimulator(seed=seed, identities=identities)
    xs, ids = [], []
    for start, count in ((0, probes), (6000, warm_probes)):
        if count <= 0:
            continue
        sim.seek(start)
        for _ in range(count):
            f = sim.next_frame()
            xs.append(calibrate_and_condition(f.data, profile, profile.conditioning))
            ids.append(f.truth.identity)
    out = {"stream": _embed(runner, xs, ids)}
    rsim = ScannerSimulator(seed=seed, identities=identities)
    xs, ids = [], []
    for i in range(identities):
        for p in range(len(POSTURES)):
            for s in (1, 2):
                xs.append(
                    calibrate_and_condition(
                        rsim.render(i, p, s, concealed=True).data, profile, profile.conditioning
                    )
                )
                ids.append(i)
    out["render"] = _embed(runner, xs, ids)
    return out


def distance_matrix(enrol: Embedded, probes: Embedded, rule: str, identities: int) -> np.ndarray:
    """Distance [P, I] of each probe to each identity under `rule`."""
    d = np.full((len(probes.identity), identities), np.inf, np.float32)
    for i in range(identities):
        mask = enrol.identity == i
        refs, rpost = enrol.emb[mask], enrol.posture[mask]
        if rule == "mean":
            m = refs.mean(axis=0)
            m = m / np.linalg.norm(m)
            d[:, i] = np.linalg.norm(probes.emb - m[None], axis=1)
            continue
        all_d = np.linalg.norm(probes.emb[:, None, :] - refs[None, :, :], axis=2)  # [P, k]
        if rule == "nearest":
            d[:, i] = all_d.min(axis=1)
        else:  # posture, fallback to nearest
            same = rpost[None, :] == probes.posture[:, None]  # [P, k]
            masked = np.where(same, all_d, np.inf).min(axis=1)
            d[:, i] = np.where(same.any(axis=1), masked, all_d.min(axis=1))
    return d


def gallery_distance_matrix(enrol: Embedded, probes: Embedded, bundle: Bundle, identities: int) -> np.ndarray:
    """The same matrix through `edge.gallery.Gallery` (the shipped rule), for cross-checking."""
    from edge.gallery import Gallery

    g = Gallery.for_bundle(bundle)
    names = [f"p{i:03d}" for i in range(identities)]
    for i, name in enumerate(names):
        m = enrol.identity == i
        g.enroll(name, enrol.emb[m], postures=enrol.posture[m])
    order = [g.identities.index(n) for n in names]
    rows = [g.distances(e, posture=int(p))[order] for e, p in zip(probes.emb, probes.posture, strict=True)]
    return np.stack(rows).astype(np.float32)


def figures(d: np.ndarray, truth: np.ndarray, t: float) -> dict[str, float]:
    """GAR / FAR at `t`, EER, genuine/impostor mean distance and 1:N outcomes."""
    p = np.arange(len(truth))
    gen = d[p, truth]
    mask = np.ones_like(d, bool)
    mask[p, truth] = False
    imp = d[mask]
    best = d.argmin(axis=1)
    hit = d[p, best] <= t
    return {
        "genuine_mean": float(gen.mean()),
        "impostor_mean": float(imp.mean()),
        "impostor_min": float(imp.min()),
        "gar": float((gen <= t).mean()),
        "far": float((imp <= t).mean()),
        "eer": float(equal_error_rate(gen, imp)),
        "id_correct": float((hit & (best == truth)).mean()),
        "id_wrong": float((hit & (best != truth)).mean()),
        "n_genuine": int(gen.size),
        "n_impostor": int(imp.size),
    }


def genuine_impostor(d: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.arange(len(truth))
    mask = np.ones_like(d, bool)
    mask[p, truth] = False
    return d[p, truth], d[mask]


def run(args: argparse.Namespace) -> dict[str, Any]:
    bundle = Bundle.open(Path(args.model) if args.model else demo_bundle_path())
    t = float(args.threshold if args.threshold is not None else bundle.threshold("fp32"))
    postures = (
        tuple(int(p) for p in args.enrol_postures.split(","))
        if args.enrol_postures
        else tuple(range(len(POSTURES)))
    )
    runner = Runner.from_bundle(bundle, backend="ort")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        sim = ScannerSimulator(seed=args.seed, identities=args.identities)
        profile = true_profile(sim)
        probes = probe_sets(args.seed, args.identities, profile, runner, args.probes, args.warm_probes)
        enrols = {
            k: enrolment_set(sim, profile, runner, k, args.identities, args.enrol_samples, postures)
            for k in ENROLMENTS
        }
        for kind, enrol in enrols.items():
            acc = float(
                (enrol.posture == np.tile(np.repeat(postures, args.enrol_samples), args.identities)).mean()
            )
            for rule in (*RULES, "gallery"):
                for pname, pr in probes.items():
                    if rule == "gallery":
                        try:
                            d = gallery_distance_matrix(enrol, pr, bundle, args.identities)
                        except TypeError:  # a gallery without posture-aware matching (format 1)
                            continue
                    else:
                        d = distance_matrix(enrol, pr, rule, args.identities)
                    rows.append(
                        {
                            "enrol": kind,
                            "rule": rule,
                            "probes": pname,
                            "enrol_posture_acc": acc,
                            **figures(d, pr.identity, t),
                        }
                    )
        calib: dict[str, Any] | None = None
        if args.calibrate_seed is not None:
            vsim = ScannerSimulator(seed=args.calibrate_seed, identities=args.identities)
            vprof = true_profile(vsim)
            vprobes = probe_sets(
                args.calibrate_seed, args.identities, vprof, runner, args.probes, args.warm_probes
            )
            venrol = enrolment_set(
                vsim, vprof, runner, args.calibrate_enrol, args.identities, args.enrol_samples, postures
            )
            gen, imp = genuine_impostor(
                distance_matrix(venrol, vprobes["stream"], "posture", args.identities),
                vprobes["stream"].identity,
            )
            tv = float(threshold_at_eer(gen, imp))
            calib = {
                "seed": args.calibrate_seed,
                "enrol": args.calibrate_enrol,
                "threshold": tv,
                "eer_there": float(equal_error_rate(gen, imp)),
                "rows": [],
            }
            for pname, pr in probes.items():
                d = distance_matrix(enrols[args.calibrate_enrol], pr, "posture", args.identities)
                calib["rows"].append({"probes": pname, **figures(d, pr.identity, tv)})
    finally:
        runner.close()
    return {
        "bundle": bundle.sha256[:12],
        "threshold": t,
        "seed": args.seed,
        "identities": args.identities,
        "enrol_samples": args.enrol_samples,
        "enrol_postures": [POSTURES[p] for p in postures],
        "n_probes": {k: int(len(v.identity)) for k, v in probes.items()},
        "rows": rows,
        "calibration": calib,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def render(res: dict[str, Any]) -> str:
    lines = [
        f"bundle {res['bundle']}  threshold {res['threshold']:.4f}  seed {res['seed']}  "
        f"{res['identities']} identities  enrol {res['enrol_samples']} sample(s) x "
        f"{'/'.join(res['enrol_postures'])}  probes {res['n_probes']}  ({res['seconds']} s)",
        f"{'enrol':16} {'rule':8} {'probes':7} {'gen d':>6} {'imp d':>6} {'imp min':>7} "
        f"{'GAR':>6} {'FAR':>7} {'EER':>6} {'1:N ok':>6} {'1:N bad':>7}",
    ]
    for r in res["rows"]:
        lines.append(
            f"{r['enrol']:16} {r['rule']:8} {r['probes']:7} {r['genuine_mean']:6.3f} "
            f"{r['impostor_mean']:6.3f} {r['impostor_min']:7.3f} {r['gar']:6.3f} {r['far']:7.4f} "
            f"{r['eer']:6.3f} {r['id_correct']:6.3f} {r['id_wrong']:7.4f}"
        )
    c = res.get("calibration")
    if c:
        lines.append(
            f"rule posture, enrol {c['enrol']}: EER threshold on seed {c['seed']} = {c['threshold']:.4f} "
            f"(EER there {c['eer_there']:.3f}); seed {res['seed']} at it:"
        )
        for r in c["rows"]:
            lines.append(
                f"  {r['probes']:7} GAR {r['gar']:.3f}  FAR {r['far']:.4f}  1:N ok {r['id_correct']:.3f}  "
                f"1:N bad {r['id_wrong']:.4f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="bundle directory (default: the shipped demo bundle)")
    ap.add_argument(
        "--seed", type=int, default=7, help="simulator seed of the people scored (demo trained on 0)"
    )
    ap.add_argument("--identities", type=int, default=12)
    ap.add_argument("--enrol-samples", type=int, default=1, help="captures per posture at enrolment")
    ap.add_argument("--enrol-postures", default="", help="comma-separated posture ids to enrol (default all)")
    ap.add_argument("--probes", type=int, default=300, help="stream probes from stream start")
    ap.add_argument("--warm-probes", type=int, default=100, help="stream probes after seek(6000) (drifted)")
    ap.add_argument("--threshold", type=float, help="override the bundle's fp32 threshold")
    ap.add_argument("--calibrate-seed", type=int, help="derive a rule-(c) EER threshold on this seed")
    ap.add_argument("--calibrate-enrol", choices=ENROLMENTS, default="unconcealed")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args)
    print(json.dumps(res, indent=1) if args.json else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
