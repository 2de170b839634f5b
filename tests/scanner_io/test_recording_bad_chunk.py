"""A corrupt chunk in the middle of a recording costs that chunk only (issue 14, failure 10).

The chunk's framing (its length) is intact, so the records after it are read; the bad chunk is
counted; a file with its footer is still complete, not "recorder did not finish".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scanner_io.frame import Frame
from scanner_io.recording import Recorder, recording_info
from scanner_io.sources import open_source
from tests.scanner_io.conftest import synthetic_frames

N = 300
ZSTD_FIELD = b"\x04\x00\x00\x00zstd"  # a chunk's compression string (u32 length + name)


def _recording(path: Path) -> Path:
    with Recorder(path, chunk_bytes=20_000, fsync=False) as rec:
        for f in synthetic_frames(N, shape=(32, 32)):
            rec.write(f)
    return path


def _flip_in_chunk_data(path: Path, fraction: float) -> int:
    """Flip one byte in the compressed records of the chunk at `fraction` of the file; return its index."""
    data = bytearray(path.read_bytes())
    starts, i = [], data.find(ZSTD_FIELD)
    while i >= 0:
        starts.append(i + len(ZSTD_FIELD) + 8)  # after the records-length u64
        i = data.find(ZSTD_FIELD, i + 1)
    assert len(starts) > 10, "expected many chunks"
    k = min(range(len(starts)), key=lambda j: abs(starts[j] - fraction * len(data)))
    data[starts[k] + 50] ^= 0xFF
    path.write_bytes(bytes(data))
    return k


def test_a_flipped_byte_skips_one_chunk_and_reading_goes_on(tmp_path: Path) -> None:
    path = _recording(tmp_path / "rec.mcap")
    _flip_in_chunk_data(path, 1 / 3)
    info = recording_info(path)
    assert info.complete and not info.truncated, info.truncation
    assert info.bad_chunks == 1
    assert N - 20 <= info.frames < N  # one chunk of ~10 frames lost, everything after it read
    with open_source(f"replay:{path}?rate=max") as src:
        frames = [item for item in src if isinstance(item, Frame)]
    assert len(frames) == info.frames and frames[-1].header.seq == N - 1

    out = subprocess.run(
        [sys.executable, "-m", "edge", "recording", "info", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "recorder did not finish" not in out.stdout and "bad chunks  1" in out.stdout
