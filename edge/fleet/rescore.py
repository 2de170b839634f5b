"""Re-score one recording with a new bundle against a baseline: the engine-neutral core.

`score_recording(path, job)` is the one unit of work every engine runs (`edge.fleet.engines`):
it conditions the recording's frames as the daemon does (`edge.fleet.replay`), runs the new
bundle and the baseline through `edge.runner.infer_isolated` (the daemon's batching and failure
isolation), matches embeddings against each model's gallery by the daemon's rule
(`edge.gallery.match_probe`) and returns one row per frame. Its ONNX Runtime sessions are made
inside the call, with an explicit `intra_op_num_threads` (ORT ignores OMP_NUM_THREADS), because a
session cannot be pickled to a worker and a worker must not take more cores than it was given.

Rows name no identity and hold no embedding or image. Match scores (distances) are kept only
when the job asks for them (`scores=True`), as a gallery's scores are biometric-derived.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import Bundle
from edge.evaluation import ssim
from edge.fleet.replay import ReplayedFrame, open_replay
from edge.gallery import Gallery, Match, VerificationMode, match_probe
from edge.runner import FrameOutcome, Runner, Task, TaskFailure, infer_isolated
from scanner_io.atrest import load_storage_key
from scanner_io.errors import ThzEdgeError

# Column order of a row (the Parquet schema in edge.fleet.engines follows it).
ROW_FIELDS: tuple[str, ...] = (
    "recording",
    "scanner",
    "seq",
    "posture",
    "posture_baseline",
    "confidence",
    "confidence_baseline",
    "decision",
    "decision_baseline",
    "score",
    "score_baseline",
    "recon_ssim",
    "status",
    "error",
)
Row = dict[str, Any]


@dataclass(frozen=True)
class ModelSpec:
    """One side of the comparison: a bundle, its precision and backend, and optionally its gallery."""

    bundle: str
    precision: str = "fp32"
    backend: str = "ort"
    gallery: str | None = None
    threshold: float | None = None

    @property
    def label(self) -> str:
        """A short name for tables: bundle directory name and precision."""
        return f"{Path(self.bundle).name}:{self.precision}"


@dataclass(frozen=True)
class RescoreJob:
    """What to compare on every recording; plain strings and numbers, so it pickles to any worker."""

    model: ModelSpec
    baseline: ModelSpec
    calibration: str | None = None  # a profile for every recording instead of the one each carries
    threads: int = 1  # intra_op_num_threads of each ORT session
    scores: bool = False  # keep match distances in the rows (opt-in: biometric-derived)
    reconstruction: bool = True
    verification_mode: VerificationMode = VerificationMode.auto
    # Key file of encrypted recordings; each worker reads it (a path, so no key travels in a job).
    storage_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form (stored beside the results)."""
        d = asdict(self)
        d["verification_mode"] = self.verification_mode.value
        return d


@dataclass
class _Side:
    """One model opened inside the worker: its runner and gallery."""

    runner: Runner
    gallery: Gallery | None
    postures: tuple[str, ...] = field(default_factory=tuple)


def _open_side(spec: ModelSpec, threads: int) -> _Side:
    bundle = Bundle.open(spec.bundle)
    runner = Runner.from_bundle(bundle, backend=spec.backend, precision=spec.precision, threads=threads)
    try:
        gallery = None
        if spec.gallery is not None:
            gallery = Gallery.load(
                Path(spec.gallery), bundle, threshold=spec.threshold, precision=spec.precision
            )
    except BaseException:
        runner.close()
        raise
    return _Side(runner, gallery, bundle.postures)


def _predict(runner: Runner, frames: Sequence[ReplayedFrame], reconstruct: bool) -> list[FrameOutcome | None]:
    """Run the frames the daemon would run in its batches; None for the others (error, no head)."""
    outcomes: list[FrameOutcome | None] = [None] * len(frames)
    ok = [i for i, f in enumerate(frames) if f.runs_model]
    if not ok:
        return outcomes
    x = np.stack([frames[i].x for i in ok])[:, None].astype(np.float32)  # type: ignore[misc]
    for c in runner.chunks(len(ok)):
        batch = infer_isolated(runner, x[c], reconstruct=reconstruct)
        for i, outcome in zip(ok[c], batch.frames, strict=True):
            outcomes[i] = outcome
    return outcomes


def _match(side: _Side, frame: ReplayedFrame, outcome: FrameOutcome, mode: VerificationMode) -> Match | None:
    p = outcome.prediction
    if side.gallery is None or p is None:
        return None
    try:
        return match_probe(side.gallery, p.embedding, frame.frame.header.claimed_identity, p.posture, mode)
    except Exception as exc:
        outcome.failures.append(TaskFailure(Task.verify, exc))
        return None


def _label(side: _Side, outcome: FrameOutcome | None) -> tuple[str | None, float | None]:
    if outcome is None or outcome.prediction is None:
        return None, None
    k = outcome.prediction.posture
    name = side.postures[k] if k < len(side.postures) else str(k)
    return name, float(outcome.prediction.confidence)


def _status(frame: ReplayedFrame, outcomes: Iterable[FrameOutcome | None]) -> tuple[str, str | None]:
    """The daemon's status: `error` when a frame could not be conditioned or encoded by either
    model, `partial` when a later task failed (an `uncalibrated` frame stays `uncalibrated`),
    `no_face` when the model did not run. The error column names the task and the exception type
    (never its message, which may quote an identity)."""
    if frame.error is not None:
        return "error", f"{Task.condition.value}: {type(frame.error).__name__}"
    status, first = frame.status, None
    for o in outcomes:
        if o is None:
            continue
        for f in o.failures:
            if f.task is Task.encoder:
                status = "error"
            elif status == "ok":
                status = "partial"
            first = first or f"{f.task.value}: {type(f.error).__name__}"
    return status, first


def _recon_ssim(a: FrameOutcome | None, b: FrameOutcome | None) -> float | None:
    ra = a.prediction.reconstruction if a is not None and a.prediction is not None else None
    rb = b.prediction.reconstruction if b is not None and b.prediction is not None else None
    if ra is None or rb is None:
        return None
    return float(ssim(ra, rb)[0])


class RecordingScorer:
    """Both models opened once (in the worker that calls this), scoring recording after recording.

    Engines keep one per worker (the local loop, one Ray actor); `score_recording` is the
    one-shot form. Sessions have `job.threads` intra-op threads each; `close()` frees them.
    """

    def __init__(self, job: RescoreJob) -> None:
        check_job(job)
        self.job = job
        self._key = load_storage_key(Path(job.storage_key)) if job.storage_key is not None else None
        self._new = _open_side(job.model, job.threads)
        try:
            self._base = _open_side(job.baseline, job.threads)
        except BaseException:
            self._new.runner.close()
            raise

    def __call__(self, path: str | os.PathLike[str]) -> list[Row]:
        """Score every frame of one recording; one row per well-formed frame, in file order."""
        job, new, base = self.job, self._new, self._base
        frames = list(open_replay(path, job.calibration, key=self._key))
        out_new = _predict(new.runner, frames, job.reconstruction)
        out_base = _predict(base.runner, frames, job.reconstruction)
        rows = []
        for f, on, ob in zip(frames, out_new, out_base, strict=True):
            mn = _match(new, f, on, job.verification_mode) if on is not None else None
            mb = _match(base, f, ob, job.verification_mode) if ob is not None else None
            posture, conf = _label(new, on)
            posture_b, conf_b = _label(base, ob)
            status, error = _status(f, (on, ob))
            rows.append(
                {
                    "recording": str(path),
                    "scanner": f.frame.header.scanner,
                    "seq": int(f.seq),
                    "posture": posture,
                    "posture_baseline": posture_b,
                    "confidence": conf,
                    "confidence_baseline": conf_b,
                    "decision": mn.decision if mn is not None else None,
                    "decision_baseline": mb.decision if mb is not None else None,
                    "score": mn.score if mn is not None and job.scores else None,
                    "score_baseline": mb.score if mb is not None and job.scores else None,
                    "recon_ssim": _recon_ssim(on, ob),
                    "status": status,
                    "error": error,
                }
            )
        return rows

    def close(self) -> None:
        """Close both models' sessions."""
        self._new.runner.close()
        self._base.runner.close()

    def __enter__(self) -> RecordingScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score_recording(path: str | os.PathLike[str], job: RescoreJob) -> list[Row]:
    """Score one recording with the job's model and baseline (sessions made and closed here)."""
    with RecordingScorer(job) as scorer:
        return scorer(path)


def rows_digest(rows: Iterable[Row]) -> str:
    """Return a sha256 over rows in (recording, seq) order, floats by their exact repr."""
    h = hashlib.sha256()
    for row in sorted(rows, key=lambda r: (r["recording"], r["scanner"], r["seq"])):
        h.update(json.dumps([row.get(k) for k in ROW_FIELDS]).encode())
        h.update(b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Summary: flips per recording and overall


@dataclass(frozen=True)
class RecordingSummary:
    """Flip counts of one recording."""

    recording: str
    frames: int
    posture_flips: int
    decisions: int  # frames where both models made a decision
    decision_flips: int
    errors: int
    mean_recon_ssim: float | None

    @property
    def posture_flip_rate(self) -> float:
        return self.posture_flips / self.frames if self.frames else 0.0

    @property
    def decision_flip_rate(self) -> float:
        return self.decision_flips / self.decisions if self.decisions else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form, rates included."""
        d = asdict(self)
        d["posture_flip_rate"] = self.posture_flip_rate
        # No frame decided by both models (no gallery): there is no rate, not a rate of 0.
        d["decision_flip_rate"] = self.decision_flip_rate if self.decisions else None
        return d

    def decision_rate_text(self) -> str:
        """The decision flip rate as people read it: `n/a` when nothing was decided."""
        return f"{100 * self.decision_flip_rate:.2f}%" if self.decisions else "n/a"


def _summarize_one(recording: str, rows: Sequence[Row]) -> RecordingSummary:
    both = [r for r in rows if r["posture"] is not None and r["posture_baseline"] is not None]
    decided = [r for r in rows if r["decision"] is not None and r["decision_baseline"] is not None]
    ssims = [r["recon_ssim"] for r in rows if r["recon_ssim"] is not None]
    return RecordingSummary(
        recording=recording,
        frames=len(rows),
        posture_flips=sum(r["posture"] != r["posture_baseline"] for r in both),
        decisions=len(decided),
        decision_flips=sum(r["decision"] != r["decision_baseline"] for r in decided),
        errors=sum(r["status"] == "error" for r in rows),
        mean_recon_ssim=float(np.mean(ssims)) if ssims else None,
    )


@dataclass(frozen=True)
class RescoreSummary:
    """Flips per recording and overall, the worst recordings first."""

    model: str
    baseline: str
    engine: str
    recordings: list[RecordingSummary]
    overall: RecordingSummary
    duration_s: float = 0.0
    rows_sha256: str = ""

    def worst(self, n: int = 5) -> list[RecordingSummary]:
        """The `n` recordings with the highest decision, then posture flip rates."""
        key = lambda s: (s.decision_flip_rate, s.posture_flip_rate, s.recording)  # noqa: E731
        return sorted(self.recordings, key=key, reverse=True)[:n]

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form (`thzedge --json rescore`, summary.json)."""
        return {
            "model": self.model,
            "baseline": self.baseline,
            "engine": self.engine,
            "duration_s": round(self.duration_s, 3),
            "rows_sha256": self.rows_sha256,
            "overall": self.overall.to_dict(),
            "worst": [s.recording for s in self.worst()],
            "recordings": [s.to_dict() for s in self.recordings],
        }

    def render(self, worst: int = 5) -> str:
        """Return the text table: overall line, then the worst recordings."""
        o = self.overall

        def line(name: str, s: RecordingSummary) -> str:
            ssim_txt = f"{s.mean_recon_ssim:.4f}" if s.mean_recon_ssim is not None else "-"
            return (
                f"{name:<40} {s.frames:>7} {s.posture_flips:>6} {100 * s.posture_flip_rate:>7.2f}% "
                f"{s.decision_flips:>6}/{s.decisions:<6} {s.decision_rate_text():>8} "
                f"{ssim_txt:>8} {s.errors:>6}"
            )

        head = (
            f"{'recording':<40} {'frames':>7} {'posture flips':>15} "
            f"{'decision flips':>22} {'ssim':>8} {'errors':>6}"
        )
        out = [
            f"model {self.model} vs baseline {self.baseline} ({self.engine}, {self.duration_s:.2f} s)",
            head,
            line("overall", o),
        ]
        if self.recordings:
            out.append(f"worst {min(worst, len(self.recordings))} of {len(self.recordings)} recordings:")
            out += [line(_short(s.recording), s) for s in self.worst(worst)]
        return "\n".join(out)


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def summarize(rows: Sequence[Row], job: RescoreJob, engine: str, duration_s: float = 0.0) -> RescoreSummary:
    """Count posture and decision flips per recording (in first-seen order) and overall."""
    by_rec: dict[str, list[Row]] = {}
    for r in rows:
        by_rec.setdefault(r["recording"], []).append(r)
    per = [_summarize_one(name, rs) for name, rs in by_rec.items()]
    return RescoreSummary(
        model=job.model.label,
        baseline=job.baseline.label,
        engine=engine,
        recordings=per,
        overall=_summarize_one("overall", rows),
        duration_s=duration_s,
        rows_sha256=rows_digest(rows),
    )


def score_shifts(rows: Sequence[Row]) -> tuple[str, np.ndarray]:
    """Per-frame shift new − baseline of the match score where kept, else of posture confidence.

    Returns which of the two it is ("score" or "confidence") and the shifts.
    """
    kind = "score"
    kept = [(r["score"], r["score_baseline"]) for r in rows]
    kept = [(a, b) for a, b in kept if a is not None and b is not None]
    if not kept:
        kind = "confidence"
        kept = [
            (r["confidence"], r["confidence_baseline"])
            for r in rows
            if r["confidence"] is not None and r["confidence_baseline"] is not None
        ]
    return kind, np.array([a - b for a, b in kept if math.isfinite(a - b)], dtype=np.float64)


def check_job(job: RescoreJob) -> None:
    """Refuse a job that compares a model with itself (nothing could flip)."""
    if job.model == job.baseline:
        raise ThzEdgeError(
            f"--model and --baseline are the same ({job.model.label}); give another bundle or precision"
        )
