"""What `thzedge rescore` writes: rows.parquet, summary.json and report.html with its plots.

The HTML page is self-contained (PNG plots embedded as data URIs): flip rates per recording and
the histogram of the per-frame score shift (new − baseline). It shows counts and rates only:
no identity, embedding or image.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.fleet.engines import write_parquet
from edge.fleet.rescore import RescoreJob, RescoreSummary, Row, score_shifts
from scanner_io.errors import MissingDependencyError


@dataclass(frozen=True)
class RescoreOutputs:
    """Paths of what one run wrote."""

    rows: Path
    summary: Path
    html: Path
    plots: tuple[Path, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form."""
        return {
            "rows": str(self.rows),
            "summary": str(self.summary),
            "html": str(self.html),
            "plots": [str(p) for p in self.plots],
        }


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError(
            "the rescore report needs matplotlib: pip install 'thzedge[fleet]'"
        ) from exc
    return plt


def plot_flip_rates(summary: RescoreSummary, path: Path, limit: int = 40) -> Path:
    """Bar chart of posture and decision flip rates per recording (the worst `limit` of them)."""
    plt = _pyplot()
    recs = summary.worst(limit)
    names = [Path(s.recording).stem for s in recs]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(names) + 2), 3.6), dpi=110)
    xs = range(len(names))
    decided = summary.overall.decisions > 0  # without a gallery there are no decisions to flip
    width = 0.4 if decided else 0.6
    ax.bar([x - 0.2 * decided for x in xs], [100 * s.posture_flip_rate for s in recs], width, label="posture")
    ax.axhline(100 * summary.overall.posture_flip_rate, color="C0", ls=":", lw=1, label="posture, overall")
    if decided:
        ax.bar([x + 0.2 for x in xs], [100 * s.decision_flip_rate for s in recs], 0.4, label="decision")
        overall = 100 * summary.overall.decision_flip_rate
        ax.axhline(overall, color="C1", ls=":", lw=1, label="decision, overall")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    rates = [100 * r for s in recs for r in (s.posture_flip_rate, s.decision_flip_rate)]
    ax.set_ylim(0.0, max(1.0, 1.15 * max(rates, default=0.0)))  # 0 % flips stays on the axis
    ax.set_ylabel("flipped frames (%)")
    title = f"flips per recording: {summary.model} vs {summary.baseline}"
    ax.set_title(title + ("" if decided else "\nno decisions to compare (no gallery)"), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_score_shift(rows: Sequence[Row], summary: RescoreSummary, path: Path) -> Path:
    """Histogram of the per-frame shift new − baseline (match score where kept, else confidence)."""
    plt = _pyplot()
    kind, shifts = score_shifts(rows)
    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=110)
    if shifts.size:
        ax.hist(shifts, bins=60, color="C2")
        ax.axvline(0.0, color="k", lw=0.8)
    else:
        ax.text(0.5, 0.5, "no frame scored by both models", ha="center", transform=ax.transAxes)
    what = "match distance" if kind == "score" else "posture confidence"
    ax.set_xlabel(f"{what}: new − baseline")
    ax.set_ylabel("frames")
    ax.set_title(f"{what} shift over {shifts.size} frames", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(summary: RescoreSummary, plots: Sequence[Path], job: RescoreJob) -> str:
    """Return the self-contained report page."""
    o = summary.overall
    cells = []
    for s in [o, *summary.worst(len(summary.recordings))]:
        ssim = f"{s.mean_recon_ssim:.4f}" if s.mean_recon_ssim is not None else "–"
        cells.append(
            f"<tr><td>{html.escape(s.recording)}</td><td>{s.frames}</td><td>{s.posture_flips}</td>"
            f"<td>{100 * s.posture_flip_rate:.2f}%</td><td>{s.decision_flips}/{s.decisions}</td>"
            f"<td>{s.decision_rate_text()}</td><td>{ssim}</td><td>{s.errors}</td></tr>"
        )
    images = "\n".join(_img(p, p.stem) for p in plots)
    ssim_all = f"{o.mean_recon_ssim:.4f}" if o.mean_recon_ssim is not None else "–"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>thzedge rescore: {html.escape(summary.model)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%;margin:1em 0}}</style></head><body>
<h1>What changes with {html.escape(summary.model)}</h1>
<p>baseline {html.escape(summary.baseline)} · engine {html.escape(summary.engine)} ·
{len(summary.recordings)} recordings · {o.frames} frames · {summary.duration_s:.2f} s ·
rows sha256 <code>{summary.rows_sha256[:16]}</code></p>
<p><b>posture flips {o.posture_flips}/{o.frames} ({100 * o.posture_flip_rate:.2f}%)</b>,
<b>decision flips {o.decision_flips}/{o.decisions} ({o.decision_rate_text()})</b>,
mean reconstruction SSIM vs baseline {ssim_all}</p>
{images}
<h2>Recordings, worst first</h2>
<table><tr><th>recording</th><th>frames</th><th>posture flips</th><th>rate</th>
<th>decision flips</th><th>rate</th><th>SSIM</th><th>errors</th></tr>
{"".join(cells)}
</table>
<h2>Job</h2><pre>{html.escape(json.dumps(job.to_dict(), indent=2))}</pre>
</body></html>
"""


def write_outputs(rows: Sequence[Row], summary: RescoreSummary, job: RescoreJob, out: Path) -> RescoreOutputs:
    """Write rows.parquet, summary.json, the plots and report.html into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rows_path = write_parquet(rows, out / "rows.parquet")
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps({**summary.to_dict(), "job": job.to_dict()}, indent=2) + "\n")
    plots = (
        plot_flip_rates(summary, out / "flip_rates.png"),
        plot_score_shift(rows, summary, out / "score_shift.png"),
    )
    html_path = out / "report.html"
    html_path.write_text(render_html(summary, plots, job))
    return RescoreOutputs(rows_path, summary_path, html_path, plots)
