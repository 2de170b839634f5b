"""Verification in the field: a gallery enrolled in one session, probed from another, on people
the model never saw; 1:1 and 1:N figures, template protection, key rotation, ROC (PNG).

Protocol (docs/operations.md, "Gallery verification in the field"):

- People: simulator seed `--seed` (the demo bundle was trained on seed 0, so every person of
  another seed is new to it). `--enrolled` people (indices 0..E-1) are enrolled; `--unenrolled`
  more (E..E+U-1) only walk past, for the 1:N rejection rate.
- Enrolment: session 1 (what `thzedge enroll` reads from a `sim` source by default). Per person,
  the stream of that person alone (`sim?identity=K&session=1`) until `--per-posture` captures
  (default 3) of each true posture are taken, as an operator asks the person to turn; each
  reference keeps the posture the model predicts for it (as `enroll` does).
- Probes: session 2 (`sim?identities=0-(E+U-1)&session=2`): `--probes` concealed stream frames of
  random visits and postures; another day's pose jitter, clothing, speckle and sensor temperature.
- Conditioning: `session` calibrates each session at its start (the profile a `sim?session=S`
  source carries, as a site calibrates each day); `fixed` uses one profile made at the calibration
  temperature for both sessions (one calibration at install); `oracle` calibrates every frame with
  the sensor's true maps at that frame's temperature (no drift left: what conditioning could reach).
- Matching: edge.gallery.Gallery (the shipped rule: nearest reference of the probe's predicted
  posture), with a template key (R-NEW-3) and without.
- `--save-gallery G.npz` also writes the session-1 gallery (protected, key `bench.tkey` beside
  it), so the same figures can be checked through the daemon: `thzedge run --source
  'sim?seed=7&identities=48&session=2&frames=600' --score` with `[verification] gallery = G.npz`
  streams exactly the probes scored here.
- Figures: 1:1 — every enrolled person's probe against every enrolled identity (genuine = own);
  TAR at FAR 1 % (the threshold chosen on these pairs: the ROC point) and TAR/FAR at the bundle's
  stored threshold. 1:N — rank-1 (closest identity is the right one), and at the stored threshold
  identification rate, false-identification rate (accepted as someone else) and unenrolled
  rejection rate. Key rotation: templates of epoch 1 against probes protected with epoch 2.
  Cross-precision: references encoded with the int8 variant, probes with fp32.
- Visits (edge/visits.py, what the daemon decides for frames tagged with a `visit`): probes of
  `--visit-sessions` more sessions (3, 4, …; `--visit-session-frames` frames each, each session
  calibrated at its start, templates on). One decision per visit from the mean, over its first
  m frames (`--visit-frames`, a list), of each frame's distance to every enrolled identity; the
  same figures over visits: 1:1 TAR/FAR at `--visit-threshold`, 1:N at
  `--visit-identify-threshold` (each defaults to the stored per-frame threshold), and the
  thresholds this set would choose (1:1 at FAR 1 %, 1:N rejecting 99 % of unenrolled people).
  Choose them on one seed and check them on another.

Usage:
    .venv/bin/python benchmarks/gallery_operating_point.py [--model BUNDLE] [--seed 7]
        [--enrolled 32] [--unenrolled 16] [--per-posture 3] [--probes 600]
        [--conditioning session,fixed,oracle] [--roc build/gallery_roc.png] [--json]
        [--visit-sessions 24] [--visit-session-frames 600] [--visit-frames 1,3,5,8,12]
        [--visit-threshold T] [--visit-identify-threshold T]
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

from calibration.conditioning import calibrate, condition  # noqa: E402
from calibration.profile import CalibrationProfile  # noqa: E402
from calibration.simulated import profile_from_sensor_maps, sim_conditioning  # noqa: E402
from edge.bundle import Bundle, demo_bundle_path  # noqa: E402
from edge.evaluation import equal_error_rate, threshold_at_far  # noqa: E402
from edge.gallery import Gallery  # noqa: E402
from edge.runner import Runner  # noqa: E402
from edge.templates import TemplateKey, generate_template_key, load_template_key  # noqa: E402
from scanner_io.frame import POSTURES, Frame  # noqa: E402
from scanner_io.simulator import ScannerSimulator, SensorMaps, identity_name  # noqa: E402

CONDITIONINGS = ("session", "fixed", "oracle")
ENROL_SESSION, PROBE_SESSION = 1, 2


@dataclass
class Raw:
    """Raw frames of one set with their truth: identity index, true posture."""

    frames: list[Frame]
    identity: np.ndarray
    posture: np.ndarray


@dataclass
class Embedded:
    """Embeddings [N, D], predicted postures [N] and true identities [N] of a set of frames."""

    emb: np.ndarray
    posture: np.ndarray
    identity: np.ndarray


def enrolment_frames(seed: int, people: range, per_posture: int) -> Raw:
    """Session-1 stream frames of each person alone, until `per_posture` of every true posture."""
    frames, ids, post = [], [], []
    for k in people:
        sim = ScannerSimulator(seed=seed, identities=max(people) + 1, people=(k,), session=ENROL_SESSION)
        need = dict.fromkeys(range(len(POSTURES)), per_posture)
        while any(need.values()):
            f = sim.next_frame()
            p = f.truth.posture
            if need[p]:
                need[p] -= 1
                frames.append(f)
                ids.append(k)
                post.append(p)
    return Raw(frames, np.array(ids), np.array(post))


def probe_frames(seed: int, n_people: int, probes: int) -> Raw:
    """Session-2 stream frames of random visits of all `n_people` (enrolled or not)."""
    sim = ScannerSimulator(seed=seed, identities=n_people, session=PROBE_SESSION)
    frames = [sim.next_frame() for _ in range(probes)]
    return Raw(
        frames,
        np.array([f.truth.identity for f in frames]),
        np.array([f.truth.posture for f in frames]),
    )


@dataclass
class VisitProbes:
    """Frames of several probe sessions with their visit numbers (unique across sessions)."""

    raw: Raw
    visit: np.ndarray
    session: np.ndarray


def visit_probe_frames(seed: int, n_people: int, sessions: range, frames: int) -> VisitProbes:
    """`frames` stream frames of each session in `sessions` (random visits of all `n_people`)."""
    all_frames: list[Frame] = []
    visit, session = [], []
    offset = 0
    for s in sessions:
        sim = ScannerSimulator(seed=seed, identities=n_people, session=s)
        got = [sim.next_frame() for _ in range(frames)]
        v = np.array([f.header.visit for f in got])
        all_frames += got
        visit.append(v + offset)
        session.append(np.full(len(got), s))
        offset += int(v.max()) + 1
    raw = Raw(
        all_frames,
        np.array([f.truth.identity for f in all_frames]),
        np.array([f.truth.posture for f in all_frames]),
    )
    return VisitProbes(raw, np.concatenate(visit), np.concatenate(session))


def visit_distances(
    d: np.ndarray, visit: np.ndarray, identity: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per visit with at least `m` frames: the mean distance row of its first `m` frames, its person."""
    rows, truth = [], []
    for v in np.unique(visit):
        idx = np.flatnonzero(visit == v)[:m]
        if len(idx) == m:
            rows.append(d[idx].mean(axis=0))
            truth.append(identity[idx[0]])
    return np.stack(rows), np.array(truth)


def session_profile(seed: int, session: int, conditioning: Any) -> CalibrationProfile:
    """The profile a site would have made at the start of `session` (what the sim source carries)."""
    sim = ScannerSimulator(seed=seed, session=session)
    maps = sim.sensor_maps(sim.config.reference_temp_c + sim.session_temp_c)
    return profile_from_sensor_maps(maps, conditioning)


def conditioned(raw: Raw, how: str, profile: CalibrationProfile, conditioning: Any) -> np.ndarray:
    """The model inputs [N, 1, 64, 64] of a set of frames, conditioned as `how` says."""
    xs = []
    for f in raw.frames:
        if how == "oracle":
            t = f.truth
            maps = SensorMaps(
                scanner="sim0", shape=f.data.shape, dark=t.dark, gain=t.gain, bad_pixels=t.bad_pixels
            )
            p = profile_from_sensor_maps(maps, conditioning)
        else:
            p = profile
        xs.append(condition(calibrate(f.data, p), conditioning))
    return np.stack(xs).astype(np.float32)[:, None]


def embed(runner: Runner, x: np.ndarray, raw: Raw) -> Embedded:
    out = runner.infer(x, reconstruct=False)
    return Embedded(np.asarray(out.embedding, np.float32), np.asarray(out.posture), raw.identity)


def gallery_distances(
    bundle: Bundle, enrol: Embedded, probes: Embedded, n_enrolled: int, key: TemplateKey | None
) -> np.ndarray:
    """Distance [P, E] of each probe to each enrolled identity through edge.gallery.Gallery."""
    g = Gallery.for_bundle(bundle, template_key=key)
    names = [identity_name(i) for i in range(n_enrolled)]
    for i, name in enumerate(names):
        m = enrol.identity == i
        g.enroll(name, enrol.emb[m], postures=enrol.posture[m])
    order = [g.identities.index(n) for n in names]
    rows = [g.distances(e, posture=int(p))[order] for e, p in zip(probes.emb, probes.posture, strict=True)]
    return np.stack(rows).astype(np.float64)


def rotated_distances(
    bundle: Bundle, enrol: Embedded, probes: Embedded, n_enrolled: int, old: TemplateKey, new: TemplateKey
) -> np.ndarray:
    """Templates of the `old` epoch against probes protected under the `new` key (after rotation)."""
    g = Gallery.for_bundle(bundle, template_key=old)
    names = [identity_name(i) for i in range(n_enrolled)]
    for i, name in enumerate(names):
        m = enrol.identity == i
        g.enroll(name, enrol.emb[m], postures=enrol.posture[m])
    # The daemon now holds the new key: it protects probes with it, against the old templates.
    g.template_key = new
    order = [g.identities.index(n) for n in names]
    rows = [g.distances(e, posture=int(p))[order] for e, p in zip(probes.emb, probes.posture, strict=True)]
    return np.stack(rows).astype(np.float64)


def figures(d: np.ndarray, truth: np.ndarray, n_enrolled: int, t: float) -> dict[str, Any]:
    """1:1 and 1:N figures of a distance matrix [P, E] (probes of all people) at threshold `t`."""
    enrolled = truth < n_enrolled
    de, te = d[enrolled], truth[enrolled]
    rows = np.arange(len(te))
    gen = de[rows, te]
    mask = np.ones_like(de, bool)
    mask[rows, te] = False
    imp = de[mask]
    t1 = threshold_at_far(gen, imp, 0.01)
    best = de.argmin(axis=1)
    hit = de[rows, best] <= t
    du = d[~enrolled]
    return {
        "n_genuine": int(gen.size),
        "n_impostor": int(imp.size),
        "n_unenrolled_probes": int(du.shape[0]),
        "eer": float(equal_error_rate(gen, imp)),
        "tar_at_far1": float((gen <= t1).mean()),
        "far_at_far1": float((imp <= t1).mean()),
        "threshold_far1": float(t1),
        "tar": float((gen <= t).mean()),
        "far": float((imp <= t).mean()),
        "rank1": float((best == te).mean()),
        "identified": float((hit & (best == te)).mean()),
        "false_id": float((hit & (best != te)).mean()),
        "false_id_share_of_accepts": float((hit & (best != te)).sum() / max(1, hit.sum())),
        "unenrolled_rejected": float((du.min(axis=1) > t).mean()) if du.size else float("nan"),
        "genuine_mean": float(gen.mean()),
        "impostor_mean": float(imp.mean()),
        "_gen": gen,
        "_imp": imp,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    bundle = Bundle.open(Path(args.model) if args.model else demo_bundle_path())
    t = float(args.threshold if args.threshold is not None else bundle.threshold("fp32"))
    n_e, n_u = args.enrolled, args.unenrolled
    t0 = time.perf_counter()
    enrol_raw = enrolment_frames(args.seed, range(n_e), args.per_posture)
    probe_raw = probe_frames(args.seed, n_e + n_u, args.probes)
    t_sim = time.perf_counter() - t0
    cond = sim_conditioning((128, 128))
    fixed = session_profile(args.seed, 0, cond)
    profiles = {
        "session": (
            session_profile(args.seed, ENROL_SESSION, cond),
            session_profile(args.seed, PROBE_SESSION, cond),
        ),
        "fixed": (fixed, fixed),
        "oracle": (fixed, fixed),  # unused: every frame gets its own maps
    }
    key1 = TemplateKey("bench", 1, b"\x01" * 32)
    key2 = TemplateKey("bench", 2, b"\x02" * 32)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    roc = None
    session_enrol: Embedded | None = None  # the session-1 references, for the visit figures
    runner = Runner.from_bundle(bundle, backend="ort")
    try:
        for how in args.conditioning.split(","):
            pe, pp = profiles[how]
            enrol = embed(runner, conditioned(enrol_raw, how, pe, cond), enrol_raw)
            probes = embed(runner, conditioned(probe_raw, how, pp, cond), probe_raw)
            acc = float((enrol.posture == enrol_raw.posture).mean())
            pacc = float((probes.posture == probe_raw.posture).mean())
            for protected in (False, True):
                d = gallery_distances(bundle, enrol, probes, n_e, key1 if protected else None)
                f = figures(d, probe_raw.identity, n_e, t)
                rows.append(
                    {
                        "conditioning": how,
                        "templates": protected,
                        "posture_acc_enrol": acc,
                        "posture_acc_probe": pacc,
                        **f,
                    }
                )
                if how == "session" and protected:
                    roc = (f["_gen"], f["_imp"])
            if how == "session" and args.save_gallery:
                # The gallery `thzedge run --score` is checked with (docs/operations.md).
                kpath = generate_template_key(Path(args.save_gallery).parent, "bench", rotate=True)
                key = load_template_key(kpath)
                g = Gallery.for_bundle(bundle, template_key=key)
                for i in range(n_e):
                    m = enrol.identity == i
                    g.enroll(identity_name(i), enrol.emb[m], postures=enrol.posture[m])
                extra["saved_gallery"] = {"gallery": str(g.save(Path(args.save_gallery))), "key": str(kpath)}
            if how == "session":
                session_enrol = enrol
                dr = rotated_distances(bundle, enrol, probes, n_e, key1, key2)
                fr = figures(dr, probe_raw.identity, n_e, t)
                extra["rotation"] = {k: fr[k] for k in ("genuine_mean", "impostor_mean", "tar", "far", "eer")}
                if "int8" in bundle.precisions:
                    with Runner.from_bundle(bundle, backend="ort", precision="int8") as r8:
                        enrol8 = embed(r8, conditioned(enrol_raw, how, pe, cond), enrol_raw)
                    d8 = gallery_distances(bundle, enrol8, probes, n_e, key1)
                    f8 = figures(d8, probe_raw.identity, n_e, t)
                    extra["int8_enrol_fp32_probe"] = {
                        k: f8[k] for k in ("tar_at_far1", "tar", "far", "rank1", "false_id", "eer")
                    }
        if args.visit_sessions:
            if session_enrol is None:  # `--conditioning` without `session`
                pe = profiles["session"][0]
                session_enrol = embed(runner, conditioned(enrol_raw, "session", pe, cond), enrol_raw)
            extra["visits"] = visit_figures(args, bundle, runner, session_enrol, cond, key1, t)
    finally:
        runner.close()
    if args.roc and roc is not None:
        from edge.roc_plot import plot_roc

        extra["roc_png"] = str(
            plot_roc(
                roc[0],
                roc[1],
                t,
                args.roc,
                title=f"field 1:1, seed {args.seed}, templates on",
                method="stored",
            )
        )
    for r in rows:
        r.pop("_gen")
        r.pop("_imp")
    return {
        "bundle": bundle.sha256[:12],
        "threshold": t,
        "seed": args.seed,
        "enrolled": n_e,
        "unenrolled": n_u,
        "per_posture": args.per_posture,
        "enrol_frames": len(enrol_raw.frames),
        "probes": len(probe_raw.frames),
        "rows": rows,
        **extra,
        "seconds": round(time.perf_counter() - t0, 1),
        "simulate_seconds": round(t_sim, 1),
    }


def visit_figures(
    args: argparse.Namespace,
    bundle: Bundle,
    runner: Runner,
    enrol: Embedded,
    cond: Any,
    key: TemplateKey,
    t_frame: float,
) -> dict[str, Any]:
    """Per-frame and per-visit figures over probes of sessions 3.. (session conditioning, templates on)."""
    n_e = args.enrolled
    sessions = range(PROBE_SESSION + 1, PROBE_SESSION + 1 + args.visit_sessions)
    vp = visit_probe_frames(args.seed, n_e + args.unenrolled, sessions, args.visit_session_frames)
    xs = []
    for s in sessions:
        m = vp.session == s
        part = Raw(
            [f for f, k in zip(vp.raw.frames, m, strict=True) if k], vp.raw.identity[m], vp.raw.posture[m]
        )
        xs.append(conditioned(part, "session", session_profile(args.seed, s, cond), cond))
    probes = embed(runner, np.concatenate(xs), vp.raw)
    d = gallery_distances(bundle, enrol, probes, n_e, key)
    t_1to1 = float(args.visit_threshold) if args.visit_threshold is not None else t_frame
    t_1ton = float(args.visit_identify_threshold) if args.visit_identify_threshold is not None else t_frame
    per_frame = figures(d, vp.raw.identity, n_e, t_frame)
    rows = []
    roc_png = None
    for m in (int(x) for x in args.visit_frames.split(",")):
        dv, tv = visit_distances(d, vp.visit, vp.raw.identity, m)
        f = figures(dv, tv, n_e, t_1ton)
        f["tar"], f["far"] = float((f["_gen"] <= t_1to1).mean()), float((f["_imp"] <= t_1to1).mean())
        if m == args.visit_roc_frames and args.visit_roc:
            from edge.roc_plot import plot_roc

            roc_png = plot_roc(
                f["_gen"],
                f["_imp"],
                t_1to1,
                args.visit_roc,
                title=f"field 1:1 per visit ({m} frames), seed {args.seed}, templates on",
                method="visit threshold",
            )
        # The 1:N threshold that rejects 99 % of these unenrolled visits (their nearest identity).
        f["threshold_unenrolled99"] = float(np.quantile(dv[tv >= n_e].min(axis=1), 0.01))
        rows.append(
            {"frames": m, "visits": int(len(tv)), **{k: v for k, v in f.items() if not k.startswith("_")}}
        )
    per_frame = {k: v for k, v in per_frame.items() if not k.startswith("_")}
    return {
        "sessions": [sessions.start, sessions.stop - 1],
        "frames": len(vp.raw.frames),
        "threshold_1to1": t_1to1,
        "threshold_1toN": t_1ton,
        "per_frame": per_frame,
        "rows": rows,
        "roc_png": None if roc_png is None else str(roc_png),
    }


def render(res: dict[str, Any]) -> str:
    lines = [
        f"bundle {res['bundle']}  stored threshold {res['threshold']:.4f}  seed {res['seed']}  enrolled "
        f"{res['enrolled']} people x {res['per_posture']}/posture (session {ENROL_SESSION}, "
        f"{res['enrol_frames']} frames)  probes {res['probes']} (session {PROBE_SESSION}, "
        f"+{res['unenrolled']} unenrolled people)  "
        f"({res['seconds']} s)",
        f"{'conditioning':12} {'tmpl':4} {'post acc':>8} {'EER':>6} {'TAR@1%':>7} {'TAR':>6} {'FAR':>7} "
        f"{'rank-1':>6} {'ident':>6} {'falseID':>7} {'unenr rej':>9}",
    ]
    for r in res["rows"]:
        lines.append(
            f"{r['conditioning']:12} {'on' if r['templates'] else 'off':4} {r['posture_acc_probe']:8.3f} "
            f"{r['eer']:6.3f} {r['tar_at_far1']:7.3f} {r['tar']:6.3f} {r['far']:7.4f} {r['rank1']:6.3f} "
            f"{r['identified']:6.3f} {r['false_id']:7.4f} {r['unenrolled_rejected']:9.3f}"
        )
    rot = res.get("rotation")
    if rot:
        lines.append(
            f"key rotation (epoch-1 templates, epoch-2 probes): genuine mean d {rot['genuine_mean']:.3f} vs "
            f"impostor {rot['impostor_mean']:.3f}; TAR {rot['tar']:.4f} FAR {rot['far']:.4f} "
            f"EER {rot['eer']:.3f}"
        )
    x = res.get("int8_enrol_fp32_probe")
    if x:
        lines.append(
            f"int8 references, fp32 probes (session conditioning, templates on): "
            f"TAR@1% {x['tar_at_far1']:.3f} TAR {x['tar']:.3f} FAR {x['far']:.4f} "
            f"rank-1 {x['rank1']:.3f} false ID {x['false_id']:.4f}"
        )
    vis = res.get("visits")
    if vis:
        pf = vis["per_frame"]
        lines.append(
            f"visits: sessions {vis['sessions'][0]}-{vis['sessions'][1]}, {vis['frames']} frames, session "
            f"conditioning, templates on; visit 1:1 at {vis['threshold_1to1']:.4f}, "
            f"1:N at {vis['threshold_1toN']:.4f} (frames: both at the stored threshold)"
        )
        lines.append(
            f"  {'decision':16} {'n':>5} {'EER':>6} {'TAR@1%':>7} {'thr@1%':>7} {'TAR':>6} {'FAR':>7} "
            f"{'rank-1':>6} {'ident':>6} {'falseID':>7} {'unenr rej':>9} {'thr@99%rej':>10}"
        )
        first = {"frames": 0, "visits": pf["n_genuine"], **pf, "threshold_unenrolled99": float("nan")}
        for r in [first, *vis["rows"]]:
            name = f"visit, {r['frames']} frames" if r["frames"] else "each frame"
            lines.append(
                f"  {name:16} {r['visits']:5d} {r['eer']:6.3f} {r['tar_at_far1']:7.3f} "
                f"{r['threshold_far1']:7.4f} {r['tar']:6.3f} {r['far']:7.4f} {r['rank1']:6.3f} "
                f"{r['identified']:6.3f} {r['false_id']:7.4f} {r['unenrolled_rejected']:9.3f} "
                f"{r['threshold_unenrolled99']:10.4f}"
            )
        if vis.get("roc_png"):
            lines.append(f"visit ROC: {vis['roc_png']}")
    if res.get("saved_gallery"):
        lines.append(f"gallery for `thzedge run --score`: {res['saved_gallery']}")
    if res.get("roc_png"):
        lines.append(f"ROC: {res['roc_png']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="bundle directory (default: the shipped demo bundle)")
    ap.add_argument("--seed", type=int, default=7, help="simulator seed of the people (demo trained on 0)")
    ap.add_argument("--enrolled", type=int, default=32)
    ap.add_argument("--unenrolled", type=int, default=16)
    ap.add_argument("--per-posture", type=int, default=3, help="enrolment captures per posture")
    ap.add_argument("--probes", type=int, default=600)
    ap.add_argument("--threshold", type=float, help="override the bundle's fp32 threshold")
    ap.add_argument("--conditioning", default=",".join(CONDITIONINGS))
    ap.add_argument("--roc", default="build/gallery_roc.png", help="ROC PNG path ('' for none)")
    ap.add_argument("--save-gallery", help="also write the session-conditioned protected gallery here (.npz)")
    ap.add_argument(
        "--visit-sessions", type=int, default=24, help="probe sessions for visit figures (0: none)"
    )
    ap.add_argument("--visit-session-frames", type=int, default=600)
    ap.add_argument("--visit-roc", default="build/gallery_visit_roc.png", help="visit ROC PNG ('' for none)")
    ap.add_argument("--visit-roc-frames", type=int, default=8, help="the visit decision the ROC shows")
    ap.add_argument("--visit-frames", default="1,3,5,8,12", help="frames fused per visit decision")
    ap.add_argument("--visit-threshold", type=float, help="visit (mean distance) threshold, 1:1")
    ap.add_argument("--visit-identify-threshold", type=float, help="visit (mean distance) threshold, 1:N")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args)
    print(json.dumps(res, indent=1) if args.json else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
