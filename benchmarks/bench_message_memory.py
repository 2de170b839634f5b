"""Peak memory of the acquisition receiver under one hostile multipart message (issue 14, failure 2).

A scanner-side PUSH sends a valid frame, then `--messages` hostile messages of `--parts` parts of
`--part-bytes` bytes each, then a valid frame; the receiver (a `ZmqSource` in this process, as the
daemon holds it) reads until the last valid frame. Prints one JSON line: the receiver's RSS
before the hostile messages and its peak (VmHWM) after, in MB, and what it saw.

    python benchmarks/bench_message_memory.py --parts 32 --part-bytes 33554432
    python benchmarks/bench_message_memory.py --parts 1000 --part-bytes 64
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time

import numpy as np
import zmq


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _frame(seq: int) -> list[bytes]:
    from scanner_io.codec import encode_frame
    from scanner_io.frame import FrameHeader

    header = FrameHeader(scanner="rec0", seq=seq, t_capture_ns=time.time_ns(), shape=(64, 64), dtype="uint16")
    return [bytes(memoryview(p)) for p in encode_frame(header, np.zeros((64, 64), np.uint16))]


def _sender(endpoint: str, parts: int, part_bytes: int, messages: int, go: mp.Event, stop: mp.Event) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.setsockopt(zmq.SNDHWM, 1000)
    push.bind(endpoint)
    push.send_multipart(_frame(0))
    go.wait(60)
    blob = bytes(part_bytes)  # one buffer, sent zero-copy as every part
    for _ in range(messages):
        for i in range(parts):
            push.send(blob, zmq.SNDMORE if i < parts - 1 else 0, copy=part_bytes < 65536)
    # A peer dropped for an oversized part loses what was queued to it: keep the scanner
    # sending (NOBLOCK, as a live scanner does) until the receiver has read a frame again.
    seq = 1
    end = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < end:
        try:
            push.send_multipart(_frame(seq), zmq.NOBLOCK)
            seq += 1
        except zmq.Again:
            pass
        time.sleep(0.05)
    push.close(0)
    ctx.term()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, default=32)
    ap.add_argument("--part-bytes", type=int, default=32 * 1024 * 1024)
    ap.add_argument("--messages", type=int, default=1)
    ap.add_argument("--query", default="", help="source URI parameters, e.g. max_frame_bytes=8192")
    args = ap.parse_args()

    from scanner_io.sources import open_source

    endpoint = f"ipc://{tempfile.mkdtemp()}/scanner.sock"
    go, stop = mp.Event(), mp.Event()
    proc = mp.get_context("fork").Process(
        target=_sender, args=(endpoint, args.parts, args.part_bytes, args.messages, go, stop), daemon=True
    )
    proc.start()
    src = open_source(endpoint + ("?" + args.query if args.query else ""))
    seen: list[str] = []
    end = time.monotonic() + 120
    while time.monotonic() < end and not seen:
        item = src.read(0.2)
        if item is not None:
            seen.append(type(item).__name__)
    rss_before = _status_mb("VmRSS")
    hwm_before = _status_mb("VmHWM")
    go.set()
    while time.monotonic() < end and seen.count("Frame") < 2:
        item = src.read(0.2)
        if item is not None:
            seen.append(getattr(item, "reason", type(item).__name__))
    stop.set()
    peak = _status_mb("VmHWM")
    stats = src.stats.to_dict()
    src.close()
    proc.join(10)
    print(
        json.dumps(
            {
                "parts": args.parts,
                "part_bytes": args.part_bytes,
                "messages": args.messages,
                "query": args.query,
                "rss_before_mb": round(rss_before, 1),
                "peak_before_mb": round(hwm_before, 1),
                "peak_after_mb": round(peak, 1),
                "seen": seen,
                "disconnects": stats["disconnects"],
                "recreated": stats["recreated"],
            }
        )
    )


if __name__ == "__main__":
    main()
