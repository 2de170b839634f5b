"""Draw a verification ROC curve with its chosen operating point (PNG), for `export threshold`.

matplotlib is optional (the `calibrate` or `export` extra); without it `plot_roc` raises
MissingDependencyError naming what to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from edge.evaluation import equal_error_rate, error_rates
from scanner_io.errors import MissingDependencyError

__all__ = ["operating_point", "plot_roc"]


def operating_point(d_pos: Any, d_neg: Any, threshold: float) -> tuple[float, float]:
    """Return (FAR, TAR) when pairs with distance <= `threshold` are accepted."""
    pos = np.asarray(d_pos, np.float64).ravel()
    neg = np.asarray(d_neg, np.float64).ravel()
    return float(np.mean(neg <= threshold)), float(np.mean(pos <= threshold))


def plot_roc(
    d_pos: Any,
    d_neg: Any,
    threshold: float,
    out: str | Path,
    title: str = "verification ROC",
    method: str = "eer",
) -> Path:
    """Write the ROC (TAR against FAR, log FAR axis) with the operating point at `threshold` marked."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError(
            "drawing the ROC needs matplotlib; install the export extra: pip install 'thzedge[export]'"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, far, frr = error_rates(d_pos, d_neg)
    tar = 1.0 - frr
    n_neg = max(np.asarray(d_neg).size, 1)
    floor = 0.5 / n_neg  # FAR 0 plotted half a pair below the smallest measurable rate
    op_far, op_tar = operating_point(d_pos, d_neg, threshold)
    eer = equal_error_rate(d_pos, d_neg)
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    ax.step(np.maximum(np.r_[0.0, far], floor), np.r_[0.0, tar], where="post", color="#1f77b4", label="ROC")
    ax.plot(
        [max(op_far, floor)],
        [op_tar],
        "o",
        color="#d62728",
        ms=8,
        label=f"{method} point: t={threshold:.3f}, FAR {op_far:.3f}, TAR {op_tar:.3f}",
    )
    ax.axvline(max(op_far, floor), color="#d62728", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (log)")
    ax.set_ylabel("true accept rate")
    ax.set_title(
        f"{title} (EER {eer:.3f}; {np.asarray(d_pos).size} genuine, {n_neg} impostor pairs)", fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
