"""Read a recording's frames and condition each one exactly as the daemon does.

The profile is chosen by the daemon's rule (`calibration.profile.resolve_profile`: an explicit
profile, else the one the recording carries, else identity calibration), and each frame goes
through `edge.pipeline.context.QueuedFrame.prepare`, the call the daemon's acquisition stage
makes, so a replayed frame reaches the model as the same tensor it did live.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.conditioning import ConditioningParams
from calibration.profile import CalibrationProfile, resolve_profile
from edge.pipeline.context import ProcessingContext, QueuedFrame
from scanner_io.frame import Frame
from scanner_io.recording import RecordingReader

CalibrationArg = CalibrationProfile | str | os.PathLike[str] | None


@dataclass(frozen=True)
class ReplayedFrame:
    """One recorded frame after conditioning: its header fields and model input (or why not)."""

    frame: Frame
    x: np.ndarray | None  # [64, 64] float32 in [0,1]; None when conditioning failed
    error: BaseException | None = None

    @property
    def seq(self) -> int:
        return self.frame.header.seq


@dataclass
class Replay:
    """A recording opened for replay: the context it is conditioned with and what reading found."""

    path: Path
    context: ProcessingContext
    origin: str  # where the profile came from, for messages
    reader: RecordingReader
    malformed: int = 0
    frames: int = 0

    @property
    def calibration_id(self) -> str:
        return self.context.calibration_id

    def __iter__(self) -> Iterator[ReplayedFrame]:
        """Yield every well-formed frame conditioned with `context`; malformed ones are counted."""
        self.frames = self.malformed = 0
        for rec in self.reader:
            if not isinstance(rec.item, Frame):
                self.malformed += 1
                continue
            q = QueuedFrame(rec.item, 0.0)
            q.prepare(self.context)
            self.frames += 1
            yield ReplayedFrame(rec.item, q.x, q.error)


def open_replay(path: str | os.PathLike[str], calibration: CalibrationArg = None) -> Replay:
    """Open a recording and decide its calibration by the daemon's rule (configured, carried, none)."""
    reader = RecordingReader(path)
    reader.read_preamble()  # the recorder writes the profile before the first frame
    choice = resolve_profile(calibration, reader)
    params = choice.profile.conditioning if choice.profile is not None else ConditioningParams()
    ctx = ProcessingContext(profile=choice.profile, params=params, calibration_id=choice.calibration_id)
    return Replay(path=reader.path, context=ctx, origin=choice.origin, reader=reader)
