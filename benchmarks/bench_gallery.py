"""Gallery matching cost per probe as the gallery grows: `Gallery.scores` against the direct form.

`Gallery.scores` computes |r - q|² = |r|² + |q|² - 2 r·q in float64 (one matrix-vector product);
the direct form builds the [M, D] difference array and takes its row norms (what the gallery did
before 3 Dec 2026). Both are timed side by side in one run on the same references and probes
(random unit vectors, 5 postures, 15 references per person), best of `--repeats`, and the
largest difference between their distances is printed.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_gallery.py [--people 32,1000,5000] [--dim 128]
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge.gallery import Gallery  # noqa: E402


def direct(
    refs: np.ndarray, post: np.ndarray, starts: np.ndarray, probe: np.ndarray, posture: int
) -> np.ndarray:
    """The nearest reference of `posture` per identity, from the difference array (float32)."""
    d = np.linalg.norm(refs - probe[None, :], axis=1)
    nearest = np.minimum.reduceat(d, starts)
    same = np.minimum.reduceat(np.where(post == posture, d, np.inf), starts)
    return np.where(np.isfinite(same), same, nearest)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def measure(n: int, per_person: int, dim: int, repeats: int, rng: np.random.Generator) -> str:
    """One row: `n` people in the gallery, both forms timed alternately on the same probes."""
    g = Gallery("0" * 64, dim, threshold=0.3)
    refs = unit(rng.normal(size=(n, per_person, dim)))
    post = np.arange(per_person) % 5
    for i in range(n):
        g.enroll(f"p{i:06d}", refs[i], postures=post)
    flat = refs.reshape(-1, dim)
    flat_post = np.tile(post, n).astype(np.int8)
    starts = np.arange(n) * per_person
    probes = unit(rng.normal(size=(8, dim)))
    number = max(1, 2000 // n)

    def ours() -> None:
        for p in probes:
            g.scores(p, 2)

    def theirs() -> None:
        for p in probes:
            direct(flat, flat_post, starts, p, 2)

    t_ours = t_direct = float("inf")
    for _ in range(repeats):  # alternated, best of each
        t_ours = min(t_ours, timeit.timeit(ours, number=number) / number / len(probes))
        t_direct = min(t_direct, timeit.timeit(theirs, number=number) / number / len(probes))
    diff = max(
        float(np.abs(g.scores(p, 2).distances - direct(flat, flat_post, starts, p, 2)).max()) for p in probes
    )
    times = f"{t_ours * 1e3:10.3f} {t_direct * 1e3:10.3f} {t_direct / t_ours:6.1f}"
    return f"{n:7d} {flat.shape[0]:7d} {times} {diff:11.2e}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--people", default="32,1000,5000")
    ap.add_argument("--per-person", type=int, default=15)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'people':>7} {'refs':>7} {'scores ms':>10} {'direct ms':>10} {'ratio':>6} {'max |diff|':>11}")
    for n in (int(x) for x in args.people.split(",")):
        print(measure(n, args.per_person, args.dim, args.repeats, rng))
    return 0


if __name__ == "__main__":
    sys.exit(main())
