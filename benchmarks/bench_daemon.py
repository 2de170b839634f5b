"""Benchmark the streaming daemon end to end, against the bare backend, in one run.

1. Throughput: a recording of N simulated frames is served in lockstep by `thzedge scanner
   serve --rate max` over tcp loopback to `thzedge run --source tcp://…?mode=lockstep`, which
   publishes over tcp loopback to a subscriber here. Frames/s are measured at the subscriber
   (first to last result). The bare backend runs the same conditioned inputs (the daemon's
   `calibrate_and_condition`, identity calibration) through `Runner.encode` + `reconstruct`
   (predicted posture) in batches of the bundle's max batch, in this process. Target: ratio
   daemon / bare ≥ 0.9.
2. CPU budget: the daemon process's CPU time (sum of its threads' on-CPU time from
   /proc/<pid>/task/*/schedstat, from 10% to 90% of the results of the lockstep run) per
   frame, minus the bare backend's process CPU time per frame on the same inputs and batch:
   the daemon's own overhead in µs/frame (target ≤ 100). It is split by thread (the stages name
   their threads: thz-source = receive + decode + validate, thz-acquire = calibrate + condition,
   thz-infer = the model call + post-process, ORT pool threads, thz-publish = encode + send, the
   ZeroMQ I/O thread) and, in this process, by function on the same frames (decode, calibrate,
   condition, encode).
3. Results hash: sha256 of the lockstep run's published result headers without the timing
   fields (`t_capture_ns`, `t_publish_ns`, `latency_ms`), in seq order, so a change that must
   not alter results can be checked by comparing the hash before and after.
4. Latency: the emulator paces the simulator at 30 and 100 frames/s (live); capture→publish
   latency is `t_publish_ns - t_capture_ns` from each result header (same host clock), p50 /
   p99, plus capture→receive at the subscriber.

Usage:
    .venv/bin/python benchmarks/bench_daemon.py [--model BUNDLE | --width 1.0] [--frames 1500]

Without --model it uses the shipped demo bundle (width 0.125); `--width W` exports a random
network of width W instead (1.0 = the research width, where inference dominates the cost).
Prints a table and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
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
# The variant both sides run (--precision): pinned, so the daemon's `auto` cannot pick another.
PRECISION = "fp32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_cpu_ns(pid: int) -> dict[str, tuple[int, int]]:
    """(on-CPU ns, times scheduled in) of the live threads of `pid`, summed by thread name.

    The main thread is `main`; the counts are /proc/<pid>/task/<tid>/schedstat's first and third
    fields. Being scheduled in often per frame means threads hand work (and the GIL) back and
    forth: each switch costs CPU in the kernel.
    """
    out: dict[str, tuple[int, int]] = {}
    task = Path(f"/proc/{pid}/task")
    for t in task.iterdir():
        try:
            fields = (t / "schedstat").read_text().split()
            ns, runs = int(fields[0]), int(fields[2])
            name = "main" if t.name == str(pid) else (t / "comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            continue  # the thread ended between listing and reading
        have = out.get(name, (0, 0))
        out[name] = (have[0] + ns, have[1] + runs)
    return out


def cpu_split(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], frames: int
) -> dict[str, dict[str, float]]:
    """µs of CPU and times scheduled in, per frame, of each thread group between two snapshots."""
    out = {}
    for k in sorted(set(before) | set(after)):
        b, a = before.get(k, (0, 0)), after.get(k, (0, 0))
        out[k] = {"cpu_us": (a[0] - b[0]) / 1e3 / frames, "switches": (a[1] - b[1]) / frames}
    return out


def results_hash(headers: list[dict]) -> str:
    """sha256 of result headers without their timing fields, in seq order.

    The capture time goes too: the recording is simulated afresh, with new clock stamps, each run.
    """
    h = hashlib.sha256()
    for header in sorted(headers, key=lambda d: d["seq"]):
        stable = {k: v for k, v in header.items() if k not in ("t_capture_ns", "t_publish_ns", "latency_ms")}
        h.update(json.dumps(stable, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


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


def bare_backend_fps(
    bundle: Path, frames: list, backend: str, repeats: int = 2
) -> tuple[float, float, int, float]:
    """Frames/s of the backend alone on pre-conditioned inputs, with conditioning in the loop, the
    max batch, and the backend's process CPU µs per frame (best repeat, pre-conditioned inputs).

    Both in batches of the bundle's max batch, reconstruction by the predicted posture; the
    second adds the daemon's per-frame `calibrate_and_condition` (identity calibration) serially,
    i.e. the work the daemon cannot skip.
    """
    from calibration.conditioning import calibrate_and_condition
    from edge.runner import Runner

    def cond(batch: list) -> np.ndarray:
        return np.stack([calibrate_and_condition(f.data, None) for f in batch])[:, None].astype(np.float32)

    x = cond(frames)
    with Runner.from_bundle(bundle, backend=backend, precision=PRECISION) as r:
        b = r.max_batch
        enc = r.encode(x[:b])  # warm-up
        r.reconstruct(enc, enc.posture_logits.argmax(1))
        best = best_cond = 0.0
        cpu_us = float("inf")
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(0, len(x), b):
                enc = r.encode(x[i : i + b])
                r.reconstruct(enc, enc.posture_logits.argmax(1))
            best = max(best, len(x) / (time.perf_counter() - t0))
            cpu_us = min(cpu_us, (time.process_time() - c0) * 1e6 / len(x))
            t0 = time.perf_counter()
            for i in range(0, len(frames), b):
                enc = r.encode(cond(frames[i : i + b]))
                r.reconstruct(enc, enc.posture_logits.argmax(1))
            best_cond = max(best_cond, len(frames) / (time.perf_counter() - t0))
    return best, best_cond, b, cpu_us


def bare_batch1_ms(bundle: Path, frames: list, backend: str, n: int = 300) -> dict[str, float]:
    """Inference time of one frame alone (encode + reconstruct, batch 1): p50 / p99 ms.

    The latency target at scanner rate is capture→publish p99 <= this + 2 ms.
    """
    from calibration.conditioning import calibrate_and_condition
    from edge.runner import Runner

    xs = [calibrate_and_condition(f.data, None)[None, None] for f in frames[:n]]
    times = []
    with Runner.from_bundle(bundle, backend=backend, precision=PRECISION) as r:
        for x in xs[:5]:
            r.reconstruct(r.encode(x), np.zeros(1, dtype=np.int64))  # warm-up
        for x in xs:
            t0 = time.perf_counter()
            enc = r.encode(x)
            r.reconstruct(enc, enc.posture_logits.argmax(1))
            times.append((time.perf_counter() - t0) * 1e3)
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99))}


def function_costs(frames: list, repeats: int = 3) -> dict[str, float]:
    """µs per frame of the daemon's per-frame functions, in this process, on the same frames.

    decode + validate (`decode_frame` of the wire message), calibrate (identity profile, as the
    benchmark's daemon runs), condition, and encode of a typical result header.
    """
    from calibration.conditioning import ConditioningParams, calibrate, condition
    from edge.results import FrameResult, Provenance, encode_result
    from scanner_io.codec import decode_frame, encode_frame

    params = ConditioningParams()
    wire = [[bytes(p) for p in encode_frame(f.header, f.data)] for f in frames]
    powers = [calibrate(f.data, None) for f in frames]
    result = FrameResult(
        scanner="sim0",
        seq=1,
        t_capture_ns=time.time_ns(),
        status="ok",
        provenance=Provenance("0" * 64, "fp32", "ort", "identity"),
        posture={"label": "Front", "index": 0, "confidence": 0.93},
        latency_ms={"queue": 0.1, "condition": 0.1, "encode": 0.3, "reconstruct": 0.2, "publish": 0.1},
    )

    def per_frame(fn) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t0) * 1e6 / len(frames))
        return best

    return {
        "decode_validate": per_frame(lambda: [decode_frame(w) for w in wire]),
        "calibrate": per_frame(lambda: [calibrate(f.data, None) for f in frames]),
        "condition": per_frame(lambda: [condition(p, params) for p in powers]),
        "encode_result": per_frame(lambda: [encode_result(result, time.time_ns()) for _ in frames]),
    }


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
    sub: zmq.Socket,
    proc: subprocess.Popen,
    want: int,
    timeout_s: float,
    on_state=None,
    on_result=None,
    idle_s: float = 5.0,
) -> list[tuple[float, dict]]:
    """Receive until `want` results, the process exits, or the timeout; (t_recv_ns, header) per result.

    `on_result(i)` is called after the i-th result arrives (0-based).
    """
    got: list[tuple[float, dict]] = []
    end = time.monotonic() + timeout_s
    state_seen = False
    last = time.monotonic()
    while time.monotonic() < end and len(got) < want:
        if not sub.poll(100):
            # A live run whose emulator lost frames at the start never reaches `want`: once
            # results stop coming, take what arrived.
            if proc.poll() is not None or (got and time.monotonic() - last > idle_s):
                break
            continue
        last = time.monotonic()
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
        if on_result is not None:
            on_result(len(got) - 1)
    return got


def run_pipeline(
    bundle: Path, backend: str, work: Path, tag: str, mode: str, emu: tuple[str, str, int], n: int
) -> tuple[list[tuple[float, dict]], dict, dict[str, dict[str, float]]]:
    """Run `thzedge run` on a tcp source fed by `thzedge scanner serve` (started once the daemon
    announces its state); return the first `n` results as (t_recv_ns, header), the run summary
    and the daemon's CPU µs per frame by thread between the 10% and the 90% result.

    `mode` is appended to the source URI (`?mode=lockstep` or ""); `emu` is the emulator's
    (source, rate, frames).
    """
    emu_source, rate, emu_frames = emu
    port = free_port()
    pub = f"tcp://127.0.0.1:{free_port()}"
    cfg = work / "bench.toml"
    cfg.write_text(
        # Identity calibration on both sides: the tcp source carries none, so results are
        # published `uncalibrated` (allowed here) rather than refused.
        "[metrics]\nenabled = false\n[daemon]\ninsecure_dev = true\nqueue_size = 16\n"
        "[calibration]\nallow_uncalibrated = true\n"
        f'[model]\nprecision = "{PRECISION}"\n'
    )
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

    # CPU is read at 10% and 90% of the results: in the steady state between, while every stage
    # thread is alive (the acquisition threads end as soon as the last frame is read).
    window = (n // 10, n - 1 - n // 10)
    snaps: dict[int, dict[str, tuple[int, int]]] = {}

    def on_result(i: int) -> None:
        if i in window:
            snaps[i] = thread_cpu_ns(daemon.pid)

    try:
        got = collect(sub, daemon, n, 600, on_state=start_emulator, on_result=on_result)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.terminate()  # short of --max-frames (frames lost live): a clean stop prints the summary
            daemon.wait(30)
    finally:
        for p in (daemon, *emulators):
            if p.poll() is None:
                p.kill()
                p.wait()
        sub.close(0)
        ctx.term()
    summary = json.loads((work / f"daemon_{tag}.out").read_text().strip().splitlines()[-1])
    frames = window[1] - window[0]
    cpu = cpu_split(snaps[window[0]], snaps[window[1]], frames) if len(snaps) == 2 and frames > 0 else {}
    return got, summary, cpu


def run_throughput(bundle: Path, rec: Path, n: int, backend: str, work: Path) -> dict:
    got, summary, cpu = run_pipeline(
        bundle, backend, work, "tp", "?mode=lockstep", (f"replay:{rec}", "max", n), n
    )
    ts = [t for t, _ in got]
    fps = (len(ts) - 1) / ((ts[-1] - ts[0]) / 1e9) if len(ts) > 1 else float("nan")
    return {
        "received": len(got),
        "sent": n,
        "fps": fps,
        "summary": summary,
        "cpu_us": cpu,
        "results_sha256": results_hash([h for _, h in got]),
    }


def run_latency(bundle: Path, n: int, fps: float, backend: str, work: Path) -> dict:
    # The emulator sends a few more frames than the daemon takes, so --max-frames ends the run.
    got, summary, _ = run_pipeline(
        bundle, backend, work, f"lat{fps:g}", "", ("sim?seed=3", str(fps), n + 50), n
    )
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


def load_average() -> str:
    """The 1-minute load average and the core count (the host is shared: say how loaded it was)."""
    try:
        return f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus"
    except OSError:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="bundle directory (default: demo bundle, else a random export)")
    ap.add_argument(
        "--width", type=float, default=None, help="benchmark a random network of this width (1.0 = research)"
    )
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--precision", default="fp32", help="bundle variant for the daemon and the bare backend")
    ap.add_argument("--frames", type=int, default=1500, help="frames for the throughput run")
    ap.add_argument("--latency-frames", type=int, default=300, help="frames for each latency run")
    ap.add_argument(
        "--fps", type=float, nargs="+", default=[30.0, 100.0], help="live rates of the latency runs"
    )
    ap.add_argument("--no-latency", action="store_true", help="skip the latency runs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    global PRECISION
    PRECISION = args.precision

    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_daemon.") as tmp:
        work = Path(tmp)
        bundle = resolve_model(args.model, args.width, work)
        rec = work / "frames.mcap"
        frames = make_recording(rec, args.frames)
        funcs = function_costs(frames[:300])
        infer_b1 = bare_batch1_ms(bundle, frames, args.backend)
        # The host is shared: measure the bare backend right before and right after the daemon
        # run and compare with their mean, so load changes hit both sides alike.
        bare_before, cond_before, batch, cpu_before = bare_backend_fps(bundle, frames, args.backend)
        tp = run_throughput(bundle, rec, args.frames, args.backend, work)
        bare_after, cond_after, _, cpu_after = bare_backend_fps(bundle, frames, args.backend)
        bare = (bare_before + bare_after) / 2
        bare_cond = (cond_before + cond_after) / 2
        bare_cpu = (cpu_before + cpu_after) / 2
        lat = (
            {}
            if args.no_latency
            else {fps: run_latency(bundle, args.latency_frames, fps, args.backend, work) for fps in args.fps}
        )
    threads = tp["cpu_us"]
    cpu = {k: v["cpu_us"] for k, v in threads.items()}
    switches = {k: v["switches"] for k, v in threads.items()}
    daemon_cpu = sum(cpu.values())
    report = {
        "bundle": str(bundle),
        "backend": args.backend,
        "precision": args.precision,
        "max_batch": batch,
        "cpu_count": os.cpu_count(),
        "load_average_1m": {"start": load_start, "end": load_average()},
        "bare_backend_fps": bare,
        "bare_backend_fps_before_after": [bare_before, bare_after],
        "bare_backend_cpu_us_per_frame": bare_cpu,
        "bare_backend_cpu_us_before_after": [cpu_before, cpu_after],
        "daemon_mean_batch": tp["summary"].get("mean_batch"),
        "daemon_stage_p50_ms": tp["summary"].get("stage_p50_ms"),
        "daemon_e2e_fps": tp["fps"],
        "ratio": tp["fps"] / bare,
        "bare_with_conditioning_fps": bare_cond,
        "ratio_vs_bare_with_conditioning": tp["fps"] / bare_cond,
        "daemon_cpu_us_per_frame": daemon_cpu,
        "daemon_cpu_us_per_frame_by_thread": cpu,
        "daemon_switches_per_frame_by_thread": switches,
        "daemon_overhead_cpu_us_per_frame": daemon_cpu - bare_cpu,
        "function_us_per_frame": funcs,
        "bare_batch1_inference_ms": infer_b1,
        "results_sha256": tp["results_sha256"],
        "throughput_run": {
            "sent": tp["sent"],
            "received": tp["received"],
            "dropped": tp["summary"]["dropped"],
        },
        "latency": {
            f"{fps:g}": {
                **{k: v[k] for k in ("received", "capture_to_publish_ms", "capture_to_receive_ms")},
                "dropped": v["summary"]["dropped"],
            }
            for fps, v in lat.items()
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"bundle {bundle}  backend {args.backend}  precision {args.precision}  max batch {batch}")
    print(f"load average (1 min): {load_start} at start, {report['load_average_1m']['end']} at end")
    print(f"{'measure':52} {'value':>12}")
    print(
        f"{'bare backend (encode+reconstruct, conditioned inputs)':52} {bare:9.1f} f/s"
        f"  (before {bare_before:.1f}, after {bare_after:.1f}; batch {batch})"
    )
    print(f"{'daemon e2e lockstep (emulator→daemon→subscriber, tcp)':52} {tp['fps']:9.1f} f/s")
    print(f"{'ratio daemon / bare (target >= 0.85)':52} {report['ratio']:12.3f}")
    print(f"{'bare backend + conditioning in the loop (serial)':52} {bare_cond:9.1f} f/s")
    print(f"{'ratio daemon / (bare + conditioning)':52} {report['ratio_vs_bare_with_conditioning']:12.3f}")
    print(
        f"{'throughput run: sent / received':52} {tp['sent']:>5} / {tp['received']:<5}"
        f"  (daemon mean batch {report['daemon_mean_batch']})"
    )
    print(
        f"{'bare backend CPU (µs/frame)':52} {bare_cpu:9.1f}"
        f"     (before {cpu_before:.1f}, after {cpu_after:.1f})"
    )
    print(f"{'daemon process CPU (µs/frame, lockstep)':52} {daemon_cpu:9.1f}")
    print(f"{'daemon overhead = daemon − bare (target <= 100)':52} {daemon_cpu - bare_cpu:9.1f}")
    print(f"{'  by thread: µs/frame, times scheduled in per frame':52}")
    for name, us in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(f"{'  thread ' + name:52} {us:9.1f}  {switches[name]:6.2f}")
    print(f"{'  all threads: times scheduled in per frame':52} {sum(switches.values()):9.2f}")
    for name, us in funcs.items():
        print(f"{'  function ' + name + ' (in-process)':52} {us:9.1f}")
    print(f"{'results sha256 (lockstep, without timing fields)':52} {tp['results_sha256'][:16]}")
    print(
        f"{'bare inference, batch 1: p50 / p99 (ms)':52} {infer_b1['p50']:6.2f} / {infer_b1['p99']:.2f}"
        f"   (latency target: capture→publish p99 <= p99 + 2 ms)"
    )
    for fps, v in lat.items():
        c2p = v["capture_to_publish_ms"]
        c2r = v["capture_to_receive_ms"]
        drops = sum(v["summary"]["dropped"].values())
        print(f"{f'capture→publish at {fps:g} f/s: p50 / p99 (ms)':52} {c2p['p50']:6.1f} / {c2p['p99']:.1f}")
        print(f"{'  capture→receive (subscriber): p50 / p99 (ms)':52} {c2r['p50']:6.1f} / {c2r['p99']:.1f}")
        print(f"{'  received, daemon drops':52} {v['received']:>5}, {drops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
