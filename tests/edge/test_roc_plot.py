"""The ROC picture `export threshold` writes: its operating point is where the threshold puts it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.evaluation import threshold_at_eer, threshold_at_far
from edge.roc_plot import operating_point, plot_roc


def test_roc_png_marks_the_eer_and_far_operating_points(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    d_pos = rng.normal(0.6, 0.15, 400)
    d_neg = rng.normal(1.2, 0.15, 4000)
    t = threshold_at_eer(d_pos, d_neg)
    far, tar = operating_point(d_pos, d_neg, t)
    assert abs(far - (1.0 - tar)) < 0.01  # at the EER point FAR = FRR
    out = plot_roc(d_pos, d_neg, t, tmp_path / "roc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    t_far = threshold_at_far(d_pos, d_neg, 0.001)
    far2, tar2 = operating_point(d_pos, d_neg, t_far)
    assert far2 <= 0.001 and tar2 < tar
    plot_roc(d_pos, d_neg, t_far, tmp_path / "far.png", method="FAR <= 0.001")
    assert (tmp_path / "far.png").is_file()
