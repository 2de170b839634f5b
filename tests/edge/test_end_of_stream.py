"""`scanner serve --frames N` ends its stream, and `thzedge run` ends with it (real processes, sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest
from daemon_helpers import (
    Subscriber,
    finish,
    free_port,
    run_until_exit,
    sim_profile,
    summary_of,
    thzedge,
    thzedge_run,
    write_config,
)

pytestmark = pytest.mark.timeout(120)


def _serve(source: str, bind: str, *extra: str):
    return thzedge("--json", "scanner", "serve", "--source", source, "--bind", bind, *extra)


@pytest.mark.parametrize("mode", ["lockstep", "live"])
def test_run_exits_when_the_scanner_ends_its_stream(mode: str, tiny_bundle: Path, tmp_path: Path) -> None:
    frames = 30
    if mode == "lockstep":  # tcp, blocking end to end: every frame arrives
        source = f"tcp://127.0.0.1:{free_port()}"
        uri, serve_args = f"{source}?mode=lockstep", ("--rate", "max")
    else:  # ipc at the simulator's 30 frames/s: the scanner may drop, never waits
        source = f"ipc://{tmp_path}/scanner.sock"
        uri, serve_args = source, ()
    pub = f"ipc://{tmp_path}/results.sock"
    cal = sim_profile(tmp_path / "cal", seed=3)  # a live scanner needs its profile (R-CAL-1)
    sub = Subscriber(pub)
    # No --max-frames: only the scanner's end of stream ends this run.
    daemon = thzedge_run(uri, tiny_bundle, write_config(tmp_path / "thzedge.toml"), pub, calibration=cal)
    try:
        sub.wait_state(proc=daemon)
        emu = _serve("sim?seed=3", source, "--frames", str(frames), *serve_args)
        rc, out, err = run_until_exit(daemon, sub, timeout=90)
        erc, eout, eerr = finish(emu)
    finally:
        for proc in (daemon, locals().get("emu")):
            if proc is not None and proc.poll() is None:
                proc.kill()
        sub.close()
    assert rc == 0 and erc == 0, err[-3000:] + eerr[-2000:]
    emulator, summary = summary_of(eout), summary_of(out)
    assert emulator["end_of_stream"] is True
    assert summary["exit_reason"] == "source_ended"
    assert summary["frames_in"] == emulator["sent"] and summary["unaccounted"] == 0
    if mode == "lockstep":
        assert emulator["sent"] == frames and summary["published"] == frames
        assert [h["seq"] for h in sub.results] == list(range(frames))
    states = [e for e in sub.events if e["kind"] == "state"]
    assert states[-1]["source"] == "ended" and states[-1]["state"] == "stopped"
    assert "ended its stream after" in err


def test_a_stop_by_signal_is_not_the_end_of_the_stream(tmp_path: Path) -> None:
    import signal
    import time

    from scanner_io.sources import open_source

    source = f"ipc://{tmp_path}/scanner.sock"
    src = open_source(source)
    try:
        emu = _serve("sim?seed=3", source, "--rate", "20")
        deadline = time.monotonic() + 60
        got = 0
        while got < 3 and time.monotonic() < deadline:
            got += src.read(0.2) is not None
        emu.send_signal(signal.SIGTERM)
        erc, eout, eerr = finish(emu)
        for _ in range(10):
            src.read(0.1)
    finally:
        src.close()
    assert erc == 0, eerr
    assert summary_of(eout)["end_of_stream"] is False
    assert src.end is None  # a stopped scanner may come back: the receiver keeps waiting
