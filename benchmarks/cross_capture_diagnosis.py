"""Why field probes fail: same-capture pairs against cross-capture pairs, on a research-format dataset.

The research triplet (and `thzedge eval`) pairs a concealed crop with the unconcealed crop of the
*same capture*; a gallery pairs a concealed probe with concealed references of *other captures*
(another sample: another pose jitter, cloth and speckle). This script measures both on the same
people, so the gap between them is visible without a simulator stream:

- same-capture: concealed anchor vs its unconcealed crop (genuine) / concealed crop of another
  person in the same posture (impostor) — what the stored threshold is chosen on;
- cross-capture: concealed vs concealed crops of other samples, same posture (genuine: same
  person; impostor: another person);
- render gallery: samples 1..E (concealed) enrolled per posture, later samples probed
  (concealed), nearest reference of the probe's true posture: EER, TAR at FAR 1 %, rank-1.

Identity sets: `test` (the dataset's test identities) and `val` (the held-out validation
identities of `thzedge train`, split seed 42 over train_val), for which the thresholds a
cross-capture calibration would store are also printed.

Usage:
    .venv/bin/python benchmarks/cross_capture_diagnosis.py --data build/demo/data [--model BUNDLE]
        [--enrolled-samples 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge.bundle import Bundle, demo_bundle_path  # noqa: E402
from edge.evaluation import equal_error_rate, threshold_at_eer, threshold_at_far  # noqa: E402
from edge.runner import Runner  # noqa: E402
from scanner_io.dataset import load_crop, parse_crop_name, read_triplets  # noqa: E402


def identities_of(data_dir: Path, csv_name: str) -> list[str]:
    """Identity names of the anchors of a triplet CSV."""
    rows = read_triplets(data_dir / csv_name, data_dir=data_dir)
    return sorted({parse_crop_name(r.anchor.name).identity for r in rows})


def embed_people(runner: Runner, data_dir: Path, people: list[str]) -> dict[str, np.ndarray]:
    """Embeddings and labels of every crop of `people`: emb [N, D], ident, posture, sample, concealed."""
    wanted = set(people)
    paths = sorted(
        p for p in (data_dir / "images").glob("*.png") if parse_crop_name(p.name).identity in wanted
    )
    names = [parse_crop_name(p.name) for p in paths]
    x = np.stack([load_crop(p) for p in paths])[:, None].astype(np.float32)
    emb = np.asarray(runner.infer(x, reconstruct=False).embedding, np.float64)
    order = {n: i for i, n in enumerate(sorted(wanted))}
    return {
        "emb": emb,
        "ident": np.array([order[n.identity] for n in names]),
        "posture": np.array([n.posture for n in names]),
        "sample": np.array([n.sample for n in names]),
        "concealed": np.array([n.concealed for n in names]),
    }


def _rates(gen: np.ndarray, imp: np.ndarray) -> dict[str, float]:
    t1 = threshold_at_far(gen, imp, 0.01)
    return {
        "eer": float(equal_error_rate(gen, imp)),
        "threshold_eer": float(threshold_at_eer(gen, imp)),
        "tar_at_far1": float((gen <= t1).mean()),
        "threshold_far1": float(t1),
        "genuine_mean": float(gen.mean()),
        "impostor_mean": float(imp.mean()),
        "n_genuine": int(gen.size),
        "n_impostor": int(imp.size),
    }


def same_capture(e: dict[str, np.ndarray]) -> dict[str, float]:
    """Concealed anchor vs its own unconcealed crop, and vs concealed crops of others (same posture)."""
    c, u = e["concealed"], ~e["concealed"]
    ci, ui = np.flatnonzero(c), np.flatnonzero(u)
    uk = {(e["ident"][j], e["posture"][j], e["sample"][j]): k for k, j in enumerate(ui)}
    gen, imp = [], []
    for i in ci:
        j = ui[uk[(e["ident"][i], e["posture"][i], e["sample"][i])]]
        gen.append(np.linalg.norm(e["emb"][i] - e["emb"][j]))
        others = ci[(e["posture"][ci] == e["posture"][i]) & (e["ident"][ci] != e["ident"][i])]
        imp.extend(np.linalg.norm(e["emb"][others] - e["emb"][i], axis=1))
    return _rates(np.array(gen), np.array(imp))


def cross_capture(e: dict[str, np.ndarray]) -> dict[str, float]:
    """Concealed vs concealed crops of other samples in the same posture (genuine: same person).

    A capture has one concealed crop, so two concealed crops of one person and posture are two
    samples: the pairs `thzedge train --select cross-eer` scores (export.train).
    """
    from export.train import cross_capture_distances

    ci = np.flatnonzero(e["concealed"])
    return _rates(*cross_capture_distances(e["emb"][ci], e["ident"][ci], e["posture"][ci]))


def render_gallery(e: dict[str, np.ndarray], enrolled_samples: int) -> dict[str, float]:
    """Enrol samples 1..E per posture (concealed), probe later samples; nearest reference per identity."""
    c = e["concealed"]
    ref = np.flatnonzero(c & (e["sample"] <= enrolled_samples))
    prb = np.flatnonzero(c & (e["sample"] > enrolled_samples))
    n_id = int(e["ident"].max()) + 1
    dist = np.full((len(prb), n_id), np.inf)
    for k, i in enumerate(prb):
        r = ref[e["posture"][ref] == e["posture"][i]]
        d = np.linalg.norm(e["emb"][r] - e["emb"][i], axis=1)
        np.minimum.at(dist[k], e["ident"][r], d)
    truth = e["ident"][prb]
    rows = np.arange(len(prb))
    gen = dist[rows, truth]
    mask = np.ones_like(dist, bool)
    mask[rows, truth] = False
    out = _rates(gen, dist[mask])
    out["rank1"] = float((dist.argmin(axis=1) == truth).mean())
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from export.train import split_identities

    data_dir = Path(args.data)
    bundle = Bundle.open(Path(args.model) if args.model else demo_bundle_path())
    stored = float(bundle.threshold("fp32"))
    sets = {
        "test": identities_of(data_dir, "test.csv"),
        "val": split_identities(identities_of(data_dir, "train_val.csv"), 0.1),
    }
    res: dict[str, Any] = {"bundle": bundle.sha256[:12], "stored_threshold": stored, "sets": {}}
    with Runner.from_bundle(bundle, backend="ort") as runner:
        for name, people in sets.items():
            e = embed_people(runner, data_dir, people)
            g = render_gallery(e, args.enrolled_samples)
            res["sets"][name] = {
                "people": len(people),
                "same_capture": same_capture(e),
                "cross_capture": cross_capture(e),
                "render_gallery": g,
            }
    return res


def render(res: dict[str, Any]) -> str:
    lines = [f"bundle {res['bundle']}  stored threshold {res['stored_threshold']:.4f}"]
    hdr = (
        f"{'set':5} {'pairs':15} {'EER':>6} {'TAR@1%':>7} {'t(EER)':>7} {'t(FAR1%)':>8} "
        f"{'gen d':>6} {'imp d':>6} {'rank-1':>6}"
    )
    lines.append(hdr)
    for name, s in res["sets"].items():
        for kind in ("same_capture", "cross_capture", "render_gallery"):
            r = s[kind]
            rank = f"{r['rank1']:6.3f}" if "rank1" in r else f"{'':6}"
            lines.append(
                f"{name:5} {kind:15} {r['eer']:6.3f} {r['tar_at_far1']:7.3f} {r['threshold_eer']:7.4f} "
                f"{r['threshold_far1']:8.4f} {r['genuine_mean']:6.3f} {r['impostor_mean']:6.3f} {rank}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="research-format dataset (thzedge sim dataset)")
    ap.add_argument("--model", help="bundle directory (default: the shipped demo bundle)")
    ap.add_argument("--enrolled-samples", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args)
    print(json.dumps(res, indent=1) if args.json else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
