"""Accuracy gate: compare a precision variant of a bundle with its FP32 reference on held-out data.

Both run on the same images of a triplet CSV (`edge.evaluation.collect_outputs`). The report
has two parts, each line with its limit and pass/fail:

- per-head statistics of candidate vs FP32: per-sample embedding cosine (median, min), posture
  argmax agreement, reconstruction PSNR against the FP32 reconstruction (candidate decoders
  routed by the FP32 posture, so this measures the decoders and not the posture head);
- the task metrics of `thzedge eval` side by side: triplet accuracy, EER, posture accuracy,
  SSIM and PSNR against the unconcealed target, with the deltas.

Numerics run Q/DQ graphs with ONNX Runtime graph optimisations off (ORT_DISABLE_ALL): ORT's CPU
QDQ fusions change the numbers (tensorrt-and-quantization.md §10). Speed is measured separately
with optimisations on, and a last line states whether the optimised session agrees with the
checked one. The verification threshold of the candidate is re-derived on the same data (EER
point, or a target FAR) and returned for the manifest.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import Bundle
from edge.evaluation import (
    collect_outputs,
    psnr,
    report_from_outputs,
    row_cosine,
    threshold_at_eer,
    threshold_at_far,
)
from edge.runner import Runner
from scanner_io.errors import ThzEdgeError


class GateFailedError(ThzEdgeError):
    """A precision variant failed the accuracy gate (exit 1): the report says which lines and by how much."""


@dataclass(frozen=True)
class GateTolerances:
    """Limits of the gate; the defaults are the issue's (pp = percentage points)."""

    triplet_accuracy_pp: float = 1.0
    eer_pp: float = 1.0
    posture_accuracy_pp: float = 1.0
    ssim: float = 0.01
    psnr_db: float = 0.5
    median_cosine: float = 0.99
    # Per-head statistics the issue asks to report; None = reported without a limit.
    min_posture_agreement: float | None = None
    min_recon_psnr_vs_fp32_db: float | None = None
    # The optimised (speed) session must give the checked answers: median embedding cosine.
    speed_agreement_cosine: float = 0.99


@dataclass
class GateLine:
    """One compared quantity: reference, candidate, delta, limit, pass/fail."""

    group: str  # "per-head" | "task" | "speed"
    name: str
    reference: float | None
    candidate: float | None
    delta: float | None
    limit: str
    passed: bool

    def row(self) -> list[str]:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        return [
            self.group,
            self.name,
            f(self.reference),
            f(self.candidate),
            "-" if self.delta is None else self._delta_text(),
            self.limit,
            "pass" if self.passed else "FAIL",
        ]

    def _delta_text(self) -> str:
        """The change in the unit of a Δ limit (pp, dB), else as a plain number."""
        assert self.delta is not None
        if self.limit.startswith("Δ") and self.limit.endswith("pp"):
            return f"{self.delta * 100:+.2f} pp"
        unit = " dB" if self.limit.startswith("Δ") and self.limit.endswith("dB") else ""
        return f"{self.delta:+.4f}{unit}"

    def limited_value(self) -> str:
        """The value the limit is about: the change for a Δ limit (in its unit), else the candidate."""
        if self.limit.startswith("Δ") and self.delta is not None:
            return f"Δ {self._delta_text()}"
        return "-" if self.candidate is None else f"{self.candidate:.4f}"


@dataclass
class GateReport:
    """The gate's verdict with every line, the candidate's threshold and the speed figures."""

    precision: str
    bundle_sha256: str
    data: dict[str, Any]
    tolerances: GateTolerances
    lines: list[GateLine]
    threshold: dict[str, Any]
    speed: dict[str, Any] = field(default_factory=dict)
    reference_metrics: dict[str, Any] = field(default_factory=dict)
    candidate_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(line.passed for line in self.lines)

    @property
    def failures(self) -> list[str]:
        """One phrase per failing line, e.g. 'triplet accuracy Δ -2.10 pp (limit Δ <= 1.0 pp)'."""
        return [f"{ln.name} {ln.limited_value()} (limit {ln.limit})" for ln in self.lines if not ln.passed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report (stored in the bundle)."""
        return {
            "precision": self.precision,
            "passed": self.passed,
            "failures": self.failures,
            "bundle_sha256": self.bundle_sha256,
            "data": self.data,
            "tolerances": asdict(self.tolerances),
            "lines": [asdict(ln) for ln in self.lines],
            "threshold": self.threshold,
            "speed": self.speed,
            "reference_metrics": self.reference_metrics,
            "candidate_metrics": self.candidate_metrics,
        }

    def render(self) -> str:
        """Plain-text table: one line per check, pass/fail, then the verdict."""
        headers = ["group", "check", "fp32", self.precision, "delta", "limit", "result"]
        rows = [ln.row() for ln in self.lines]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

        def fmt(cells: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        out = [
            f"accuracy gate: {self.precision} vs fp32 on {self.data.get('triplets_csv', '')} "
            f"({self.data.get('n_triplets', 0)} triplets, {self.data.get('n_images', 0)} images; "
            "numerics with ORT graph optimisations off)",
            fmt(headers),
            fmt(["-" * w for w in widths]),
            *(fmt(r) for r in rows),
        ]
        t = self.threshold
        if t:
            out.append(
                f"threshold ({t.get('method')}): fp32 {t.get('reference', float('nan')):.4f}  "
                f"{self.precision} {t.get('threshold', float('nan')):.4f}"
            )
        if self.speed:
            s = self.speed
            out.append(
                f"speed (ORT, optimisations on, batch {s.get('batch')}): "
                f"fp32 {s.get('fp32_fps', 0):.1f} frames/s, "
                f"{self.precision} {s.get('candidate_fps', 0):.1f} frames/s ({s.get('speedup', 0):.2f}x); "
                f"optimised vs checked numerics: median cosine {s.get('median_cosine', 0):.5f}, posture "
                f"agreement {s.get('posture_agreement', 0):.3f} -> "
                f"{'agree' if s.get('agree') else 'DISAGREE'}"
            )
        out.append(
            "PASS"
            if self.passed
            else "FAIL: " + "; ".join(self.failures) + f" -> {self.precision} not accepted"
        )
        return "\n".join(out)


def _line(group: str, name: str, ref: float | None, cand: float | None, limit: str, ok: bool) -> GateLine:
    delta = None if ref is None or cand is None else cand - ref
    return GateLine(group, name, ref, cand, delta, limit, bool(ok))


def _timed_fps(runner: Any, images: np.ndarray, batch: int, seconds: float) -> float:
    """Frames/s of encoder + routed decoder over `images` at `batch`, after one warm-up batch."""
    x = images[:batch] if len(images) >= batch else np.resize(images, (batch, *images.shape[1:]))
    runner.infer(x, reconstruct=True)
    n, t0 = 0, time.perf_counter()
    while True:
        runner.infer(x, reconstruct=True)
        n += len(x)
        if time.perf_counter() - t0 >= seconds:
            break
    return n / (time.perf_counter() - t0)


def run_gate(
    bundle_path: Path,
    precision: str,
    data_dir: Path,
    triplets_csv: Path,
    tolerances: GateTolerances | None = None,
    target_far: float | None = None,
    speed_seconds: float = 1.0,
    speed_batch: int = 8,
) -> GateReport:
    """Compare `precision` with fp32 on the same held-out triplets; returns the full report."""
    tol = tolerances or GateTolerances()
    bundle = Bundle.open(bundle_path)
    if precision == "fp32":
        raise ThzEdgeError("the gate compares a quantized variant with fp32; pass --precision int8 or fp16")
    bundle.variant(precision)  # BundleError naming what the bundle has
    ref_runner = Runner.from_bundle(bundle, backend="ort", precision="fp32")
    # Numerics: Q/DQ and fp16 graphs without ORT graph optimisations (the parity trap).
    cand_runner = Runner.from_bundle(bundle, backend="ort", precision=precision, optimize=False)
    try:
        ref = collect_outputs(ref_runner, data_dir, triplets_csv)
        cand = collect_outputs(cand_runner, data_dir, triplets_csv)
        # Decoder numerics alone: candidate decoders routed by the fp32 posture.
        anchors = ref.images[ref.anchors]
        cand_enc = cand_runner.encode(anchors)
        cand_recon_same_route = cand_runner.reconstruct(cand_enc, ref.posture[ref.anchors])
    finally:
        cand_runner.close()

    lines: list[GateLine] = []
    cos = row_cosine(ref.embedding, cand.embedding)
    med, mn = float(np.median(cos)), float(np.min(cos))
    lines.append(_line("per-head", "embedding cosine (median)", 1.0, med, f">= {tol.median_cosine}",
                       med >= tol.median_cosine))  # fmt: skip
    lines.append(GateLine("per-head", "embedding cosine (min)", 1.0, mn, mn - 1.0, "report", True))
    agree = float(np.mean(ref.posture == cand.posture))
    lim = tol.min_posture_agreement
    label = "report" if lim is None else f">= {lim}"
    ok = lim is None or agree >= lim
    lines.append(_line("per-head", "posture argmax agreement", 1.0, agree, label, ok))
    p = np.minimum(psnr(cand_recon_same_route, ref.reconstruction), 100.0)
    pmed, pmin = float(np.median(p)), float(np.min(p))
    lim = tol.min_recon_psnr_vs_fp32_db
    lines.append(_line("per-head", "recon PSNR vs fp32 dB (median)", None, pmed,
                       "report" if lim is None else f">= {lim}", lim is None or pmed >= lim))  # fmt: skip
    lines.append(_line("per-head", "recon PSNR vs fp32 dB (min)", None, pmin, "report", True))

    ref_rep = report_from_outputs(ref).to_dict()["overall"]
    cand_rep = report_from_outputs(cand).to_dict()["overall"]

    def task(name: str, r: float, c: float, limit: float, unit: str, scale: float = 1.0) -> None:
        d = (c - r) * scale
        # Only a loss counts against the gate; an improvement passes.
        worse = -d if name.startswith(("triplet", "posture", "SSIM", "PSNR")) else d
        lines.append(_line("task", name, r, c, f"Δ <= {limit} {unit}".strip(), worse <= limit + 1e-12))

    rv, cv = ref_rep["verification"], cand_rep["verification"]
    task(
        "triplet accuracy", rv["triplet_accuracy"], cv["triplet_accuracy"], tol.triplet_accuracy_pp, "pp", 100
    )
    task("EER", rv["eer"], cv["eer"], tol.eer_pp, "pp", 100)
    task("posture accuracy", ref_rep["posture"]["accuracy"], cand_rep["posture"]["accuracy"],
         tol.posture_accuracy_pp, "pp", 100)  # fmt: skip
    task(
        "SSIM", ref_rep["reconstruction"]["ssim_mean"], cand_rep["reconstruction"]["ssim_mean"], tol.ssim, ""
    )
    task("PSNR dB", ref_rep["reconstruction"]["psnr_mean"], cand_rep["reconstruction"]["psnr_mean"],
         tol.psnr_db, "dB")  # fmt: skip

    # Threshold per precision, re-derived on these pairs.
    if target_far is None:
        method, t_ref, t_cand = (
            "eer",
            threshold_at_eer(ref.d_pos, ref.d_neg),
            threshold_at_eer(cand.d_pos, cand.d_neg),
        )
    else:
        method = f"far={target_far:g}"
        t_ref = threshold_at_far(ref.d_pos, ref.d_neg, target_far)
        t_cand = threshold_at_far(cand.d_pos, cand.d_neg, target_far)
    threshold = {
        "method": method,
        "threshold": float(t_cand),
        "reference": float(t_ref),
        "far_target": target_far,
        "eer": float(cv["eer"]),
        "n_pairs": int(len(cand.d_pos)),
        "data": str(triplets_csv),
    }

    # Speed, separately, with optimisations on; check the optimised session gives the same answers.
    speed: dict[str, Any] = {}
    if speed_seconds > 0:
        fast = Runner.from_bundle(bundle, backend="ort", precision=precision, optimize=True)
        try:
            sub = ref.images[: min(len(ref.images), 64)]
            fast_out = fast.infer(sub, reconstruct=False)
            checked = cand.embedding[: len(sub)]
            fcos = row_cosine(checked, fast_out.embedding)
            fagree = float(np.mean(fast_out.posture == cand.posture[: len(sub)]))
            cand_fps = _timed_fps(fast, ref.images, speed_batch, speed_seconds)
        finally:
            fast.close()
        ref_fps = _timed_fps(ref_runner, ref.images, speed_batch, speed_seconds)
        ok = float(np.median(fcos)) >= tol.speed_agreement_cosine
        speed = {
            "batch": speed_batch,
            "fp32_fps": ref_fps,
            "candidate_fps": cand_fps,
            "speedup": cand_fps / ref_fps if ref_fps > 0 else None,
            "median_cosine": float(np.median(fcos)),
            "min_cosine": float(np.min(fcos)),
            "posture_agreement": fagree,
            "agree": bool(ok),
        }
        lines.append(_line("speed", "optimised vs checked: cosine (median)", None, float(np.median(fcos)),
                           f">= {tol.speed_agreement_cosine}", ok))  # fmt: skip
    ref_runner.close()
    return GateReport(
        precision=precision,
        bundle_sha256=bundle.sha256,
        data={**ref.data},
        tolerances=tol,
        lines=lines,
        threshold=threshold,
        speed=speed,
        reference_metrics=ref_rep,
        candidate_metrics=cand_rep,
    )
