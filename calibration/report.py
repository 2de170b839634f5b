"""The technician's calibration report: PNGs plus one self-contained HTML page.

`write_report(profile, out_dir, raw_frame=None)` writes

    maps.png        dark offset, relative gain and temporal dark noise maps
    bad_pixels.png  the bad-pixel map coloured by class, clusters and defective columns boxed
    histograms.png  DSNU (dark offset) and PRNU (response) histograms, log scale
    profiles.png    row and column profiles of the dark offset and the response
    frame.png       one raw frame before and after correction (when a frame is given)
    figures.png     the EMVA figures table and the validity envelope
    report.html     all of the above, images embedded

matplotlib is part of the `calibrate` extra; it is imported here only, with the Agg backend.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibration.conditioning import calibrate
from calibration.profile import BadPixelClass, CalibrationProfile

__all__ = ["figure_rows", "write_report"]

_CLASS_COLOURS = {
    BadPixelClass.DEAD: "#1f3a93",
    BadPixelClass.HOT: "#d62728",
    BadPixelClass.FLICKERING: "#ff9f1c",
    BadPixelClass.NOISY: "#9b59b6",
    BadPixelClass.STUCK: "#2ca02c",
}


_CSS = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1100px}"
    "table{border-collapse:collapse;margin:0.5em 2em 1em 0;display:inline-table;vertical-align:top}"
    "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}"
    "td:first-child{white-space:pre}"  # keeps the indent of the bad-pixel classes
    "figure{margin:1em 0}img{max-width:100%}"
)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_rows(profile: CalibrationProfile) -> list[tuple[str, str, str]]:
    """Return (figure, before, after) rows of the EMVA table, formatted for people."""
    qa = profile.qa or {}
    before, after = qa.get("before") or {}, qa.get("after") or {}
    rows: list[tuple[str, str, str]] = []
    for part in ("total", "row", "column", "pixel"):
        b = (before.get("dsnu_dn") or {}).get(part)
        a = (after.get("dsnu_dn") or {}).get(part)
        if b is not None:
            rows.append((f"DSNU {part} (DN)", f"{b:.2f}", f"{a:.2f}" if a is not None else "–"))
    for part in ("total", "row", "column", "pixel"):
        b = (before.get("prnu_pct") or {}).get(part)
        a = (after.get("prnu_pct") or {}).get(part)
        if b is not None:
            rows.append((f"PRNU {part} (%)", f"{b:.3f}", f"{a:.3f}" if a is not None else "–"))
    if "temporal_dark_noise_dn" in before:
        rows.append(
            (
                "temporal dark noise (DN)",
                f"{before['temporal_dark_noise_dn']:.2f}",
                f"{after.get('temporal_dark_noise_dn', float('nan')):.2f}",
            )
        )
    if qa.get("nonlinearity_pct") is not None:
        rows.append(("non-linearity (%)", f"{qa['nonlinearity_pct']:.3f}", ""))
    rows.append(("bad pixels (%)", f"{100 * profile.bad_pixel_fraction:.3f}", ""))
    for cls, n in (qa.get("bad_pixels") or {}).items():
        rows.append((f"  {cls}", str(n), ""))
    columns = ", ".join(str(c) for c in qa.get("columns") or []) or "none"
    rows.append(("clusters / columns", f"{len(qa.get('clusters') or [])} / {columns}", ""))
    return rows


def _envelope_rows(profile: CalibrationProfile) -> list[tuple[str, str]]:
    env = profile.envelope
    rows = [("profile id", profile.profile_id), ("format", str(profile.format))]
    if profile.dark_tc is None:
        rows.append(("dark", "fixed (no temperature model)"))
    else:  # format 3: the dark follows the sensor temperature
        median = float(np.median(profile.dark_tc))
        rows.append(("dark", f"compensated, {median:.2f} DN/°C (ref. {profile.dark_ref_temp_c:.2f} °C)"))
    if env is None:
        return rows + [("validity envelope", "none (not made by calibrate build)")]
    captured = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(env.captured_ns / 1e9))
    return rows + [
        ("scanner (serial)", env.scanner),
        ("resolution", f"{env.shape[1]} × {env.shape[0]} {env.dtype}"),
        ("settings", ", ".join(f"{k}={v}" for k, v in sorted(env.settings.items()))),
        ("sensor temperature", f"{env.sensor_temp_c:.2f} °C ± {env.max_delta_t_c:.2f} °C"),
        ("captured", captured),
        ("valid for", f"{env.max_age_s / 86400:g} days"),
    ]


# What each plot of the page shows (its caption); the file name follows in brackets.
_CAPTIONS = {
    "maps": "Dark offset, relative gain and temporal dark noise (bad pixels blank)",
    "bad_pixels": "Bad pixels by class, clusters and columns boxed",
    "histograms": "Dark and response non-uniformity over the good pixels",
    "profiles": "Row and column profiles of the dark offset and the response",
    "frame": "A raw frame before and after correction",
}


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return path


def _response(profile: CalibrationProfile) -> np.ndarray:
    good = ~profile.bad_pixels
    with np.errstate(divide="ignore"):
        resp = np.where(profile.gain > 0, 1.0 / profile.gain, 0.0)
    return resp / max(float(np.median(resp[good])), 1e-9)


def _maps(profile: CalibrationProfile, path: Path) -> Path:
    plt = _plt()
    good = ~profile.bad_pixels
    panels = [("dark offset (DN)", profile.dark), ("relative gain", profile.gain)]
    if profile.noise is not None:
        panels.append(("temporal dark noise σ (DN)", profile.noise))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (title, img) in zip(np.atleast_1d(axes), panels, strict=True):
        lo, hi = np.percentile(img[good], [0.5, 99.5])
        im = ax.imshow(np.where(good, img, np.nan), cmap="viridis", vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("Calibration maps (bad pixels blank, colour range 0.5–99.5 %)", fontsize=10)
    return _save(fig, path)


def _bad_pixels(profile: CalibrationProfile, path: Path) -> Path:
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    codes = profile.defects if profile.defects is not None else profile.bad_pixels.astype(np.uint8)
    colours = ["#f4f4f4"] + [_CLASS_COLOURS[c] for c in BadPixelClass]
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    ax.imshow(codes, cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1, interpolation="nearest")
    qa = profile.qa or {}
    for c in qa.get("clusters") or []:
        x, y, w, h = c["bbox"]
        ax.add_patch(Rectangle((x - 1.5, y - 1.5), w + 2, h + 2, fill=False, ec="black", lw=0.8))
    counts = profile.class_counts()
    handles = [
        Patch(color=_CLASS_COLOURS[c], label=f"{c.value} ({counts.get(c.value, 0)})") for c in BadPixelClass
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    ax.set_title(
        f"Bad pixels by class: {int(profile.bad_pixels.sum())} ({100 * profile.bad_pixel_fraction:.2f} %), "
        f"{len(qa.get('clusters') or [])} clusters boxed",
        fontsize=10,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


def _histograms(profile: CalibrationProfile, path: Path) -> Path:
    plt = _plt()
    good = ~profile.bad_pixels
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4))
    dark = profile.dark[good]
    axes[0].hist(dark, bins=120, color="#1f77b4", log=True)
    axes[0].set_xlabel("dark offset (DN)")
    axes[0].set_title(f"DSNU: σ {dark.std():.1f} DN over good pixels", fontsize=10)
    resp = _response(profile)[good]
    axes[1].hist(100 * (resp - 1.0), bins=120, color="#ff7f0e", log=True)
    axes[1].set_xlabel("response − median (%)")
    axes[1].set_title(f"PRNU: σ {100 * resp.std():.2f} % (incl. vignetting)", fontsize=10)
    for ax in axes:
        ax.set_ylabel("pixels (log)")
    return _save(fig, path)


def _profiles(profile: CalibrationProfile, path: Path) -> Path:
    plt = _plt()
    good = ~profile.bad_pixels
    dark = np.ma.masked_array(profile.dark, ~good)
    resp = np.ma.masked_array(_response(profile), ~good)
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4))
    axes[0].plot(dark.mean(axis=1), label="row means")
    axes[0].plot(dark.mean(axis=0), label="column means")
    axes[0].set_title("dark offset profiles (DN)", fontsize=10)
    axes[1].plot(resp.mean(axis=1), label="row means")
    axes[1].plot(resp.mean(axis=0), label="column means")
    axes[1].set_title("response profiles (relative)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("row / column index")
        ax.legend(fontsize=8)
    return _save(fig, path)


def _frame(profile: CalibrationProfile, raw: np.ndarray, path: Path) -> Path:
    plt = _plt()
    corrected = calibrate(raw, profile)
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.0))
    for ax, (title, img) in zip(
        axes, (("raw frame (DN)", raw.astype(np.float32)), ("corrected", corrected)), strict=True
    ):
        lo, hi = np.percentile(img, [1.0, 99.0])
        im = ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(f"{title}, 1–99 % stretch", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def _figures_png(profile: CalibrationProfile, path: Path) -> Path:
    plt = _plt()
    rows = figure_rows(profile)
    env = _envelope_rows(profile)
    fig, axes = plt.subplots(
        1, 2, figsize=(12.0, 0.22 * max(len(rows), len(env)) + 0.8), gridspec_kw={"width_ratios": [1.0, 1.3]}
    )
    for ax in axes:
        ax.axis("off")
    tables = (
        (
            axes[0],
            rows,
            ["figure", "before", "after"],
            [0.5, 0.25, 0.25],
            "EMVA 1288 figures (after: held-out)",
        ),
        (axes[1], env, ["validity envelope", ""], [0.32, 0.68], "Where this profile is valid"),
    )
    for ax, body, head, widths, title in tables:
        t = ax.table(
            cellText=[list(r) for r in body],
            colLabels=head,
            colWidths=widths,
            loc="upper center",
            cellLoc="left",
        )
        t.auto_set_font_size(False)
        t.set_fontsize(8)
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def write_report(
    profile: CalibrationProfile, out_dir: str | Path, raw_frame: np.ndarray | None = None
) -> list[Path]:
    """Write the report PNGs and report.html into `out_dir`; returns the paths, the HTML last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _maps(profile, out / "maps.png"),
        _bad_pixels(profile, out / "bad_pixels.png"),
        _histograms(profile, out / "histograms.png"),
        _profiles(profile, out / "profiles.png"),
    ]
    if raw_frame is not None:
        written.append(_frame(profile, raw_frame, out / "frame.png"))
    written.append(_figures_png(profile, out / "figures.png"))
    esc = html.escape

    def table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
        th = "".join(f"<th>{esc(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><tr>{th}</tr>{body}</table>"

    images = "".join(
        f'<figure><img alt="{esc(_CAPTIONS.get(p.stem, p.stem))}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{esc(_CAPTIONS.get(p.stem, p.stem))} ({esc(p.name)})</figcaption></figure>"
        for p in written
        if p.name != "figures.png"
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Calibration {esc(profile.profile_id)}</title>
<style>{_CSS}</style>
</head><body>
<h1>Calibration profile {esc(profile.profile_id)} — {esc(profile.scanner)}</h1>
<p>{100 * profile.bad_pixel_fraction:.2f} % bad pixels. Figures after correction are measured
on frames the maps were not estimated from.</p>
{table(("figure", "before", "after"), figure_rows(profile))}
{table(("validity envelope", ""), _envelope_rows(profile))}
{images}
</body></html>
"""
    page_path = out / "report.html"
    page_path.write_text(page)
    written.append(page_path)
    return written
