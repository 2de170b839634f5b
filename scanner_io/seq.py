"""Frames missing upstream, counted from each scanner's `seq`: the one rule every consumer uses.

Sources (`SourceStats.upstream_gaps`), the daemon's acquisition stage (`upstream_gap` drops) and
`recording_info` (`seq_gaps`) all feed the same `SeqTracker`, so `thzedge record`, `thzedge run`
and `thzedge recording info` report the same losses for the same stream:

- a frame whose seq jumps ahead of the last one counts the seqs in between as missing;
- a malformed message with a readable seq used that seq up: the next frame is no gap for it;
- a malformed message without a readable seq explains one missing seq of the next gap;
- a seq that goes back or repeats is a scanner restart (a reset), not a gap.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeqStep:
    """What one frame's seq says: frames missing before it, and the seq it reset from, if any."""

    missing: int = 0
    reset_from: int | None = None


class SeqTracker:
    """Follow each scanner's seq; `gaps` and `resets` are the running totals."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._first_scanner: str | None = None
        self._unknown_malformed = 0  # malformed messages since the last frame whose seq was unreadable
        self.gaps = 0
        self.resets = 0

    def frame(self, scanner: str, seq: int) -> SeqStep:
        """Note a valid frame; return how many frames are missing before it and whether it reset."""
        self._first_scanner = self._first_scanner or scanner
        last = self._last.get(scanner)
        step = SeqStep()
        if last is not None:
            gap = seq - last - 1
            if gap > 0:
                explained = min(gap, self._unknown_malformed)
                if gap > explained:
                    step = SeqStep(missing=gap - explained)
            elif gap < 0:
                step = SeqStep(reset_from=last)
        self._unknown_malformed = 0
        self._last[scanner] = seq
        self.gaps += step.missing
        self.resets += step.reset_from is not None
        return step

    def last(self, scanner: str) -> int | None:
        """Return the last seq seen (or used up) for `scanner`, None before its first."""
        return self._last.get(scanner)

    def malformed(self, scanner: str | None, seq: int | None) -> None:
        """Note a rejected message: its readable seq is used up, an unreadable one explains a gap."""
        if seq is None:
            self._unknown_malformed += 1
            return
        # Without a readable scanner the message belongs to the stream's (first) scanner.
        name = scanner or self._first_scanner
        if name is not None:
            self._last[name] = max(self._last.get(name, -1), int(seq))
