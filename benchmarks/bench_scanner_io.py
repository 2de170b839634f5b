"""Scanner I/O throughput, measured side by side in one run.

Prints frames/s for 128×128 uint16 frames:
- emulator → `tcp://` source (thzedge codec, validation, I/O thread) vs a bare pyzmq PUSH/PULL
  send/recv loop of the same payload over the same transport, and their ratio;
- MCAP recording (zstd chunks, fsync per chunk) and lockstep replay (rate=max);
- the THz simulator (`ScannerSimulator.next_frame`), when it is installed.

Usage: python benchmarks/bench_scanner_io.py [--frames N] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scanner_io.emulator import EmulatorSettings, serve  # noqa: E402
from scanner_io.frame import Frame, FrameHeader  # noqa: E402
from scanner_io.recording import Recorder  # noqa: E402
from scanner_io.sources import MalformedFrame, Source, open_source, zmq_context  # noqa: E402

SHAPE = (128, 128)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _frames(n: int) -> list[Frame]:
    rng = np.random.default_rng(0)
    # Sensor-like counts (noisy around a level) so compression figures are not flattering.
    base = rng.normal(2000, 300, size=SHAPE)
    out = []
    for i in range(n):
        data = np.clip(base + rng.normal(0, 40, size=SHAPE), 0, 65535).astype(np.uint16)
        out.append(Frame(FrameHeader("bench0", i, 1_700_000_000_000_000_000 + i, SHAPE, "uint16"), data))
    return out


class _ListSource(Source):
    def __init__(self, frames: list[Frame]) -> None:
        super().__init__("list")
        self.live = False
        self._frames = frames
        self._i = 0

    @property
    def exhausted(self) -> bool:
        return self._i >= len(self._frames)

    def read(self, timeout_s: float) -> Frame | MalformedFrame | None:
        if self.exhausted:
            return None
        self._i += 1
        return self._frames[self._i - 1]


def _bare_sender(endpoint: str, n: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 5000)
    s.setsockopt(zmq.SNDHWM, 8)
    s.bind(endpoint)
    payload = _frames(1)[0].data.tobytes()
    for i in range(n):
        s.send_multipart([b"frame/bench0", b"%d" % i, payload])
    time.sleep(1.0)
    s.close()
    ctx.term()


def _emulator_sender(endpoint: str, n: int) -> None:
    serve(_ListSource(_frames(n)), EmulatorSettings(bind=endpoint, rate="max", drain_ms=1000))
    zmq_context().term()


def _spawn(target, endpoint: str, n: int):  # noqa: ANN001, ANN202
    # The sender is its own process, as a scanner is: the receiver's figures are not skewed by
    # a sender thread competing for the same GIL.
    proc = multiprocessing.get_context("spawn").Process(target=target, args=(endpoint, n), daemon=True)
    proc.start()
    return proc


def bench_bare_pyzmq(n: int) -> float:
    """PUSH/PULL over tcp loopback, recv + np.frombuffer: the floor of what any codec can do."""
    endpoint = f"tcp://127.0.0.1:{_port()}"
    proc = _spawn(_bare_sender, endpoint, n)
    r = zmq_context().socket(zmq.PULL)
    r.setsockopt(zmq.LINGER, 0)
    r.setsockopt(zmq.RCVHWM, 8)
    r.connect(endpoint)
    r.recv_multipart()
    t0 = time.perf_counter()
    for _ in range(n - 1):
        parts = r.recv_multipart()
        np.frombuffer(parts[2], dtype="<u2").reshape(SHAPE)
    dt = time.perf_counter() - t0
    r.close(0)
    proc.join(10)
    return (n - 1) / dt


def bench_emulator_source(n: int) -> float:
    """The emulator's `serve` (lockstep, own process) → `open_source("tcp://…")`, fully decoded."""
    endpoint = f"tcp://127.0.0.1:{_port()}"
    src = open_source(endpoint)
    proc = _spawn(_emulator_sender, endpoint, n)
    first = None
    while first is None:
        first = src.read(1.0)
    t0 = time.perf_counter()
    got = 1
    while got < n:
        if src.read(5.0) is None:
            break
        got += 1
    dt = time.perf_counter() - t0
    src.close()
    proc.join(10)
    if got != n:
        raise RuntimeError(f"source received {got} of {n} frames")
    return (got - 1) / dt


def bench_record_replay(frames: list[Frame], tmp: Path) -> tuple[float, float, int]:
    path = tmp / "bench.mcap"
    t0 = time.perf_counter()
    with Recorder(path) as rec:
        for f in frames:
            rec.write(f)
    rec_fps = len(frames) / (time.perf_counter() - t0)
    src = open_source(f"replay:{path}?rate=max")
    t0 = time.perf_counter()
    n = sum(1 for _ in src)
    replay_fps = n / (time.perf_counter() - t0)
    src.close()
    if n != len(frames):
        raise RuntimeError(f"replay gave {n} of {len(frames)} frames")
    return rec_fps, replay_fps, path.stat().st_size


def bench_simulator(n: int) -> float | None:
    try:
        from scanner_io.simulator import ScannerSimulator
    except ImportError:
        return None
    sim = ScannerSimulator(seed=0)
    sim.next_frame()
    t0 = time.perf_counter()
    for _ in range(n):
        sim.next_frame()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--sim-frames", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs; the best of each is shown")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    frames = _frames(args.frames)
    payload = frames[0].data.tobytes()
    results: dict[str, float | int | None] = {"frames": args.frames, "frame_bytes": len(payload)}
    # Interleaved repeats, best of each: on a shared machine the best run is the least disturbed.
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bench_bare_pyzmq(args.frames))
        ours.append(bench_emulator_source(args.frames))
    results["bare_pyzmq_fps"] = max(bare)
    results["emulator_tcp_source_fps"] = max(ours)
    results["source_vs_bare_ratio"] = results["emulator_tcp_source_fps"] / results["bare_pyzmq_fps"]
    with tempfile.TemporaryDirectory() as tmp:
        rec, rep, size = bench_record_replay(frames, Path(tmp))
    results.update(record_fps=rec, replay_max_fps=rep, mcap_bytes_per_frame=size // args.frames)
    results["simulator_fps"] = bench_simulator(args.sim_frames)
    zmq_context().term()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    mb = len(payload) / 1e6
    print(
        f"scanner I/O, {SHAPE[0]}x{SHAPE[1]} uint16 frames ({len(payload)} B), {args.frames} frames, "
        f"tcp loopback, best of {args.repeats}"
    )
    print(
        f"  bare pyzmq PUSH/PULL send/recv  {results['bare_pyzmq_fps']:10.0f} frames/s "
        f"({results['bare_pyzmq_fps'] * mb:.0f} MB/s)"
    )
    print(
        f"  emulator -> tcp:// source       {results['emulator_tcp_source_fps']:10.0f} frames/s "
        f"(ratio {results['source_vs_bare_ratio']:.2f} of bare)"
    )
    print(
        f"  MCAP record (zstd, fsync/chunk) {rec:10.0f} frames/s "
        f"({size / args.frames / len(payload):.2f} of raw size)"
    )
    print(f"  MCAP replay rate=max            {rep:10.0f} frames/s")
    sim = results["simulator_fps"]
    print(
        f"  simulator next_frame            {sim:10.0f} frames/s"
        if sim
        else "  simulator                       not installed"
    )


if __name__ == "__main__":
    main()
