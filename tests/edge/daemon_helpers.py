"""Helpers shared by the daemon's process-level tests: start `thzedge`, subscribe, read summaries.

The subscriber decodes results with docs/protocol.md's rules only (it does not import
edge.results), as a downstream consumer would.
"""

from __future__ import annotations

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

from scanner_io.frame import POSTURES

REPO = Path(__file__).resolve().parents[2]


def embedding_dim(bundle: Path) -> int:
    return int(json.loads((bundle / "manifest.json").read_text())["model"]["embedding_dim"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, extra: str = "", calibration: str = "") -> Path:
    """Write a test config; `calibration` adds keys to its [calibration] table (e.g. NOISE_FRAMES)."""
    path.write_text(
        "[metrics]\nenabled = false\n[daemon]\ninsecure_dev = true\nstop_timeout_s = 3.0\n"
        # Tests start the scanner after READY: do not hold READY for a first frame.
        "[calibration]\n"
        + ("" if "match_wait_s" in calibration else "match_wait_s = 0.2\n")
        + calibration
        + extra
    )
    return path


# Transport tests send synthetic noise frames (no head in them): they go to the model anyway.
NOISE_FRAMES = "frame_quality = false\n"


def identity_profile(out: Path, scanner: str = "scn0", shape: tuple[int, int] = (96, 96)) -> Path:
    """Write a profile that fits synthetic frames of `scanner` and `shape` and corrects nothing.

    A live source needs a profile that fits its frames (R-CAL-1); this one leaves them as sent.
    """
    from calibration.profile import CalibrationProfile

    profile = CalibrationProfile(
        scanner=scanner,
        shape=shape,
        dark=np.zeros(shape, np.float32),
        gain=np.ones(shape, np.float32),
        bad_pixels=np.zeros(shape, bool),
    )
    profile.save(out)
    return out


def sim_profile(out: Path, seed: int = 0) -> Path:
    """Write the simulator's true profile for `sim?seed=SEED` (what `thzedge sim profile` writes)."""
    from calibration.simulated import true_profile
    from scanner_io.simulator import ScannerSimulator

    true_profile(ScannerSimulator(seed=seed, identities=1)).save(out)
    return out


def thzedge(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `python -m edge ARGS`; output goes to temp files (a full pipe would block the child)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by finish()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", *args], cwd=REPO, env=full_env, stdout=out, stderr=err
    )
    proc.out_file, proc.err_file = out, err  # type: ignore[attr-defined]
    return proc


def thzedge_run(
    source: str,
    bundle: Path,
    config: Path,
    publish: str,
    *extra: str,
    debug: bool = False,
    env: dict[str, str] | None = None,
    calibration: Path | None = None,
) -> subprocess.Popen:
    """Start `thzedge [--log-level debug] --json run --source … --model … --config … --publish …
    [--calibration DIR] EXTRA`."""
    pre = ("--log-level", "debug") if debug else ()
    args = ("--source", source, "--model", str(bundle), "--config", str(config), "--publish", publish)
    if calibration is not None:
        args += ("--calibration", str(calibration))
    return thzedge(*pre, "--json", "run", *args, *extra, env=env)


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    """Wait for the process; return (exit code, stdout, stderr)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(
            f"process did not finish in {timeout} s; stderr:\n{_read(proc.err_file)[-3000:]}"
        ) from None
    return proc.returncode, _read(proc.out_file), _read(proc.err_file)


def _read(f) -> str:
    f.flush()
    f.seek(0)
    text = f.read()
    f.close()
    return text


class Subscriber:
    """A consumer written from docs/protocol.md alone: SUB, topics, JSON header, described parts."""

    def __init__(self, endpoint: str, rcvhwm: int = 100000) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"result/")
        self.sock.setsockopt(zmq.SUBSCRIBE, b"event/")
        self.sock.connect(endpoint)
        self.results: list[dict] = []
        self.arrays: list[dict[str, np.ndarray]] = []
        self.events: list[dict] = []

    def decode(self, parts: list[bytes]) -> None:
        topic = parts[0].decode()
        header = json.loads(parts[1])
        assert header["v"] == 1, header
        if topic.startswith("result/"):
            assert topic == f"result/{header['scanner']}"
            arrays = {}
            for spec in header["parts"]:
                buf = parts[spec["index"]]
                dt = np.dtype(spec["dtype"]).newbyteorder("<")
                assert len(buf) == int(np.prod(spec["shape"])) * dt.itemsize
                arrays[spec["kind"]] = np.frombuffer(buf, dtype=dt).reshape(spec["shape"])
            assert len(parts) == 2 + len(header["parts"])
            self.results.append(header)
            self.arrays.append(arrays)
        else:
            assert topic.startswith("event/") and topic == f"event/{header['scanner']}"
            self.events.append(header)

    def pump(self, seconds: float, until=None) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.sock.poll(50):
                while True:
                    try:
                        self.decode(self.sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if until is not None and until(self):
                return

    def wait_state(self, seconds: float = 30, proc: subprocess.Popen | None = None) -> dict:
        def done(s: Subscriber) -> bool:
            return any(e["kind"] == "state" for e in s.events) or (
                proc is not None and proc.poll() is not None
            )

        self.pump(seconds, until=done)
        states = [e for e in self.events if e["kind"] == "state"]
        if not states and proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}: {_read(proc.err_file)[-3000:]}")
        assert states, "no state event from the daemon"
        return states[-1]

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def run_until_exit(proc: subprocess.Popen, sub: Subscriber, timeout: float = 60) -> tuple[int, str, str]:
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        sub.pump(0.2)
    rc, out, err = finish(proc, timeout=max(1.0, end - time.monotonic()))
    sub.pump(0.5)  # anything still in flight
    return rc, out, err


def summary_of(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON summary on stdout: {out!r}"
    return json.loads(lines[-1])


def check_result(h: dict, bundle_sha: str) -> None:
    assert h["status"] in ("ok", "partial", "error")
    assert isinstance(h["seq"], int) and h["t_publish_ns"] >= h["t_capture_ns"] > 0
    if h["status"] != "error":
        assert h["posture"]["label"] == POSTURES[h["posture"]["index"]]
        assert 0.0 < h["posture"]["confidence"] <= 1.0
    assert h["provenance"]["bundle"] == bundle_sha
    assert h["provenance"]["precision"] == "fp32" and h["provenance"]["backend"]
    assert h["provenance"]["calibration"]
    for stage in ("queue", "condition", "encode", "publish", "total"):
        assert h["latency_ms"][stage] >= 0.0


def bundle_sha(bundle: Path) -> str:
    import hashlib

    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


def accounted(summary: dict) -> int:
    return summary["published"] + sum(summary["dropped"].values())
