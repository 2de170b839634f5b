"""Benchmark the streaming daemon end to end, against the bare backend, in one run.

1. Throughput: a recording of N simulated frames is served in lockstep by `thzedge scanner
   serve --rate max` over tcp loopback to `thzedge run --source tcp://…?mode=lockstep`, which
   publishes over tcp loopback to a subscriber here. Frames/s are measured at the subscriber
   (first to last result). The bare backend runs the same conditioned inputs (the daemon's
   `calibrate_and_condition`, identity calibration) through `Runner.encode` + `reconstruct`
   (predicted posture) in batches of the bundle's max batch, in this process. Target: ratio
   daemon / bare ≥ 0.9.
2. Latency: the emulator paces the simulator at 30 frames/s (live); capture→publish latency is
   `t_publish_ns - t_capture_ns` from each result header (same host clock), p50 / p99, plus
   capture→receive at the subscriber.

Usage:
    .venv/bin/python benchmarks/bench_daemon.py [--model BUNDLE | --width 1.0] [--frames 600]

Without --model it uses the shipped demo bundle (width 0.125); `--width W` exports a random
network of width W instead (1.0 = the research width, where inference dominates the cost).
Prints a table and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_model(model: str | None, width: float | None, work: Path) -> Path:
    if model:
        return Path(model)
    from edge.bundle import demo_bundle_path
    from scanner_io.errors import BundleError

    try:
        if width is not None:
            raise BundleError("a random network was asked for")
        return demo_bundle_path()
    except BundleError:
        import torch

        width = 1.0 if width is None else width

        from export.bundle_writer import write_bundle
        from export.model import MTLNetwork

        torch.manual_seed(0)
        out = work / "bundle"
        print(
            f"# no demo bundle installed: exporting a random network (width {width}) to {out}",
            file=sys.stderr,
        )
        write_bundle(MTLNetwork(embedding_dim=128, width=width).eval(), out)
        return out


def make_recording(path: Path, n: int) -> list:
    from scanner_io.recording import Recorder
    from scanner_io.simulator import ScannerSimulator

    sim = ScannerSimulator(seed=7)
    frames = [sim.next_frame() for _ in range(n)]
    with Recorder(path, fsync=False) as rec:
        for f in frames:
            rec.write(f)
    return frames


def bare_backend_fps(bundle: Path, frames: list, backend: str, repeats: int = 2) -> tuple[float, float, int]:
    """Frames/s of the backend alone on pre-conditioned inputs, and with conditioning in the loop.

    Both in batches of the bundle's max batch, reconstruction by the predicted posture; the
    second adds the daemon's per-frame `calibrate_and_condition` (identity calibration) serially,
    i.e. the work the daemon cannot skip.
    """
    from calibration.conditioning import calibrate_and_condition
    from edge.runner import Runner

    def cond(batch: list) -> np.ndarray:
        return np.stack([calibrate_and_condition(f.data, None) for f in batch])[:, None].astype(np.float32)

    x = cond(frames)
    with Runner.from_bundle(bundle, backend=backend) as r:
        b = r.max_batch
        enc = r.encode(x[:b])  # warm-up
        r.reconstruct(enc, enc.posture_logits.argmax(1))
        best = best_cond = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(0, len(x), b):
                enc = r.encode(x[i : i + b])
                r.reconstruct(enc, enc.posture_logits.argmax(1))
            best = max(best, len(x) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for i in range(0, len(frames), b):
                enc = r.encode(cond(frames[i : i + b]))
                r.reconstruct(enc, enc.posture_logits.argmax(1))
            best_cond = max(best_cond, len(frames) / (time.perf_counter() - t0))
    return best, best_cond, b


def start(*args: str, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    return subprocess.Popen(
        [sys.executable, "-m", "edge", *args],
        cwd=REPO,
        env=env,
        stdout=open(out, "w"),  # noqa: SIM115
        stderr=open(out.with_suffix(".err"), "w"),  # noqa: SIM115
    )


def subscribe(endpoint: str) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 100000)
    sub.setsockopt(zmq.SUBSCRIBE, b"result/")
    sub.setsockopt(zmq.SUBSCRIBE, b"event/")
    sub.connect(endpoint)
    return ctx, sub


def collect(
    sub: zmq.Socket, proc: subprocess.Popen, want: int, timeout_s: float, on_state=None
) -> list[tuple[float, dict]]:
    """Receive until `want` results, the process exits, or the timeout; (t_recv_ns, header) per result."""
    got: list[tuple[float, dict]] = []
    end = time.monotonic() + timeout_s
    state_seen = False
    while time.monotonic() < end and len(got) < want:
        if not sub.poll(100):
            if proc.poll() is not None:
                break
            continue
        parts = sub.recv_multipart()
        t = time.time_ns()
        header = json.loads(parts[1])
        if parts[0].startswith(b"event/"):
            if header["kind"] == "state" and not state_seen:
                state_seen = True
                if on_state is not None:
                    on_state()
            continue
        got.append((t, header))
    return got


def run_pipeline(
    bundle: Path, backend: str, work: Path, tag: str, mode: str, emu: tuple[str, str, int], n: int
) -> tuple[list[tuple[float, dict]], dict]:
    """Run `thzedge run` on a tcp source fed by `thzedge scanner serve` (started once the daemon
    announces its state); return the first `n` results as (t_recv_ns, header) and the run summary.

    `mode` is appended to the source URI (`?mode=lockstep` or ""); `emu` is the emulator's
    (source, rate, frames).
    """
    emu_source, rate, emu_frames = emu
    port = free_port()
    pub = f"tcp://127.0.0.1:{free_port()}"
    cfg = work / "bench.toml"
    cfg.write_text("[metrics]\nenabled = false\n[daemon]\ninsecure_dev = true\nqueue_size = 16\n")
    ctx, sub = subscribe(pub)
    daemon = start(
        "--json",
        "run",
        "--source",
        f"tcp://127.0.0.1:{port}{mode}",
        "--model",
        str(bundle),
        "--backend",
        backend,
        "--config",
        str(cfg),
        "--publish",
        pub,
        "--max-frames",
        str(n),
        out=work / f"daemon_{tag}.out",
    )
    emulators: list[subprocess.Popen] = []

    def start_emulator() -> None:
        emulators.append(
            start(
                "--json",
                "scanner",
                "serve",
                "--source",
                emu_source,
                "--bind",
                f"tcp://127.0.0.1:{port}",
                "--rate",
                rate,
                "--frames",
                str(emu_frames),
                out=work / f"emu_{tag}.out",
            )
        )

    try:
        got = collect(sub, daemon, n, 600, on_state=start_emulator)
        daemon.wait(60)
    finally:
        for p in (daemon, *emulators):
            if p.poll() is None:
                p.kill()
                p.wait()
        sub.close(0)
        ctx.term()
    summary = json.loads((work / f"daemon_{tag}.out").read_text().strip().splitlines()[-1])
    return got, summary


def run_throughput(bundle: Path, rec: Path, n: int, backend: str, work: Path) -> dict:
    got, summary = run_pipeline(bundle, backend, work, "tp", "?mode=lockstep", (f"replay:{rec}", "max", n), n)
    ts = [t for t, _ in got]
    fps = (len(ts) - 1) / ((ts[-1] - ts[0]) / 1e9) if len(ts) > 1 else float("nan")
    return {"received": len(got), "sent": n, "fps": fps, "summary": summary}


def run_latency(bundle: Path, n: int, fps: float, backend: str, work: Path) -> dict:
    # The emulator sends a few more frames than the daemon takes, so --max-frames ends the run.
    got, summary = run_pipeline(bundle, backend, work, "lat", "", ("sim?seed=3", str(fps), n + 50), n)
    pub_ms = np.array([(h["t_publish_ns"] - h["t_capture_ns"]) / 1e6 for _, h in got])
    recv_ms = np.array([(t - h["t_capture_ns"]) / 1e6 for t, h in got])
    return {
        "received": len(got),
        "capture_to_publish_ms": {
            "p50": float(np.percentile(pub_ms, 50)),
            "p99": float(np.percentile(pub_ms, 99)),
            "max": float(pub_ms.max()),
        },
        "capture_to_receive_ms": {
            "p50": float(np.percentile(recv_ms, 50)),
            "p99": float(np.percentile(recv_ms, 99)),
        },
        "summary": summary,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="bundle directory (default: demo bundle, else a random export)")
    ap.add_argument(
        "--width", type=float, default=None, help="benchmark a random network of this width (1.0 = research)"
    )
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--frames", type=int, default=300, help="frames for the throughput run")
    ap.add_argument("--latency-frames", type=int, default=300, help="frames for the 30 fps latency run")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_daemon.") as tmp:
        work = Path(tmp)
        bundle = resolve_model(args.model, args.width, work)
        rec = work / "frames.mcap"
        frames = make_recording(rec, args.frames)
        # The host is shared: measure the bare backend right before and right after the daemon
        # run and compare with their mean, so load changes hit both sides alike.
        bare_before, cond_before, batch = bare_backend_fps(bundle, frames, args.backend)
        tp = run_throughput(bundle, rec, args.frames, args.backend, work)
        bare_after, cond_after, _ = bare_backend_fps(bundle, frames, args.backend)
        bare = (bare_before + bare_after) / 2
        bare_cond = (cond_before + cond_after) / 2
        lat = run_latency(bundle, args.latency_frames, args.fps, args.backend, work)
    report = {
        "bundle": str(bundle),
        "backend": args.backend,
        "max_batch": batch,
        "cpu_count": os.cpu_count(),
        "bare_backend_fps": bare,
        "bare_backend_fps_before_after": [bare_before, bare_after],
        "daemon_mean_batch": tp["summary"].get("mean_batch"),
        "daemon_stage_p50_ms": tp["summary"].get("stage_p50_ms"),
        "daemon_e2e_fps": tp["fps"],
        "ratio": tp["fps"] / bare,
        "bare_with_conditioning_fps": bare_cond,
        "ratio_vs_bare_with_conditioning": tp["fps"] / bare_cond,
        "throughput_run": {
            "sent": tp["sent"],
            "received": tp["received"],
            "dropped": tp["summary"]["dropped"],
        },
        "latency_fps": args.fps,
        "latency": {k: lat[k] for k in ("received", "capture_to_publish_ms", "capture_to_receive_ms")},
        "latency_dropped": lat["summary"]["dropped"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"bundle {bundle}  backend {args.backend}  max batch {batch}  cpus {os.cpu_count()}")
    print(f"{'measure':52} {'value':>12}")
    print(
        f"{'bare backend (encode+reconstruct, conditioned inputs)':52} {bare:9.1f} f/s"
        f"  (before {bare_before:.1f}, after {bare_after:.1f}; batch {batch})"
    )
    print(f"{'daemon e2e lockstep (emulator→daemon→subscriber, tcp)':52} {tp['fps']:9.1f} f/s")
    print(f"{'ratio daemon / bare (target >= 0.9)':52} {report['ratio']:12.3f}")
    print(f"{'bare backend + conditioning in the loop (serial)':52} {bare_cond:9.1f} f/s")
    print(f"{'ratio daemon / (bare + conditioning)':52} {report['ratio_vs_bare_with_conditioning']:12.3f}")
    print(
        f"{'throughput run: sent / received':52} {tp['sent']:>5} / {tp['received']:<5}"
        f"  (daemon mean batch {report['daemon_mean_batch']})"
    )
    c2p = lat["capture_to_publish_ms"]
    c2r = lat["capture_to_receive_ms"]
    print(f"{f'capture→publish at {args.fps:g} f/s: p50 / p99 (ms)':52} {c2p['p50']:6.1f} / {c2p['p99']:.1f}")
    print(f"{'capture→receive (subscriber): p50 / p99 (ms)':52} {c2r['p50']:6.1f} / {c2r['p99']:.1f}")
    drops = sum(lat["summary"]["dropped"].values())
    print(f"{'latency run: received, daemon drops':52} {lat['received']:>5}, {drops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
