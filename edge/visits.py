"""Visit-level verification: one decision per passage, fused from its first frames.

A person walking past the scanner gives tens of frames; the acquisition software tags them with
one `visit` number (docs/protocol.md). A single concealed frame is a weak probe — the field's
per-frame figures are in docs/operations.md — but the frames of one visit are independent looks
at one person: the mean, over the visit's first `frames` frames, of each frame's distance to
every enrolled identity (the same per-frame rule as `Gallery.distances`: nearest reference of
the frame's predicted posture) separates people far better than any one frame.

The decision is made once, when the visit's `frames`-th frame is matched, and then frozen: every
later result of that visit repeats it (a gate opens once; a decision that kept changing would
let an impostor wait for a lucky frame). Frames without a `visit` are matched alone, as before.
State is one visit per scanner, at most `max_scanners` scanners (least recently seen evicted).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.gallery import Gallery, Scores, VerificationMode, is_one_to_one

__all__ = ["VisitFusion"]


@dataclass
class _Visit:
    visit: int
    gallery: Gallery
    mode: str  # "1:1" | "1:N"
    claimed: str | None
    names: tuple[str, ...]  # the gallery's identities, in the order of `sums`
    sums: np.ndarray  # summed distance to every enrolled identity
    frames: int = 0
    decided: dict[str, Any] | None = None


class VisitFusion:
    """Fuses the per-frame distances of each scanner's current visit into one frozen decision."""

    def __init__(
        self,
        frames: int,
        threshold: float | None = None,
        identify_threshold: float | None = None,
        max_scanners: int = 64,
    ) -> None:
        if frames < 1:
            raise ValueError(f"a visit decision needs at least 1 frame, got {frames}")
        self.frames = int(frames)
        # Fused-distance thresholds, 1:1 and 1:N; None: the gallery's (per-frame) threshold. 1:N
        # needs its own, lower one: the nearest of many identities is close by chance more often.
        self.threshold = threshold
        self.identify_threshold = identify_threshold
        self.max_scanners = max_scanners
        self._visits: OrderedDict[str, _Visit] = OrderedDict()

    def add(
        self,
        scanner: str,
        visit: int | None,
        gallery: Gallery,
        scores: Scores,
        claimed: str | None,
        mode: VerificationMode,
    ) -> dict[str, Any] | None:
        """Add one frame's `scores` (`gallery.scores` of its embedding and predicted posture) to its
        visit; return the result's `verification.visit` object (None: no visit, or matching off).

        Before the visit has `frames` frames its decision is `pending`; from then on it is the
        frozen visit decision (`accept`, `reject` (1:1), `unknown`) with the fused score.
        """
        if visit is None or mode is VerificationMode.off:
            return None
        kind = "1:1" if is_one_to_one(mode, claimed) else "1:N"
        v = self._visits.get(scanner)
        # A new visit, a reloaded (or re-enrolled) gallery or another claim starts afresh.
        if (
            v is None
            or (v.visit, v.mode, v.claimed) != (visit, kind, claimed)
            or v.gallery is not gallery
            or (v.names is not scores.names and v.names != scores.names)  # same view: no compare
        ):
            v = _Visit(visit, gallery, kind, claimed, scores.names, np.zeros(len(scores.names), np.float64))
            self._visits[scanner] = v
            while len(self._visits) > self.max_scanners:
                self._visits.popitem(last=False)
        self._visits.move_to_end(scanner)
        v.frames += 1
        if v.decided is None:
            v.sums += scores.distances
            if v.frames >= self.frames:
                v.decided = self._decide(v)
        out: dict[str, Any] = {"id": visit, "frames": v.frames, "decision_frames": self.frames}
        out.update(v.decided if v.decided is not None else {"mode": kind, "decision": "pending"})
        return out

    def _decide(self, v: _Visit) -> dict[str, Any]:
        fused = Scores(v.names, v.sums / v.frames)
        if v.mode == "1:1":
            assert v.claimed is not None  # 1:1 is chosen only with a claim, or refused before
            return v.gallery.decide_1to1(fused, v.claimed, self.threshold).to_dict()
        return v.gallery.decide_1toN(fused, self.identify_threshold).to_dict()
