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

from edge.gallery import Gallery, VerificationMode

__all__ = ["VisitFusion"]


@dataclass
class _Visit:
    visit: int
    gallery: Gallery
    mode: str  # "1:1" | "1:N"
    claimed: str | None
    sums: np.ndarray  # summed distance to every enrolled identity, in `gallery.identities` order
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
        embedding: np.ndarray,
        posture: int,
        claimed: str | None,
        mode: VerificationMode,
    ) -> dict[str, Any] | None:
        """Match one frame of a visit; return the result's `verification.visit` object (None: no visit).

        Before the visit has `frames` frames its decision is `pending`; from then on it is the
        frozen visit decision (`accept`, `reject` (1:1), `unknown`) with the fused score.
        """
        if visit is None or mode is VerificationMode.off:
            return None
        one_to_one = mode is VerificationMode.one_to_one or (
            mode is VerificationMode.auto and claimed is not None
        )
        kind = "1:1" if one_to_one else "1:N"
        v = self._visits.get(scanner)
        # A new visit, a reloaded gallery or another claim starts the fusion afresh.
        if v is None or (v.visit, v.mode, v.claimed) != (visit, kind, claimed) or v.gallery is not gallery:
            v = _Visit(visit, gallery, kind, claimed, np.zeros(len(gallery), np.float64))
            self._visits[scanner] = v
            while len(self._visits) > self.max_scanners:
                self._visits.popitem(last=False)
        self._visits.move_to_end(scanner)
        v.frames += 1
        if v.decided is None:
            v.sums += gallery.distances(embedding, posture)
            if v.frames >= self.frames:
                v.decided = self._decide(v)
        out: dict[str, Any] = {"id": visit, "frames": v.frames, "decision_frames": self.frames}
        out.update(v.decided if v.decided is not None else {"mode": kind, "decision": "pending"})
        return out

    def _decide(self, v: _Visit) -> dict[str, Any]:
        chosen = self.threshold if v.mode == "1:1" else self.identify_threshold
        t = float(chosen) if chosen is not None else v.gallery.decision_threshold()
        mean = v.sums / v.frames
        names = v.gallery.identities
        identity: str | None = None
        score: float | None = None
        if v.mode == "1:1":
            identity = v.claimed
            if v.claimed in names:
                score = float(mean[names.index(v.claimed)])
            decision = "unknown" if score is None else ("accept" if score <= t else "reject")
        else:
            decision = "unknown"
            if mean.size:
                best = int(np.argmin(mean))
                score = float(mean[best])
                if score <= t:
                    identity, decision = names[best], "accept"
        return {"mode": v.mode, "identity": identity, "score": score, "decision": decision, "threshold": t}
