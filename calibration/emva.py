"""EMVA 1288 spatial non-uniformity (DSNU / PRNU) of a mean image, numpy only.

The standard's split of the fixed pattern into row, column and pixel parts (to first order in
1/rows and 1/columns), with the temporal noise still in a mean of L frames subtracted, so a
figure measures the pattern, not the noise.
Used by `calibrate build` (before and after correction) and `calibrate check` (residuals).
"""

from __future__ import annotations

import numpy as np

__all__ = ["nonuniformity"]


def nonuniformity(image: np.ndarray, good: np.ndarray, noise_var: float) -> dict[str, float]:
    """EMVA 1288 spatial non-uniformity of a mean image: total, row, column and pixel σ.

    `noise_var` is the temporal variance left in each pixel of `image` (σ²/L for a mean of L
    frames); it is subtracted so what remains is the fixed pattern only. Bad pixels (`good`
    False) are left out. Negative variance estimates (pure noise) report 0.
    """
    img = np.ma.masked_array(np.asarray(image, np.float64), mask=~good)
    h, w = img.shape
    m = float(img.mean())
    row = img.mean(axis=1)  # per row, over columns
    col = img.mean(axis=0)
    resid = img - row[:, None] - col[None, :] + m
    s2_pix = float(resid.var()) - noise_var
    # A row mean still carries the pixel part and the noise of its w pixels, and vice versa.
    s2_row = float(row.var()) - (s2_pix + noise_var) / w
    s2_col = float(col.var()) - (s2_pix + noise_var) / h
    s2_tot = float(img.var()) - noise_var
    variances = {"total": s2_tot, "row": s2_row, "column": s2_col, "pixel": s2_pix}
    return {k: float(np.sqrt(max(v, 0.0))) for k, v in variances.items()} | {"mean": m}
