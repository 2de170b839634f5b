"""Evaluation of a model bundle on a research-format dataset: verification, posture, reconstruction.

The metric functions are pure numpy so that the quantization gate and the demo-model checks can
score arrays they already hold. `evaluate` runs a `Runner` over a triplet CSV and returns an
`EvalReport`; `collect_outputs` + `report_from_outputs` split that in two for callers (the INT8
gate) that also need the raw outputs.

Conventions (docs/eval.md has the full text):
- distances are Euclidean between unit embeddings (0..2; ranks pairs as cosine does);
- a threshold `t` on distance **accepts a pair when d <= t**; FAR = share of negative pairs
  accepted, FRR = share of positive pairs rejected, TAR = 1 - FRR;
- SSIM follows pytorch_msssim (11x11 Gaussian window, sigma 1.5, valid filtering, K1=0.01,
  K2=0.03, data range 1); PSNR = 20*log10(1/sqrt(MSE)).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scanner_io.choices import Choice
from scanner_io.dataset import load_crop, parse_crop_name, read_triplets
from scanner_io.errors import DataError, ThzEdgeError
from scanner_io.frame import POSTURES

if TYPE_CHECKING:
    from edge.runner import Runner

#: margin of the research "margin satisfied" rate: d(a,p) + MARGIN < d(a,n)
MARGIN = 0.2
#: false-accept rate at which TAR is reported
FAR_TARGET = 0.01
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
#: PSNR of a sample is capped here before averaging (a perfect reconstruction is +inf dB)
PSNR_CAP_DB = 100.0


class Routing(Choice):
    """Which posture picks each image's decoder: the predicted one (deployed) or the file name's."""

    predicted = "predicted"
    truth = "truth"


# ---------------------------------------------------------------------------------------------
# verification


def _distances(name: str, d: Any) -> np.ndarray:
    arr = np.asarray(d, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ThzEdgeError(f"{name}: no distances given; need at least one")
    if not np.all(np.isfinite(arr)):
        raise ThzEdgeError(f"{name}: distances contain NaN or inf")
    return arr


def pair_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the Euclidean distance between matching rows of two [N, D] embedding arrays (float64)."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    if a64.shape != b64.shape or a64.ndim != 2:
        raise ThzEdgeError(f"embeddings must both be [N, D]; got {a64.shape} and {b64.shape}")
    return np.sqrt(np.sum((a64 - b64) ** 2, axis=1))


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the cosine similarity of matching rows of two [N, D] arrays (float64; 0 for a zero row)."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.sum(a64 * b64, axis=1) / np.maximum(den, 1e-12)


def roc_auc(d_pos: Any, d_neg: Any) -> float:
    """Return ROC AUC = P(a negative pair is farther than a positive pair), ties counted half."""
    pos = _distances("d_pos", d_pos)
    neg = _distances("d_neg", d_neg)
    values = np.concatenate([neg, pos])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # Average 1-based ranks within ties (Mann-Whitney U).
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    u_neg = ranks[: neg.size].sum() - neg.size * (neg.size + 1) / 2.0
    return float(u_neg / (neg.size * pos.size))


def error_rates(d_pos: Any, d_neg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (thresholds, FAR, FRR) at every distinct distance, accepting a pair when d <= threshold."""
    pos = np.sort(_distances("d_pos", d_pos))
    neg = np.sort(_distances("d_neg", d_neg))
    thresholds = np.unique(np.concatenate([pos, neg]))
    far = np.searchsorted(neg, thresholds, side="right") / neg.size
    frr = 1.0 - np.searchsorted(pos, thresholds, side="right") / pos.size
    return thresholds, far, frr


def _eer_point(d_pos: Any, d_neg: Any) -> tuple[float, float]:
    thresholds, far, frr = error_rates(d_pos, d_neg)
    k = int(np.argmax(far >= frr))  # FAR rises and FRR falls with t; at the largest t FAR = 1 >= FRR = 0
    if far[k] == frr[k]:
        # Exact equality holds for every t in [thresholds[k], thresholds[k+1]); take its middle so a
        # stored threshold sits inside the gap, not on a sample.
        upper = thresholds[k + 1] if k + 1 < thresholds.size else thresholds[k]
        return float(far[k]), float((thresholds[k] + upper) / 2.0)
    # The ROC steps over the diagonal between the operating point before thresholds[k] and the
    # one at it: interpolate linearly along that segment (the usual ROC-curve EER).
    if k == 0:
        far0, frr0, t0 = 0.0, 1.0, thresholds[0]
    else:
        far0, frr0, t0 = far[k - 1], frr[k - 1], thresholds[k - 1]
    gap0 = frr0 - far0  # > 0
    gap1 = frr[k] - far[k]  # < 0
    alpha = gap0 / (gap0 - gap1)
    eer = far0 + alpha * (far[k] - far0)
    return float(eer), float(t0 + alpha * (thresholds[k] - t0))


def equal_error_rate(d_pos: Any, d_neg: Any) -> float:
    """Return the EER: the rate where FAR equals FRR (linear interpolation on the ROC steps)."""
    return _eer_point(d_pos, d_neg)[0]


def threshold_at_eer(d_pos: Any, d_neg: Any) -> float:
    """Return the distance threshold at the EER point (accept when d <= threshold)."""
    return _eer_point(d_pos, d_neg)[1]


def threshold_at_far(d_pos: Any, d_neg: Any, far: float) -> float:
    """Return the threshold giving the highest TAR with FAR <= `far` on these pairs (accept when d <= t).

    At most floor(far * n_neg) negative pairs are accepted. Every threshold between the largest
    distance below the first rejected negative and that negative gives the same FAR and TAR on
    these data; the midpoint of that interval is returned so float rounding cannot flip a sample.
    """
    if not 0.0 <= far <= 1.0:
        raise ThzEdgeError(f"target FAR must be in [0, 1]; got {far}")
    pos = _distances("d_pos", d_pos)
    neg = np.sort(_distances("d_neg", d_neg))
    allowed = int(math.floor(far * neg.size + 1e-9))
    if allowed >= neg.size:
        return float(max(pos.max(), neg.max()))
    first_rejected = neg[allowed]
    everything = np.concatenate([pos, neg])
    below = everything[everything < first_rejected]
    # With ties, negatives equal to first_rejected are rejected too: FAR may end below the target.
    lower = below.max() if below.size else first_rejected - 1e-3
    return float((lower + first_rejected) / 2.0)


def verification_metrics(
    d_pos: Any, d_neg: Any, margin: float = MARGIN, far: float = FAR_TARGET
) -> dict[str, float | int]:
    """Score triplets from their anchor-positive and anchor-negative distances (paired by index).

    Returns triplet accuracy (d_pos < d_neg), margin rate (d_pos + margin < d_neg), ROC AUC, EER
    and its threshold, TAR at the target FAR and its threshold, and distance statistics.
    """
    pos = _distances("d_pos", d_pos)
    neg = _distances("d_neg", d_neg)
    if pos.shape != neg.shape:
        raise ThzEdgeError(f"d_pos and d_neg must pair up; got {pos.size} and {neg.size} distances")
    eer, t_eer = _eer_point(pos, neg)
    t_far = threshold_at_far(pos, neg, far)
    return {
        "n": int(pos.size),
        "triplet_accuracy": float(np.mean(pos < neg)),
        "margin_rate": float(np.mean(pos + margin < neg)),
        "margin": float(margin),
        "roc_auc": roc_auc(pos, neg),
        "eer": eer,
        "threshold_eer": t_eer,
        "far_target": float(far),
        "tar_at_far": float(np.mean(pos <= t_far)),
        "far_achieved": float(np.mean(neg <= t_far)),
        "threshold_far": t_far,
        "d_pos_mean": float(pos.mean()),
        "d_pos_std": float(pos.std()),
        "d_neg_mean": float(neg.mean()),
        "d_neg_std": float(neg.std()),
        "gap": float(neg.mean() - pos.mean()),
    }


# ---------------------------------------------------------------------------------------------
# posture


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int = len(POSTURES)) -> np.ndarray:
    """Return the [K, K] confusion matrix: rows are true classes, columns predicted ones."""
    t = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if t.shape != p.shape:
        raise ThzEdgeError(f"labels and predictions differ in length: {t.size} vs {p.size}")
    for name, arr in (("true label", t), ("prediction", p)):
        bad = (arr < 0) | (arr >= n_classes)
        if bad.any():
            raise ThzEdgeError(f"{name} {int(arr[bad][0])} is outside 0..{n_classes - 1}")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def posture_metrics(
    y_true: Any, y_pred: Any, confidence: Any | None = None, n_classes: int = len(POSTURES)
) -> dict[str, Any]:
    """Score posture predictions: accuracy, per-class and macro F1, confusion matrix, mean confidence.

    Macro F1 averages the F1 of every class that occurs in the truth or the predictions (as
    sklearn does); a class never seen on either side has no F1 (None) and is left out.
    """
    cm = confusion_matrix(y_true, y_pred, n_classes)
    n = int(cm.sum())
    if n == 0:
        raise ThzEdgeError("no posture predictions to score")
    tp = np.diag(cm).astype(np.float64)
    denom = 2 * tp + (cm.sum(axis=0) - tp) + (cm.sum(axis=1) - tp)
    f1: list[float | None] = [float(2 * tp[k] / denom[k]) if denom[k] > 0 else None for k in range(n_classes)]
    present = [v for v in f1 if v is not None]
    out: dict[str, Any] = {
        "n": n,
        "accuracy": float(tp.sum() / n),
        "macro_f1": float(np.mean(present)),
        "f1": f1,
        "confusion": cm.tolist(),
    }
    if confidence is not None:
        conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
        if conf.size != n:
            raise ThzEdgeError(f"confidence has {conf.size} values for {n} predictions")
        correct = np.asarray(y_true).reshape(-1) == np.asarray(y_pred).reshape(-1)
        out["mean_confidence"] = float(conf.mean())
        out["mean_confidence_correct"] = float(conf[correct].mean()) if correct.any() else None
        out["mean_confidence_incorrect"] = float(conf[~correct].mean()) if (~correct).any() else None
    return out


# ---------------------------------------------------------------------------------------------
# reconstruction


def _as_planes(name: str, x: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """Return x as float64 [M, H, W] planes plus the leading (N, C) shape it came in."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 2:
        lead: tuple[int, ...] = (1, 1)
    elif arr.ndim == 3:
        lead = (arr.shape[0], 1)
    elif arr.ndim == 4:
        lead = (arr.shape[0], arr.shape[1])
    else:
        raise ThzEdgeError(f"{name}: expected [H,W], [N,H,W] or [N,C,H,W]; got shape {arr.shape}")
    return arr.reshape(-1, arr.shape[-2], arr.shape[-1]), lead


def _gaussian_band(size: int, window: int, sigma: float) -> np.ndarray:
    """Return the [size - window + 1, size] matrix whose product is a valid 1-D Gaussian filter."""
    coords = np.arange(window, dtype=np.float64) - window // 2
    g = np.exp(-(coords**2) / (2.0 * sigma**2))
    g /= g.sum()
    out = size - window + 1
    band = np.zeros((out, size), dtype=np.float64)
    for i in range(out):
        band[i, i : i + window] = g
    return band


def ssim(a: Any, b: Any, data_range: float = 1.0) -> np.ndarray:
    """Return SSIM per sample, as pytorch_msssim computes it (channels averaged).

    11x11 Gaussian window (sigma 1.5, separable), valid filtering (no padding), K1=0.01,
    K2=0.03; the SSIM map is averaged over its valid area. Accepts [H,W], [N,H,W] or [N,C,H,W].
    """
    x, lead = _as_planes("ssim input a", a)
    y, lead_b = _as_planes("ssim input b", b)
    if x.shape != y.shape or lead != lead_b:
        raise ThzEdgeError(f"ssim inputs differ in shape: {np.shape(a)} vs {np.shape(b)}")
    h, w = x.shape[-2:]
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ThzEdgeError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}; got {h}x{w}")
    gh = _gaussian_band(h, SSIM_WINDOW, SSIM_SIGMA)
    gw = _gaussian_band(w, SSIM_WINDOW, SSIM_SIGMA)

    def blur(z: np.ndarray) -> np.ndarray:
        return gh @ z @ gw.T

    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    per_plane = ssim_map.reshape(ssim_map.shape[0], -1).mean(axis=1)
    return per_plane.reshape(lead).mean(axis=1)


def psnr(a: Any, b: Any, data_range: float = 1.0) -> np.ndarray:
    """Return PSNR per sample in dB: 20*log10(data_range / sqrt(MSE)); +inf where the images are equal."""
    x, lead = _as_planes("psnr input a", a)
    y, lead_b = _as_planes("psnr input b", b)
    if x.shape != y.shape or lead != lead_b:
        raise ThzEdgeError(f"psnr inputs differ in shape: {np.shape(a)} vs {np.shape(b)}")
    mse = ((x - y) ** 2).reshape(lead[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 20.0 * np.log10(data_range / np.sqrt(mse))


def reconstruction_metrics(reconstruction: Any, target: Any) -> dict[str, float | int]:
    """Score reconstructions against their targets: SSIM, PSNR, L1 (mean and std) and SSIM bands."""
    s = ssim(reconstruction, target)
    p = np.minimum(psnr(reconstruction, target), PSNR_CAP_DB)
    x, lead = _as_planes("reconstruction", reconstruction)
    y, _ = _as_planes("target", target)
    l1 = np.abs(x - y).reshape(lead[0], -1).mean(axis=1)
    return {
        "n": int(s.size),
        "ssim_mean": float(s.mean()),
        "ssim_std": float(s.std()),
        "psnr_mean": float(p.mean()),
        "psnr_std": float(p.std()),
        "l1_mean": float(l1.mean()),
        "share_ssim_below_0_7": float(np.mean(s < 0.7)),
        "share_ssim_at_least_0_95": float(np.mean(s >= 0.95)),
    }


# ---------------------------------------------------------------------------------------------
# running a bundle over a triplet dataset


@dataclass
class EvalOutputs:
    """Everything `evaluate` computed before scoring; the INT8 gate compares two of these.

    Images are the distinct files of the triplet CSV, anchors first. Index arrays point into them.
    """

    routing: str
    names: list[str]  # file names as written in the CSV
    images: np.ndarray  # [M, 1, 64, 64] float32 model inputs
    truth_posture: np.ndarray  # [M] posture class parsed from each file name
    embedding: np.ndarray  # [M, D]
    posture_logits: np.ndarray  # [M, 5]
    posture: np.ndarray  # [M] predicted class
    confidence: np.ndarray  # [M] softmax probability of the predicted class
    triplets: np.ndarray  # [T, 3] indices (anchor, positive, negative)
    anchors: np.ndarray  # [A] distinct anchor indices (= 0..A-1)
    reconstruction: np.ndarray  # [A, 1, 64, 64] reconstruction of each anchor
    recon_pairs: np.ndarray  # [P, 2] (row in `anchors`, positive index): distinct anchor/target pairs
    inference_s: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def d_pos(self) -> np.ndarray:
        """Anchor-positive distance of every triplet."""
        return pair_distances(self.embedding[self.triplets[:, 0]], self.embedding[self.triplets[:, 1]])

    @property
    def d_neg(self) -> np.ndarray:
        """Anchor-negative distance of every triplet."""
        return pair_distances(self.embedding[self.triplets[:, 0]], self.embedding[self.triplets[:, 2]])


def _model_info(runner: Runner) -> dict[str, Any]:
    bundle = getattr(runner, "bundle", None)
    backend = getattr(runner, "backend", None)
    return {
        "bundle": str(getattr(bundle, "path", "")),
        "sha256": str(getattr(bundle, "sha256", "")),
        "backend": str(getattr(backend, "name", backend)),
        "precision": str(getattr(runner, "precision", getattr(backend, "precision", "fp32"))),
    }


def collect_outputs(
    runner: Runner, data_dir: str | Path, triplets_csv: str | Path, routing: str = "predicted"
) -> EvalOutputs:
    """Run the runner on every distinct image of a triplet CSV; anchors also get reconstructed.

    routing "predicted" sends each anchor to the decoder of its predicted posture (the deployed
    behaviour); "truth" to the decoder of the posture in its file name (the research scripts).
    Missing files, unparsable names and malformed rows raise DataError naming them.
    """
    if routing not in Routing.values():
        raise ThzEdgeError(f"unknown routing {routing!r}; use {' or '.join(Routing.values())}")
    data_dir = Path(data_dir)
    triplets_csv = Path(triplets_csv)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory does not exist")
    # Bad rows and missing files -> one DataError naming the CSV line.
    paths_of = [(t.anchor, t.positive, t.negative) for t in read_triplets(triplets_csv, data_dir=data_dir)]

    # Distinct files, anchors first, so one encoder pass per file serves every triplet using it.
    index: dict[Path, int] = {}
    for a, _, _ in paths_of:
        index.setdefault(a, len(index))
    n_anchors = len(index)
    for _, p, n in paths_of:
        index.setdefault(p, len(index))
        index.setdefault(n, len(index))
    paths = list(index)
    truth = np.array([parse_crop_name(p.name).posture for p in paths], dtype=np.int64)
    images = np.stack([np.asarray(load_crop(p), dtype=np.float32) for p in paths])[:, None]
    triplets = np.array([[index[a], index[p], index[n]] for a, p, n in paths_of], dtype=np.int64)
    recon_pairs = np.unique(triplets[:, :2], axis=0)

    t0 = time.perf_counter()
    anchor_out = runner.infer(
        images[:n_anchors],
        reconstruct=True,
        postures=truth[:n_anchors] if routing == "truth" else None,
    )
    parts = [anchor_out]
    if len(paths) > n_anchors:
        parts.append(runner.infer(images[n_anchors:], reconstruct=False))
    inference_s = time.perf_counter() - t0
    assert anchor_out.reconstruction is not None
    return EvalOutputs(
        routing=routing,
        names=[str(p.relative_to(data_dir)) if p.is_relative_to(data_dir) else str(p) for p in paths],
        images=images,
        truth_posture=truth,
        embedding=np.concatenate([p.embedding for p in parts]),
        posture_logits=np.concatenate([p.posture_logits for p in parts]),
        posture=np.concatenate([p.posture for p in parts]),
        confidence=np.concatenate([p.confidence for p in parts]),
        triplets=triplets,
        anchors=np.arange(n_anchors, dtype=np.int64),
        reconstruction=anchor_out.reconstruction,
        recon_pairs=recon_pairs,
        inference_s=inference_s,
        model=_model_info(runner),
        data={
            "data_dir": str(data_dir),
            "triplets_csv": str(triplets_csv),
            "n_triplets": len(paths_of),
            "n_images": len(paths),
            "n_anchors": n_anchors,
        },
    )


def _scores(out: EvalOutputs, keep_triplet: np.ndarray, keep_anchor: np.ndarray) -> dict[str, Any]:
    """Verification, posture and reconstruction scores of the selected triplets and anchors."""
    tri = out.triplets[keep_triplet]
    d_pos = pair_distances(out.embedding[tri[:, 0]], out.embedding[tri[:, 1]])
    d_neg = pair_distances(out.embedding[tri[:, 0]], out.embedding[tri[:, 2]])
    anchors = out.anchors[keep_anchor]
    pairs = out.recon_pairs[np.isin(out.recon_pairs[:, 0], np.flatnonzero(keep_anchor))]
    return {
        "verification": verification_metrics(d_pos, d_neg),
        "posture": posture_metrics(out.truth_posture[anchors], out.posture[anchors], out.confidence[anchors]),
        "reconstruction": reconstruction_metrics(out.reconstruction[pairs[:, 0]], out.images[pairs[:, 1]]),
    }


def report_from_outputs(out: EvalOutputs) -> EvalReport:
    """Score collected outputs overall and per posture of the anchor."""
    anchor_posture = out.truth_posture[out.anchors]
    triplet_posture = out.truth_posture[out.triplets[:, 0]]
    overall = _scores(out, np.ones(len(out.triplets), bool), np.ones(len(out.anchors), bool))
    per_posture: dict[str, Any] = {}
    for k, name in enumerate(POSTURES):
        keep_t = triplet_posture == k
        if not keep_t.any():
            continue
        s = _scores(out, keep_t, anchor_posture == k)
        # Within one true class, accuracy is that class's recall; its F1 needs the other classes'
        # predictions too, so it comes from the overall confusion matrix.
        p = s["posture"]
        s["posture"] = {
            "n": p["n"],
            "accuracy": p["accuracy"],
            "f1": overall["posture"]["f1"][k],
            "mean_confidence": p["mean_confidence"],
        }
        per_posture[name] = s
    n_images = len(out.names)
    return EvalReport(
        routing=out.routing,
        model=dict(out.model),
        data=dict(out.data),
        overall=overall,
        per_posture=per_posture,
        timing={
            "inference_s": out.inference_s,
            "images_per_s": n_images / out.inference_s if out.inference_s > 0 else None,
        },
    )


def evaluate(
    runner: Runner, data_dir: str | Path, triplets_csv: str | Path, routing: str = "predicted"
) -> EvalReport:
    """Evaluate a runner on a research-format dataset: overall and per posture of the anchor."""
    return report_from_outputs(collect_outputs(runner, data_dir, triplets_csv, routing))


def _json_ready(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_ready(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_ready(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    return [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def _f(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


@dataclass(frozen=True)
class EvalReport:
    """Scores of one bundle on one dataset; `to_dict` for JSON, `render` for a terminal."""

    routing: str
    model: dict[str, Any]
    data: dict[str, Any]
    overall: dict[str, Any]  # {"verification": ..., "posture": ..., "reconstruction": ...}
    per_posture: dict[str, Any]  # posture name -> same keys, for triplets whose anchor has it
    timing: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON types (non-finite floats become null)."""
        return _json_ready(
            {
                "routing": self.routing,
                "model": self.model,
                "data": self.data,
                "overall": self.overall,
                "per_posture": self.per_posture,
                "timing": self.timing,
            }
        )

    def _groups(self) -> list[tuple[str, dict[str, Any]]]:
        return [("all", self.overall), *self.per_posture.items()]

    def render(self) -> str:
        """Return the report as plain-text tables."""
        m, d, ov = self.model, self.data, self.overall
        v = ov["verification"]
        lines = [
            f"model    {m.get('bundle', '')}  sha256 {m.get('sha256', '')[:12]}  "
            f"backend {m.get('backend', '')}  precision {m.get('precision', '')}",
            f"data     {d.get('data_dir', '')}  {d.get('n_triplets', 0)} triplets, "
            f"{d.get('n_images', 0)} images, {d.get('n_anchors', 0)} anchors",
            f"routing  reconstruction decoder chosen by {self.routing} posture",
            "",
            "Verification (Euclidean distance of unit embeddings; a pair is accepted when d <= threshold)",
        ]
        rows = []
        for name, g in self._groups():
            x = g["verification"]
            rows.append(
                [
                    name,
                    str(x["n"]),
                    _f(x["triplet_accuracy"]),
                    _f(x["margin_rate"]),
                    _f(x["roc_auc"]),
                    _f(x["eer"]),
                    _f(x["tar_at_far"]),
                    f"{x['d_pos_mean']:.3f}±{x['d_pos_std']:.3f}",
                    f"{x['d_neg_mean']:.3f}±{x['d_neg_std']:.3f}",
                ]
            )
        far_pct = f"{v['far_target'] * 100:g}%"
        lines += _table(
            [
                "posture",
                "n",
                "acc",
                f"margin@{v['margin']:g}",
                "AUC",
                "EER",
                f"TAR@FAR{far_pct}",
                "d_pos",
                "d_neg",
            ],
            rows,
        )
        lines += [
            f"thresholds (all): EER {v['threshold_eer']:.4f}; FAR {far_pct} {v['threshold_far']:.4f} "
            f"(FAR achieved {v['far_achieved'] * 100:.2f}%)",
            "",
            "Posture (anchors; acc of one posture = its recall)",
        ]
        rows = []
        for name, g in self._groups():
            x = g["posture"]
            f1 = x["macro_f1"] if name == "all" else x["f1"]
            rows.append([name, str(x["n"]), _f(x["accuracy"]), _f(f1), _f(x["mean_confidence"])])
        lines += _table(["posture", "n", "acc", "F1 (all: macro)", "confidence"], rows)
        lines += ["", "Confusion matrix (rows: true posture, columns: predicted)"]
        cm = ov["posture"]["confusion"]
        lines += _table(["true\\pred", *POSTURES], [[POSTURES[i], *map(str, r)] for i, r in enumerate(cm)])
        lines += ["", "Reconstruction (anchor reconstruction vs its unconcealed positive)"]
        rows = []
        for name, g in self._groups():
            x = g["reconstruction"]
            rows.append(
                [
                    name,
                    str(x["n"]),
                    f"{x['ssim_mean']:.4f}±{x['ssim_std']:.4f}",
                    f"{x['psnr_mean']:.2f}±{x['psnr_std']:.2f}",
                    _f(x["l1_mean"], ".4f"),
                    _f(x["share_ssim_below_0_7"]),
                    _f(x["share_ssim_at_least_0_95"]),
                ]
            )
        lines += _table(["posture", "n", "SSIM", "PSNR dB", "L1", "SSIM<0.7", "SSIM>=0.95"], rows)
        ips = self.timing.get("images_per_s")
        lines += [
            "",
            f"inference {self.timing.get('inference_s', 0.0):.2f} s"
            + (f" ({ips:.1f} images/s)" if ips else ""),
        ]
        return "\n".join(lines)


def training_people_warning(
    manifest: Any, data_dir: str | Path, triplets_csv: str | Path, precision: str = "fp32"
) -> str | None:
    """Say when a simulated dataset's people may include those the bundle was trained on, else None.

    The bundle records the simulated dataset its threshold was chosen on (seed, identity count):
    the same seed makes the same people, so a dataset of that seed holds training people unless
    its triplets use only that very dataset's held-out test identities. Figures on training
    people (the demo scores 1.000 on them) say nothing about unseen people.
    """
    variant = (manifest.get("variants") or {}).get(precision) or {}
    chosen = ((variant.get("verification") or {}).get("chosen_on") or {}).get("dataset") or {}
    meta_path = Path(data_dir) / "dataset.json"
    if "seed" not in chosen or not meta_path.is_file():
        return None
    import json

    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("seed") != chosen["seed"]:
        return None
    names = {
        str(parse_crop_name(p.name).identity)
        for t in read_triplets(triplets_csv, data_dir=data_dir, check_files=False)
        for p in (t.anchor, t.positive, t.negative)
    }
    held_out = set(meta.get("test_identities") or [])
    if meta.get("identities") == chosen.get("identities") and names <= held_out:
        return None  # the training dataset's own test split: people the model never saw
    return (
        f"this dataset was simulated with seed {meta.get('seed')}, the seed of the people this bundle "
        f"was trained on ({chosen.get('identities')} identities of seed {chosen['seed']}, "
        f"'{chosen.get('name', '?')}'): its identities are the same people, so these figures are not "
        "for unseen people; use `thzedge sim dataset --seed` with another seed"
    )
