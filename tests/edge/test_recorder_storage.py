"""A full disk while recording (issue 14, failure 5), real processes on a real small file system.

As root a 2 MiB tmpfs is mounted; otherwise the child runs under RLIMIT_FSIZE = 2 MiB with
SIGXFSZ ignored, so writes past the limit fail with EFBIG — the same OSError path as ENOSPC.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_helpers import REPO, Subscriber, free_port, summary_of

from scanner_io.recording import RecordingReader

pytestmark = pytest.mark.timeout(120)
DISK_BYTES = 2 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, Callable[[], None] | None, str]]:
    """A directory with 2 MiB of room: (dir, preexec_fn for the child, what kind of limit)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mnt)], capture_output=True
        )
        if mounted.returncode == 0:
            try:
                yield mnt, None, "ENOSPC"
            finally:
                subprocess.run(["umount", "-l", str(mnt)], check=False)
            return

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_BYTES, DISK_BYTES))

    yield mnt, limit_file_size, "EFBIG"


def start(args: list[str], preexec: Callable[[], None] | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "edge", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,
    )


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_record_on_a_full_disk_exits_74_with_one_line_and_keeps_the_complete_chunks(small_disk) -> None:
    disk, preexec, errno_name = small_disk
    out = disk / "rec.mcap"
    proc = start(
        ["record", "--source", "sim?fps=400", "--frames", "400", "--out", str(out), "--chunk-kib", "256"],
        preexec,
    )
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 74, err
    lines = [ln for ln in err.splitlines() if ln.startswith("thzedge: error:")]
    assert len(lines) == 1 and errno_name in lines[0] and "Traceback" not in err, err
    reader = RecordingReader(out.with_name(out.name + ".part"))
    recovered = sum(1 for _ in reader)
    assert 0 < recovered < 400 and not reader.complete


def test_run_record_on_a_full_disk_keeps_publishing_reports_and_exits_74(
    small_disk, tiny_bundle, tmp_path
) -> None:
    disk, preexec, errno_name = small_disk
    port = free_port()
    config = tmp_path / "thzedge.toml"
    config.write_text(
        f'[metrics]\nenabled = true\nbind = "127.0.0.1:{port}"\n[daemon]\nstop_timeout_s = 3.0\n'
    )
    endpoint = f"ipc://{tmp_path}/results.sock"
    sub = Subscriber(endpoint)
    frames = 500
    proc = start(
        [
            "--json",
            "--config",
            str(config),
            "run",
            "--source",
            "sim?fps=100",
            "--model",
            str(tiny_bundle),
            "--publish",
            endpoint,
            "--max-frames",
            str(frames),
            "--record",
            str(disk / "run.mcap"),
        ],
        preexec,
    )
    metrics = ready = ""
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            sub.pump(0.2)
            if not ready:
                with_failure = False
                try:
                    _, metrics = get(f"http://127.0.0.1:{port}/metrics")
                    with_failure = f'thzedge_recorder_failures_total{{reason="{errno_name}"}} 1.0' in metrics
                except OSError:
                    pass
                if with_failure:  # the main loop shows the state within a turn or two (50 ms each)
                    code, body = get(f"http://127.0.0.1:{port}/readyz")
                    ready = body if code == 200 and '"degraded"' in body else ""
        out, err = proc.communicate(timeout=30)
        sub.pump(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        sub.close()
    assert proc.returncode == 74, err[-2000:]
    summary = summary_of(out)
    # The stream went on to the end: every frame came in and is accounted for (a loaded machine may
    # shed a few as queue_full, as any live stream), and far more were published than recorded.
    assert summary["frames_in"] == frames and summary["unaccounted"] == 0, summary
    assert errno_name in summary["recording_error"]
    recorded = int(re.search(r"(\d+) frames written", summary["recording_error"]).group(1))  # type: ignore[union-attr]
    assert 0 < recorded < frames // 2 and summary["published"] > recorded + frames // 4, summary
    assert "thzedge_recording 0.0" in metrics
    assert ready, "/readyz never reported the degraded state while the daemon ran"
    health = json.loads(ready)
    assert health["state"] == "degraded" and "recording stopped" in health["detail"], health
    errors = [e for e in sub.events if e["kind"] == "error" and e.get("stage") == "record"]
    assert len(errors) == 1 and errors[0]["reason"] == "recorder_failed", sub.events[-5:]
    assert "Traceback" not in err
