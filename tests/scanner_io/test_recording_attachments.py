"""Named attachments and metadata a recorder adds beside the frames, read back by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scanner_io.frame import Frame, FrameHeader
from scanner_io.recording import Recorder, RecordingReader, recording_info


def _frame(seq: int) -> Frame:
    data = np.full((8, 8), seq, dtype=np.uint16)
    return Frame(FrameHeader(scanner="s0", seq=seq, t_capture_ns=seq, shape=(8, 8), dtype="uint16"), data)


def test_attachments_and_metadata_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.mcap"
    with Recorder(path, fsync=False) as rec:
        rec.add_metadata("thzedge.golden", {"bundle": "abc", "precision": "fp32"})
        rec.add_attachment("thzedge/golden.json", "application/json", b'{"frames": []}')
        rec.write(_frame(0))
        rec.add_attachment("late.bin", "application/octet-stream", b"\x00\x01")
        rec.write(_frame(1))
    early = RecordingReader(path)
    early.read_preamble()  # written before the first frame: known without reading any
    assert early.attachment("thzedge/golden.json") == b'{"frames": []}'
    assert early.frames == 0
    assert early.metadata["thzedge.golden"] == {"bundle": "abc", "precision": "fp32"}
    full = RecordingReader(path)
    assert [r.item.header.seq for r in full] == [0, 1]
    assert full.attachment("late.bin") == b"\x00\x01" and full.attachment("nope") is None
    info = recording_info(path)
    assert {a.name for a in info.attachments} == {"thzedge/golden.json", "late.bin"}
