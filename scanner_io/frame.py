"""The raw scanner frame: a small versioned header plus one array.

This is the unit every source yields, the codec carries and the recorder stores. The wire
format is in `scanner_io.codec` and docs/protocol.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
# Raw scanners deliver counts (uint16, sometimes uint8) or already-scaled float32 power.
ALLOWED_DTYPES: tuple[str, ...] = ("uint8", "uint16", "float32")
# Posture classes in the research model's index order; file codes b<k>b / n<k>n use k = index + 1.
POSTURES: tuple[str, ...] = ("Front", "Left", "Right", "Up", "Down")


@dataclass(frozen=True)
class FrameHeader:
    """What the scanner says about one acquisition; carried as JSON on the wire."""

    scanner: str
    seq: int
    t_capture_ns: int
    shape: tuple[int, ...]
    dtype: str
    v: int = PROTOCOL_VERSION
    settings: dict[str, Any] = field(default_factory=dict)
    sensor_temp_c: float | None = None
    claimed_identity: str | None = None
    # One passage of one person in front of the scanner, as the acquisition software segments
    # it (presence detection): frames of one visit share it; the daemon fuses their decisions.
    visit: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict; optional fields are left out when unset."""
        d: dict[str, Any] = {
            "v": self.v,
            "scanner": self.scanner,
            "seq": self.seq,
            "t_capture_ns": self.t_capture_ns,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }
        if self.settings:
            d["settings"] = dict(self.settings)
        if self.sensor_temp_c is not None:
            d["sensor_temp_c"] = self.sensor_temp_c
        if self.claimed_identity is not None:
            d["claimed_identity"] = self.claimed_identity
        if self.visit is not None:
            d["visit"] = self.visit
        return d


@dataclass(frozen=True)
class Frame:
    """One raw frame. `truth` is simulator ground truth; it never goes on the wire."""

    header: FrameHeader
    data: np.ndarray
    truth: Any | None = None

    @property
    def seq(self) -> int:
        return self.header.seq

    @property
    def scanner(self) -> str:
        return self.header.scanner
