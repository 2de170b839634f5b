"""The adversarial probe of issue 14, re-run against the current code: one row per failure.

Each row attacks what the probe broke in round 1 — over real ipc sockets, against a real
`thzedge run` process or the real source, with real files — and prints the figure the issue
reported then ("before") beside the one measured now ("after"). Some attacks are scaled down
where their size only set how long they ran; the row says so.

    PYTHONPATH=. .venv/bin/python benchmarks/probe_hardening.py [--only 1,3,4] [--json]

Needs root for row 5's tmpfs and row 9's chown (skipped with the reason otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibration.profile import CalibrationProfile  # noqa: E402
from scanner_io.codec import EndOfStream, encode_end_of_stream, encode_frame  # noqa: E402
from scanner_io.frame import FrameHeader  # noqa: E402
from scanner_io.sources import open_source  # noqa: E402

SCANNER, SHAPE = "scn0", (96, 96)


@dataclass
class Row:
    failure: int
    attack: str
    before: str
    after: str
    ok: bool


# -- helpers ------------------------------------------------------------------------------------


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    """The probe's environment for a `thzedge` process: this checkout, no systemd notify socket."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}
    full.pop("NOTIFY_SOCKET", None)
    return full


def thzedge(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edge", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout)


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edge", *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else ""


def rss_mb(pid: int) -> float:
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1]) / 1024
    return float("nan")


def wire(seq: int, kind: str = "frame", scanner: str = SCANNER) -> list[bytes]:
    header = FrameHeader(scanner=scanner, seq=seq, t_capture_ns=time.time_ns(), shape=SHAPE, dtype="uint16")
    parts = [bytes(memoryview(p)) for p in encode_frame(header, np.full(SHAPE, 1500 + seq % 500, np.uint16))]
    if kind == "truncated":  # size_mismatch, seq readable
        parts[2] = parts[2][:-2]
    elif kind == "bad_name":  # bad_field: seq readable, an attacker's scanner name
        h = json.loads(parts[1])
        h["scanner"] = "x" * 8000 + str(seq)
        parts[1] = json.dumps(h).encode()
    elif kind == "mismatch":  # topic_mismatch: the header names another valid scanner
        h = json.loads(parts[1])
        h["scanner"] = f"other{seq % 1000}"
        parts[1] = json.dumps(h).encode()
    return parts


def config(tmp: Path, extra: str = "") -> Path:
    p = tmp / "thzedge.toml"
    p.write_text("[metrics]\nenabled = false\n[daemon]\nstop_timeout_s = 3.0\n" + extra)
    return p


def summary(out: str) -> dict[str, Any]:
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


# -- rows ----------------------------------------------------------------------------------------


def row1_oversize(tmp: Path) -> Row:
    ctx = zmq.Context.instance()
    ep = f"ipc://{tmp}/r1.sock"
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.bind(ep)
    src = open_source(f"{ep}?max_frame_bytes=65536&reconnect_max_ms=500")
    try:
        seq = 0

        def until_frame(seconds: float) -> float | None:
            nonlocal seq
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                push.send_multipart(wire(seq), flags=zmq.NOBLOCK) if push.poll(0, zmq.POLLOUT) else None
                seq += 1
                item = src.read(0.1)
                if item is not None and not hasattr(item, "reason"):
                    return time.monotonic() - t0
            return None

        until_frame(10)
        push.send_multipart([b"frame/" + SCANNER.encode(), b"{}", b"\0" * (1 << 20)])  # a 1 MiB part
        time.sleep(0.2)
        dt = until_frame(30)
        recreated = src.stats.recreated
    finally:
        src.close()
        push.close()
    ok = dt is not None and recreated >= 1
    after = f"next frame read {dt:.2f} s later, socket recreated {recreated}×" if dt else "no frame in 30 s"
    return Row(
        1, "one 1 MiB part over a 64 KiB bound, then good frames", "cut off for good (654 s)", after, ok
    )


def row2_memory() -> Row:
    """benchmarks/bench_message_memory.py in its own process (its RSS is the receiver's)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_message_memory.py"),
            "--query",
            "max_frame_bytes=65536",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return Row(2, "32 parts × 32 MiB", "RSS 118 MB → 1.2 GB", last_line(proc.stderr), False)
    before, peak = res["rss_before_mb"], res.get("peak_after_mb", res.get("rss_peak_mb", float("nan")))
    after = f"RSS {before:.0f} → peak {peak:.0f} MB"
    return Row(
        2, "32 parts × 32 MiB (bound of a 64×64 profile)", "RSS 118 MB → 1.2 GB", after, peak - before < 100
    )


def daemon_flood(tmp: Path) -> tuple[Row, Row]:
    """Rows 3 and 4: one daemon, fed good frames, 20,000 hostile names, then a flood with holes."""
    ep = f"ipc://{tmp}/r3.sock"
    cal = tmp / "cal"
    CalibrationProfile.identity(SCANNER, SHAPE).save(cal)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.setsockopt(zmq.SNDHWM, 0)
    push.setsockopt(zmq.SNDTIMEO, 60_000)  # a daemon that died must not hang the probe
    push.bind(ep)
    cfg = config(tmp)
    out_ep = f"ipc://{tmp}/r3-out.sock"
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(out_ep)
    d = start(
        "--json", "--config", str(cfg), "run", "--source", f"{ep}?mode=lockstep", "--calibration", str(cal),
        "--publish", out_ep,
    )  # fmt: skip

    # Lockstep publishing waits for a full subscriber, so this one is drained all along.
    seen: set[int] = set()
    stop_draining = threading.Event()

    def drain() -> None:
        while not stop_draining.is_set():
            if sub.poll(100):
                parts = sub.recv_multipart()
                if parts[0].startswith(b"result"):
                    seen.add(json.loads(parts[1])["seq"])

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()

    def published(marker: int, seconds: float = 120) -> bool:
        """Wait until the result of frame `marker` is out (everything sent before it was read)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and marker not in seen:
            time.sleep(0.05)
        return marker in seen

    rng = np.random.default_rng(4)
    seq, sent_slots, frames_sent = 0, 0, 302
    try:
        for _ in range(300):
            push.send_multipart(wire(seq))
            seq += 1
        published(seq - 1)  # model loaded and warm, the 300 frames through
        rss0 = rss_mb(d.pid)
        names = 20_000
        for _ in range(names):
            push.send_multipart(wire(seq, "bad_name"))
            seq += 1
        push.send_multipart(wire(seq))
        seq += 1
        drained = published(seq - 1)
        rss1 = rss_mb(d.pid)
        # The flood: frames, malformed-with-seq kinds and holes in random order.
        for _ in range(20_000):
            u = rng.random()
            if u < 0.15:
                seq += int(rng.integers(1, 50))  # a hole: these slots never arrive
                continue
            kind = (
                "frame" if u < 0.7 else ("truncated" if u < 0.8 else ("bad_name" if u < 0.9 else "mismatch"))
            )
            frames_sent += kind == "frame"
            push.send_multipart(wire(seq, kind))
            seq += 1
        sent_slots = seq  # slots 0 .. seq-1
        push.send_multipart(wire(2**63 - 1))  # implausible jump: a reset
        push.send_multipart(
            encode_end_of_stream(EndOfStream(scanner=SCANNER, last_seq=2**63 - 1, frames=frames_sent + 1))
        )
        out, err = d.communicate(timeout=240)
    finally:
        if d.poll() is None:
            d.kill()
            d.communicate()
        stop_draining.set()
        drainer.join()
        push.close()
        sub.close()
    s = summary(out)
    malformed = sum((s.get("malformed") or {}).values())
    gap = (s.get("dropped") or {}).get("upstream_gap", 0)
    frames_in = s.get("frames_in", 0)
    accounted = frames_in + malformed + gap
    r3 = Row(
        3,
        f"{names:,} distinct 8,000-char invalid scanner names",
        "+160 MB, never freed",
        f"RSS {rss0:.0f} → {rss1:.0f} MB (+{rss1 - rss0:.0f}) once all were read",
        drained and rss1 - rss0 < 20,
    )
    r4 = Row(
        4,
        f"{sent_slots:,} seq slots: frames, malformed with readable seq, holes; then seq 2^63−1",
        "708,081 of 2,103,982 slots missing; +9.2e18 gap",
        f"frames {frames_in:,} + malformed {malformed:,} + gap {gap:,} = {accounted:,} "
        f"(slots + the reset frame {sent_slots + 1:,}); exit {d.returncode}",
        accounted == sent_slots + 1 and gap < 10**7,
    )
    return r3, r4


def row5_full_disk(tmp: Path) -> Row:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return Row(
            5, "full disk while recording", "exit 0, stream stopped", "skipped: needs root for tmpfs", True
        )
    mnt = tmp / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        return Row(5, "full disk while recording", "exit 0, stream stopped", "skipped: mount failed", True)
    try:
        cfg = config(tmp)
        r = thzedge(
            "--json", "--config", str(cfg), "run", "--source", "sim?frames=400",
            "--record", str(mnt / "run.mcap"), "--publish", f"ipc://{tmp}/r5.sock",
        )  # fmt: skip
        s = summary(r.stdout)
        for f in mnt.iterdir():
            f.unlink()
        rec = thzedge("record", "--source", "sim?frames=400", "--out", str(mnt / "rec.mcap"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    after = (
        f"run: exit {r.returncode}, {s.get('published', '?')} of 400 published, the disk full mid-run; "
        f"record: exit {rec.returncode}, '{last_line(rec.stderr)[:90]}'"
    )
    ok = r.returncode != 0 and s.get("published", 0) == 400 and rec.returncode == 74
    return Row(
        5, "2 MiB tmpfs: run --record, then record", "run exit 0 (stream stopped); record exit 70", after, ok
    )


def row6_revocation(tmp: Path) -> Row:
    test = ROOT / "tests" / "edge" / "test_curve_revocation.py"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    after = (
        f"revoked client receives nothing after SIGHUP ({last_line(r.stdout)}, {time.monotonic() - t0:.0f} s)"
    )
    return Row(6, "remove a connected client's key, SIGHUP", "110 messages in 5 s", after, r.returncode == 0)


def row7_config(tmp: Path) -> Row:
    cases = {
        "heartbeat_timeout_s = nan": "[daemon]\nheartbeat_timeout_s = nan\n",
        "stop_timeout_s = nan": "[daemon]\nstop_timeout_s = nan\n",
        "stop_timeout_s = inf": "[daemon]\nstop_timeout_s = inf\n",
        "hwm = 2**40": "[publisher]\nhwm = 1099511627776\n",
        "queue_size = 10**18": "[daemon]\nqueue_size = 1000000000000000000\n",
    }
    codes = {}
    for name, text in cases.items():
        p = tmp / "c7.toml"
        p.write_text(text)
        r = thzedge("--config", str(p), "config", "validate")
        # Refused for the value itself, not for a misspelt key.
        codes[name] = (
            r.returncode if name.split(" =")[0] in r.stderr and "unknown key" not in r.stderr else -1
        )
    after = ", ".join(f"{k}: {v}" for k, v in codes.items())
    return Row(
        7,
        "config validate on nan/inf/huge values",
        "'ok', then hangs or exit 70",
        after,
        all(v == 78 for v in codes.values()),
    )


def row8_corrupt(tmp: Path) -> Row:
    deep = tmp / "deep.toml"
    deep.write_text("a = " + "[" * 500 + "]" * 500 + "\n")
    r_toml = thzedge("--config", str(deep), "config", "validate")
    g = tmp / "g.npz"
    g.write_bytes(b"PK\x03\x04" + os.urandom(200))
    cfg = config(tmp, f'[verification]\ngallery = "{g}"\n')
    r_gal = thzedge(
        "--config", str(cfg), "run", "--source", "sim?frames=3", "--publish", f"ipc://{tmp}/r8.sock"
    )
    cal = tmp / "cal64"
    CalibrationProfile.identity("sim0", (64, 64)).save(cal)
    r_prof = thzedge(
        "--config", str(config(tmp)), "run", "--source", "sim?frames=3", "--calibration", str(cal),
        "--publish", f"ipc://{tmp}/r8b.sock",
    )  # fmt: skip
    after = (
        f"TOML 500 deep: {r_toml.returncode}; corrupt gallery: {r_gal.returncode} "
        f"('{last_line(r_gal.stderr)[:70]}'); 64×64 profile on 128×128: {r_prof.returncode}"
    )
    ok = r_toml.returncode == 78 and r_gal.returncode == 78 and r_prof.returncode == 78
    return Row(8, "corrupt gallery, deep TOML, profile of another size", "exit 70 (bug)", after, ok)


def row9_runtime_dir(tmp: Path) -> Row:
    if os.geteuid() != 0:
        return Row(
            9, "runtime dir owned by another user", "bound inside it", "skipped: needs root to chown", True
        )
    squat = tmp / f"thzedge-{os.getuid()}"
    squat.mkdir(mode=0o700)
    os.chown(squat, 65534, 65534)
    env = {"TMPDIR": str(tmp), "XDG_RUNTIME_DIR": "", "RUNTIME_DIRECTORY": ""}
    r = thzedge("--config", str(config(tmp)), "run", "--source", "sim?frames=3", env=env)
    after = f"exit {r.returncode}: '{last_line(r.stderr)[:90]}'"
    return Row(9, "default runtime dir squatted by uid 65534", "bound inside it", after, r.returncode == 78)


def row10_smaller(tmp: Path) -> Row:
    rec = tmp / "r10.mcap"
    r = thzedge("record", "--source", "sim?frames=300", "--out", str(rec))
    data = bytearray(rec.read_bytes())
    data[len(data) // 3] ^= 0xFF
    bad = tmp / "r10-bad.mcap"
    bad.write_bytes(bytes(data))
    info = thzedge("--json", "recording", "info", str(bad))
    try:
        frames = json.loads(info.stdout).get("frames")
    except ValueError:
        frames = last_line(info.stdout or info.stderr)
    # SIGTERM in the first half-second.
    d = start("--config", str(config(tmp)), "run", "--source", "sim", "--publish", f"ipc://{tmp}/r10.sock")
    time.sleep(0.3)
    d.send_signal(signal.SIGTERM)
    d.communicate(timeout=60)
    after = f"flipped byte at 1/3: {frames} of 300 frames read; SIGTERM at 0.3 s: exit {d.returncode}"
    ok = r.returncode == 0 and isinstance(frames, int) and frames >= 250 and d.returncode == 0
    return Row(10, "flipped MCAP byte; SIGTERM at start-up", "96 of 300 frames; —", after, ok)


ROWS: dict[int, Callable[[Path], Any]] = {
    1: row1_oversize,
    2: lambda tmp: row2_memory(),
    3: daemon_flood,
    5: row5_full_disk,
    6: row6_revocation,
    7: row7_config,
    8: row8_corrupt,
    9: row9_runtime_dir,
    10: row10_smaller,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated failure numbers (3 and 4 run together)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    want = {int(x) for x in args.only.split(",")} if args.only else set(range(1, 11))
    if 4 in want:
        want.add(3)
    rows: list[Row] = []
    t0 = time.monotonic()
    for n, fn in ROWS.items():
        if n not in want:
            continue
        with tempfile.TemporaryDirectory(prefix="thz-probe-") as d:
            got = fn(Path(d))
        rows.extend(got if isinstance(got, tuple) else [got])
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
    else:
        print("| # | attack | before (round 1) | after (now) | ok |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r.failure} | {r.attack} | {r.before} | {r.after} | {'yes' if r.ok else 'NO'} |")
        print(f"({time.monotonic() - t0:.0f} s)")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
