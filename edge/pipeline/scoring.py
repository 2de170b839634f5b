"""Scoring a stream against the simulator's truth (`thzedge run --score`).

The daemon's results are compared, as they are published, with the truth every simulated frame
carries (`scanner_io.simulator.SimTruth`): the main job's quality shows without writing a
subscriber. Per published result:

- **posture**: the published class index against the true posture;
- **reconstruction** (when it ran): SSIM against the frame's target, the frame-averaged
  unconcealed reference capture of the same pose calibrated with the daemon's profile and cut at
  the frame's own ROI (as `calibration.simulated.CalibratedSimulator.target` makes it);
- **verification 1:1** (the frame claimed an identity): a genuine claim names the true person
  (`id001`, … as the simulator names them; enrol under those names), an impostor claim another
  enrolled one. TAR = genuine claims accepted, FAR = impostor claims accepted;
- **verification 1:N**: for people enrolled in the gallery, identified correctly / identified as
  someone else (false identification) / left unknown; for people not enrolled, rejected
  (`unknown`) or falsely accepted;
- **per visit** (frames tagged with a `visit`, as the simulator tags them): the same rates over
  visit decisions (edge/visits.py), each visit counted once, when its decision is made.

Rates are computed at the threshold the daemon ran with. A replay of a recording made from the
simulator carries the truth labels it recorded (`scanner_io.recording.RecordedTruth`: no
reference image, so no SSIM); frames without truth (a scanner) are counted as `unscored`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.conditioning import calibrate, condition_with_roi
from edge.evaluation import ssim
from edge.pipeline.context import ProcessingContext
from edge.results import FrameResult
from scanner_io.frame import Frame
from scanner_io.recording import RecordedTruth
from scanner_io.simulator import SimTruth

__all__ = ["TruthScorer", "render_score"]


@dataclass
class _Pending:
    identity: str
    posture: int
    claimed: str | None
    enrolled: bool | None  # None: no gallery
    claimed_enrolled: bool
    target: np.ndarray | None


@dataclass
class _Decisions:
    """Verification outcomes against truth: of frames, or of visits."""

    genuine: int = 0
    genuine_accept: int = 0
    impostor: int = 0
    impostor_accept: int = 0
    claim_unknown: int = 0
    enrolled: int = 0
    id_correct: int = 0
    id_wrong: int = 0
    id_unknown: int = 0
    unenrolled: int = 0
    unenrolled_rejected: int = 0

    def count(self, p: _Pending, v: dict[str, Any]) -> None:
        """Score one decision (`v`: a result's verification object or its visit object)."""
        decision = v.get("decision")
        if v.get("mode") == "1:1":
            if not p.claimed_enrolled:
                self.claim_unknown += 1
            elif p.claimed == p.identity:
                self.genuine += 1
                self.genuine_accept += decision == "accept"
            else:
                self.impostor += 1
                self.impostor_accept += decision == "accept"
        elif p.enrolled:
            self.enrolled += 1
            if decision == "accept":
                if v.get("identity") == p.identity:
                    self.id_correct += 1
                else:
                    self.id_wrong += 1
            else:
                self.id_unknown += 1
        else:
            self.unenrolled += 1
            self.unenrolled_rejected += decision != "accept"

    def report(self) -> dict[str, Any]:
        """The 1:1 and 1:N rates (only the modes that were counted)."""
        out: dict[str, Any] = {}
        if self.genuine or self.impostor or self.claim_unknown:
            out["1:1"] = {
                "genuine": self.genuine,
                "impostor": self.impostor,
                "claimed_not_enrolled": self.claim_unknown,
                "tar": _rate(self.genuine_accept, self.genuine),
                "far": _rate(self.impostor_accept, self.impostor),
            }
        if self.enrolled or self.unenrolled:
            out["1:N"] = {
                "enrolled_probes": self.enrolled,
                "identified": _rate(self.id_correct, self.enrolled),
                "false_identification": _rate(self.id_wrong, self.enrolled),
                "left_unknown": _rate(self.id_unknown, self.enrolled),
                "unenrolled_probes": self.unenrolled,
                "unenrolled_rejected": _rate(self.unenrolled_rejected, self.unenrolled),
            }
        return out


@dataclass
class _Counts:
    scored: int = 0
    unscored: int = 0
    posture_ok: int = 0
    ssim: list[float] = field(default_factory=list)
    frames: _Decisions = field(default_factory=_Decisions)
    visits: _Decisions = field(default_factory=_Decisions)
    visit_frames: int | None = None  # how many frames a visit decision was fused from


def _rate(n: int, d: int) -> float | None:
    return None if d == 0 else n / d


class TruthScorer:
    """Collects truth when a frame is post-processed and scores its result once it is published."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int], _Pending] = {}  # by (scanner, seq) of the result
        self._c = _Counts()
        self._visit_scored: dict[str, int] = {}  # scanner → the last visit whose decision was scored
        self._lock = threading.Lock()
        self.threshold: float | None = None

    def expect(self, result: FrameResult, frame: Frame, ctx: ProcessingContext, reconstruct: bool) -> None:
        """Note the truth of a frame whose result is about to be published (inference thread)."""
        truth = frame.truth
        if not isinstance(truth, SimTruth | RecordedTruth):
            with self._lock:
                self._c.unscored += 1
            return
        target = None
        if reconstruct and ctx.params is not None and isinstance(truth, SimTruth):
            # The frame's own ROI with the daemon's profile, then the reference cut at that ROI.
            _, roi = condition_with_roi(calibrate(frame.data, ctx.profile), ctx.params)
            target = condition_with_roi(calibrate(truth.reference, ctx.profile), ctx.params, roi)[0]
        gallery = ctx.gallery
        claimed = frame.header.claimed_identity
        pending = _Pending(
            identity=truth.identity_name,
            posture=truth.posture,
            claimed=claimed,
            enrolled=None if gallery is None else truth.identity_name in gallery,
            claimed_enrolled=gallery is not None and claimed is not None and claimed in gallery,
            target=target,
        )
        with self._lock:
            self._pending[(result.scanner, result.seq)] = pending

    def published(self, result: FrameResult) -> None:
        """Score one published result against the truth noted for it (publisher thread)."""
        with self._lock:
            p = self._pending.pop((result.scanner, result.seq), None)
            if p is None:
                return
            c = self._c
            c.scored += 1
            if result.posture is not None and int(result.posture["index"]) == p.posture:
                c.posture_ok += 1
            if p.target is not None and result.reconstruction is not None:
                c.ssim.append(float(np.mean(ssim(result.reconstruction, p.target))))
            v = result.verification
            if v is None:
                return
            self.threshold = v.get("threshold")
            c.frames.count(p, v)
            fused = v.get("visit")
            if (
                fused is not None
                and fused.get("decision") != "pending"
                and self._visit_scored.get(result.scanner) != fused.get("id")
            ):
                self._visit_scored[result.scanner] = fused.get("id")
                c.visit_frames = fused.get("decision_frames")
                c.visits.count(p, fused)

    def report(self) -> dict[str, Any]:
        """The figures so far (rates are None where nothing was counted)."""
        with self._lock:
            c = self._c
            out: dict[str, Any] = {
                "scored": c.scored,
                "unscored": c.unscored,
                "not_published": len(self._pending),
                "threshold": self.threshold,
                "posture_accuracy": _rate(c.posture_ok, c.scored),
                "ssim_mean": float(np.mean(c.ssim)) if c.ssim else None,
                "ssim_frames": len(c.ssim),
            }
            out.update(c.frames.report())
            if c.visit_frames is not None:
                out["visits"] = {"decision_frames": c.visit_frames, **c.visits.report()}
            return out


def render_score(score: dict[str, Any]) -> str:
    """The `--score` lines `thzedge run` prints after its summary."""

    def f(v: Any, spec: str = ".3f") -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [
        f"score vs simulator truth: {score['scored']} results scored ({score['unscored']} without truth, "
        f"{score['not_published']} not published); posture accuracy {f(score['posture_accuracy'])}; "
        f"reconstruction SSIM {f(score['ssim_mean'])} over {score['ssim_frames']} frames; "
        f"threshold {f(score['threshold'], '.4f')}"
    ]
    lines += _decision_lines(score, "")
    visits = score.get("visits")
    if visits:
        n = visits["decision_frames"]
        lines.append(f"  per visit (one decision from each visit's first {n} frames):")
        lines += _decision_lines(visits, "  ", "visits")
    return "\n".join(lines)


def _decision_lines(score: dict[str, Any], indent: str, unit: str = "probes") -> list[str]:
    def f(v: Any, spec: str = ".3f") -> str:
        return "n/a" if v is None else format(v, spec)

    lines = []
    one = score.get("1:1")
    if one:
        lines.append(
            f"{indent}  1:1: TAR {f(one['tar'])} ({one['genuine']} genuine claims), "
            f"FAR {f(one['far'], '.4f')} ({one['impostor']} impostor claims), "
            f"{one['claimed_not_enrolled']} claim(s) of people not enrolled"
        )
    many = score.get("1:N")
    if many:
        lines.append(
            f"{indent}  1:N: enrolled people ({many['enrolled_probes']} {unit}): identified "
            f"{f(many['identified'])}, false identification {f(many['false_identification'], '.4f')}, "
            f"unknown {f(many['left_unknown'])}; not enrolled ({many['unenrolled_probes']} {unit}): "
            f"rejected {f(many['unenrolled_rejected'])}"
        )
    return lines
