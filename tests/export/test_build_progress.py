"""A long engine build stays visibly alive: plain lines in logs, a redrawn line on a terminal,
STATUS= and EXTEND_TIMEOUT_USEC under systemd; the Jetson workspace cap comes from free memory."""

from __future__ import annotations

import io
import socket
import threading
from pathlib import Path

import pytest

from edge.sdnotify import Notifier
from export.build_progress import BuildProgress, default_workspace_mb, format_duration


class FakeClock:
    """A clock the test moves; the ticker thread reads it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def wait_for(predicate, timeout: float = 5.0) -> None:  # noqa: ANN001
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError("condition not reached")


def test_plain_lines_name_graph_precision_and_elapsed() -> None:
    out, clock = io.StringIO(), FakeClock()
    progress = BuildProgress(2, "fp16", stream=out, interval_s=0.02, notifier=Notifier(env={}), tty=False,
                             clock=clock)  # fmt: skip
    with progress.step("encoder"):
        clock.t += 95  # the build runs for 1m35s ...
        wait_for(lambda: "1m35s" in out.getvalue())  # ... and the ticker says so while it runs
    text = out.getvalue()
    assert text.splitlines()[0] == "[1/2] building encoder fp16 engine ..."
    assert "[1/2] building encoder fp16 engine: 1m35s, total 1m35s" in text
    assert text.splitlines()[-1] == "[1/2] built encoder fp16 engine in 1m35s"
    assert "\r" not in text and "\x1b" not in text  # no control characters in a log
    with pytest.raises(RuntimeError), progress.step("decoder_0"):
        raise RuntimeError("builder crashed")
    assert out.getvalue().splitlines()[-1].startswith("[2/2] failed decoder_0 fp16 engine")
    assert progress.done == 1


def test_terminal_redraws_one_line() -> None:
    out, clock = io.StringIO(), FakeClock()
    progress = BuildProgress(1, "int8", stream=out, interval_s=0.02, notifier=Notifier(env={}), tty=True,
                             clock=clock)  # fmt: skip
    with progress.step("encoder"):
        clock.t += 5
        wait_for(lambda: out.getvalue().count("\r") >= 3)
    text = out.getvalue()
    assert "\r\x1b[2K[1/1] building encoder int8 engine: 5s, total 5s" in text
    assert text.count("\n") == 2  # start and end only: the ticks redraw in place


def test_systemd_gets_status_and_timeout_extensions(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        clock = FakeClock()
        with Notifier(env={"NOTIFY_SOCKET": str(path)}) as notifier:
            progress = BuildProgress(3, "fp16", stream=io.StringIO(), interval_s=0.02, notifier=notifier,
                                     tty=False, clock=clock)  # fmt: skip
            with progress.step("decoder_2"):
                clock.t += 42
                messages = [sock.recv(4096).decode() for _ in range(3)]
            final = progress.finish()
        assert messages[0].startswith("STATUS=[1/3] building decoder_2 fp16 engine: 0s")
        assert "EXTEND_TIMEOUT_USEC=90000000" in messages[0]
        assert any("STATUS=[1/3] building decoder_2 fp16 engine: 42s" in m for m in messages[1:])
        assert final == "built 1/3 fp16 engines in 42s"
    finally:
        sock.close()


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 59.9, 60, 3599, 3600, 7380)] == ["0s", "59s", "1m00s", "59m59s",
                                                                              "1h00m", "2h03m"]  # fmt: skip


def test_workspace_cap_on_jetson_from_free_memory(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    # Orin Nano 8 GB, busy: 2.1 GB available -> a quarter of it.
    meminfo.write_text(
        "MemTotal:        7801480 kB\nMemFree:          402000 kB\nMemAvailable:    2150400 kB\n"
    )
    assert default_workspace_mb(True, meminfo) == 2150400 // 1024 // 4
    meminfo.write_text("MemTotal:        3956000 kB\nMemAvailable:     600000 kB\n")  # nearly full: floor
    assert default_workspace_mb(True, meminfo) == 256
    meminfo.write_text(
        "MemTotal:       64000000 kB\nMemAvailable:   60000000 kB\n"
    )  # AGX Orin 64 GB: ceiling
    assert default_workspace_mb(True, meminfo) == 2048
    assert default_workspace_mb(True, tmp_path / "missing") == 256
    assert default_workspace_mb(False, meminfo) == 1024  # a discrete GPU has its own memory
