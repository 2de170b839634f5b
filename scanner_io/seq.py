"""Frames missing upstream, counted from each scanner's `seq`: the one rule every consumer uses.

Sources (`SourceStats.upstream_gaps`), the daemon's acquisition stage (`upstream_gap` drops) and
`recording_info` (`seq_gaps`) all feed the same `SeqTracker`, so `thzedge record`, `thzedge run`
and `thzedge recording info` report the same losses for the same stream. The invariant: between
a scanner's first and last seq, every seq slot is a frame, a malformed message or a counted gap.

- a frame whose seq jumps ahead of the last one counts the seqs in between as missing;
- a malformed message with a readable seq is a slot too: the seqs missing before it are counted
  (the step it returns), and the next frame is no gap for it;
- a malformed message without a readable seq explains one missing seq of the next gap;
- a frame's seq that goes back or repeats is a scanner restart (a reset), not a gap; so is a
  jump ahead of more than MAX_PLAUSIBLE_GAP seqs (a forged seq must not add 9e18 missing frames);
  a malformed message whose seq would do either counts as one whose seq is unreadable.

State is keyed only by validated scanner names (those of decoded frames); a malformed message
counts against a scanner already seen, else against the stream's scanner, never under a name of
its own. At most MAX_SCANNERS scanners are followed; the longest unseen one is forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# More scanners than one source ever carries (one daemon per scanner); bounds memory per source.
MAX_SCANNERS = 64
# 2^24 frames is six days at 30 fps: a longer jump within one connection is not frames lost.
MAX_PLAUSIBLE_GAP = 2**24


@dataclass(frozen=True)
class SeqStep:
    """What one message's seq says: frames missing before it, and the seq it reset from, if any."""

    missing: int = 0
    reset_from: int | None = None


class SeqTracker:
    """Follow each scanner's seq; `gaps` and `resets` are the running totals."""

    def __init__(self) -> None:
        self._last: OrderedDict[str, int] = OrderedDict()
        self._stream: str | None = None  # the scanner of the latest frame: owner of nameless messages
        # A readable seq seen before any frame: the first frame's scanner starts from it.
        self._orphan_seq: int | None = None
        self._unknown_malformed = 0  # malformed messages since the last frame whose seq was unreadable
        self.gaps = 0
        self.resets = 0

    @property
    def stream(self) -> str | None:
        """The scanner of the latest frame (None before the first): nameless messages count on it."""
        return self._stream

    @property
    def scanners(self) -> int:
        """How many scanners are followed (at most MAX_SCANNERS)."""
        return len(self._last)

    def _step(self, last: int | None, seq: int) -> SeqStep:
        if last is None:
            return SeqStep()
        gap = seq - last - 1
        if gap < 0 or gap > MAX_PLAUSIBLE_GAP:
            return SeqStep(reset_from=last)
        explained = min(gap, self._unknown_malformed)
        return SeqStep(missing=gap - explained)

    def _record(self, name: str, seq: int, step: SeqStep) -> SeqStep:
        self._unknown_malformed = 0
        self._last[name] = seq
        self._last.move_to_end(name)
        while len(self._last) > MAX_SCANNERS:
            self._last.popitem(last=False)
        self.gaps += step.missing
        self.resets += step.reset_from is not None
        return step

    def last(self, scanner: str) -> int | None:
        """Return the last seq seen (or used up) for `scanner`, None before its first."""
        return self._last.get(scanner)

    def frame(self, scanner: str, seq: int) -> SeqStep:
        """Note a valid frame; return how many frames are missing before it and whether it reset."""
        last = self._last.get(scanner)
        if last is None and self._stream is None and self._orphan_seq is not None:
            last, self._orphan_seq = self._orphan_seq, None
        self._stream = scanner
        return self._record(scanner, seq, self._step(last, seq))

    def malformed(self, scanner: str | None, seq: int | None) -> SeqStep:
        """Note a rejected message; return the frames missing before its seq, when it is readable.

        `scanner` counts only when a frame of that scanner was seen (it is unvalidated input);
        otherwise the message belongs to the stream's scanner.
        """
        if seq is None:
            self._unknown_malformed += 1
            return SeqStep()
        name = scanner if scanner is not None and scanner in self._last else self._stream
        last = self._orphan_seq if name is None else self._last.get(name)
        step = self._step(last, seq)
        if step.reset_from is not None:
            # A rejected message's seq going back or leaping ahead proves nothing about the stream
            # (only frames reset it): it counts as a message whose seq could not be read.
            self._unknown_malformed += 1
            return SeqStep()
        if name is None:
            # Before any frame the stream has no name yet; its first frame continues from here.
            self._orphan_seq = seq
            self._unknown_malformed = 0
            self.gaps += step.missing
            return step
        return self._record(name, seq, step)
