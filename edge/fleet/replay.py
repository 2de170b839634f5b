"""Read a recording's frames and prepare each one exactly as the daemon does.

The profile is chosen by the daemon's rule (`calibration.profile.resolve_profile`: an explicit
profile, else the one the recording carries, else identity calibration), the context is the
daemon's (`edge.pipeline.context.stream_context`: conditioning, the profile's fit check, the
no-head check) and each frame goes through `QueuedFrame.prepare`, the call the daemon's
acquisition stage makes, so a replayed frame reaches the model as the same tensor it did live,
and a frame the daemon would not have run the model on (no head in it) is marked alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.profile import resolve_profile
from calibration.quality import FrameQuality
from edge.config import CalibrationConfig, SourceConfig
from edge.pipeline.context import ProcessingContext, QueuedFrame, stream_context
from scanner_io.atrest import StorageKey
from scanner_io.frame import Frame
from scanner_io.recording import RecordingReader

CalibrationArg = str | os.PathLike[str] | None


@dataclass(frozen=True)
class ReplayedFrame:
    """One recorded frame after preparation: its model input (or why there is none)."""

    frame: Frame
    x: np.ndarray | None  # [64, 64] float32 in [0,1]; None when conditioning failed
    error: BaseException | None = None
    calibrated: bool = True  # False: the profile does not fit this frame (`uncalibrated`)
    quality: FrameQuality | None = None  # set: no head in the frame, the model does not run

    @property
    def seq(self) -> int:
        return self.frame.header.seq

    @property
    def runs_model(self) -> bool:
        """Whether the daemon would run the model on this frame."""
        return self.x is not None and self.error is None and self.quality is None

    @property
    def status(self) -> str:
        """The daemon's status before any model task: error, no_face, uncalibrated or ok."""
        if self.error is not None or self.x is None:
            return "error"
        if self.quality is not None:
            return "no_face"
        return "ok" if self.calibrated else "uncalibrated"


@dataclass
class Replay:
    """A recording opened for replay: the context it is prepared with and what reading found."""

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
        """Yield every well-formed frame prepared with `context`; malformed ones are counted."""
        self.frames = self.malformed = 0
        for rec in self.reader:
            if not isinstance(rec.item, Frame):
                self.malformed += 1
                continue
            q = QueuedFrame(rec.item, 0.0)
            q.prepare(self.context)
            self.frames += 1
            yield ReplayedFrame(rec.item, q.x, q.error, q.calibrated, q.quality)


def open_replay(
    path: str | os.PathLike[str],
    calibration: CalibrationArg = None,
    settings: CalibrationConfig | None = None,
    key: StorageKey | None = None,
) -> Replay:
    """Open a recording and prepare its frames as a daemon replaying it would (`[calibration]` defaults).

    An encrypted recording needs its storage `key`.
    """
    reader = RecordingReader(path, key)
    reader.read_preamble()  # the recorder writes the profile before the first frame
    src = SourceConfig(uri=f"replay:{reader.path}", calibration=Path(calibration) if calibration else None)
    choice = resolve_profile(src.calibration, reader)
    ctx = stream_context(choice, src, settings or CalibrationConfig())
    return Replay(path=reader.path, context=ctx, origin=choice.origin, reader=reader)
