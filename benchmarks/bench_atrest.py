"""What encryption at rest costs a recording, measured side by side in one run.

Records the same 128×128 uint16 frames (from the THz simulator, so compression sees real
structure) into MCAP with the plaintext recorder (zstd chunks) and with sealed chunks
(zstd + AES-256-GCM, `scanner_io.atrest`), 1 MiB chunks, fsync per chunk as in production;
then reads both back. Runs alternate (plain, sealed, plain, ...) and the median of the repeats
is reported, so both see the same machine state.

Usage: python benchmarks/bench_atrest.py [--frames N] [--repeats R] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scanner_io.atrest import StorageKey, generate_storage_key  # noqa: E402
from scanner_io.frame import Frame  # noqa: E402
from scanner_io.recording import Recorder, RecordingReader  # noqa: E402
from scanner_io.sources import open_source  # noqa: E402


def sim_frames(n: int) -> list[Frame]:
    src = open_source("sim")
    frames: list[Frame] = []
    try:
        while len(frames) < n:
            item = src.read(1.0)
            if isinstance(item, Frame):
                frames.append(item)
    finally:
        src.close()
    return frames


def record(path: Path, frames: list[Frame], key: StorageKey | None) -> float:
    t0 = time.perf_counter()
    with Recorder(path, key=key) as r:
        for f in frames:
            r.write(f)
    return time.perf_counter() - t0


def read(path: Path, key: StorageKey | None) -> float:
    t0 = time.perf_counter()
    n = sum(1 for _ in RecordingReader(path, key=key))
    assert n > 0
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    frames = sim_frames(args.frames)
    mib = sum(f.data.nbytes for f in frames) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        key = generate_storage_key(d / "storage.key")
        times: dict[str, list[float]] = {
            "plain_write": [],
            "sealed_write": [],
            "plain_read": [],
            "sealed_read": [],
        }
        sizes: dict[str, int] = {}
        for i in range(args.repeats):
            for name, k in (("plain", None), ("sealed", key)):
                path = d / f"{name}{i}.mcap"
                times[f"{name}_write"].append(record(path, frames, k))
                times[f"{name}_read"].append(read(path, k))
                sizes[name] = path.stat().st_size
                path.unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "frames": len(frames),
        "raw_mib": round(mib, 1),
        **{f"{k}_frames_per_s": round(len(frames) / v, 1) for k, v in med.items()},
        **{f"{k}_mib_per_s": round(mib / v, 1) for k, v in med.items()},
        "write_cost_pct": round(100 * (med["sealed_write"] / med["plain_write"] - 1), 1),
        "read_cost_pct": round(100 * (med["sealed_read"] / med["plain_read"] - 1), 1),
        "plain_bytes": sizes["plain"],
        "sealed_bytes": sizes["sealed"],
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"{len(frames)} frames 128x128 uint16 ({mib:.1f} MiB raw), median of {args.repeats} alternating runs"
    )
    for op in ("write", "read"):
        p, s = med[f"plain_{op}"], med[f"sealed_{op}"]
        print(
            f"{op:5s}  plain {len(frames) / p:8.0f} frames/s ({mib / p:6.1f} MiB/s)   "
            f"sealed {len(frames) / s:8.0f} frames/s ({mib / s:6.1f} MiB/s)   cost {100 * (s / p - 1):+.1f} %"
        )
    print(f"file   plain {sizes['plain']} bytes, sealed {sizes['sealed']} bytes")


if __name__ == "__main__":
    main()
