"""Commands owned by the scanner_io package, attached to the root CLI by `register`."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from scanner_io.errors import ThzEdgeError


def register(app: typer.Typer) -> None:
    """Attach this package's commands to the root `thzedge` app."""
    register_acquisition(app)
    # `thzedge sim …` conditions frames and `thzedge record` attaches the calibration profile a
    # source carries, so both live in calibration/cli.py (layers point down).


# --- acquisition: scanner serve, recording info ---------------------------------------------


def register_acquisition(app: typer.Typer) -> None:
    """Attach `scanner serve` and `recording info`."""
    scanner = typer.Typer(help="Scanner acquisition: emulate a scanner's frame stream.", no_args_is_help=True)
    scanner.command("serve")(scanner_serve)
    app.add_typer(scanner, name="scanner")
    recording = typer.Typer(help="Inspect MCAP recordings of raw frames.", no_args_is_help=True)
    recording.command("info")(recording_info)
    app.add_typer(recording, name="recording")


@contextmanager
def stop_on_signals():
    """Yield an Event set by SIGINT/SIGTERM, so loops end cleanly (handlers only set the event)."""
    stop = threading.Event()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _parse_rate(rate: str | None) -> float | str | None:
    if rate is None:
        return None
    if rate == "max":
        return "max"
    try:
        value = float(rate)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ThzEdgeError(f"--rate must be a positive number of frames/s or 'max', got {rate!r}")
    return value


def scanner_serve(
    source: Annotated[
        str, typer.Option("--source", help="sim[?seed=..] or replay:FILE.mcap[?rate=..&loop=N].")
    ],
    bind: Annotated[
        str, typer.Option("--bind", help="Endpoint to bind, e.g. tcp://0.0.0.0:5555 or ipc:///run/thz.sock.")
    ],
    rate: Annotated[
        str | None,
        typer.Option(
            "--rate",
            help="Frames/s, or 'max' for lockstep (blocks, drops nothing). Default: "
            "sim 30 frames/s, replay at recorded timing.",
        ),
    ] = None,
    frames: Annotated[int | None, typer.Option("--frames", min=1, help="Stop after N frames.")] = None,
    hwm: Annotated[int, typer.Option("--hwm", min=1, help="Send high-water mark, in frames.")] = 8,
    inject_malformed: Annotated[int, typer.Option("--inject-malformed", hidden=True, min=0)] = 0,
    skip_every: Annotated[int, typer.Option("--skip-every", hidden=True, min=0)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final counters as JSON.")] = False,
) -> None:
    """Stream frames in the acquisition protocol, as a scanner would (PUSH socket, bound)."""
    from scanner_io.emulator import EmulatorSettings, serve_uri

    settings = EmulatorSettings(
        bind=bind,
        rate=_parse_rate(rate),
        frames=frames,
        sndhwm=hwm,
        inject_malformed_every=inject_malformed,
        skip_every=skip_every,
    )
    with stop_on_signals() as stop:
        stats = serve_uri(source, settings, stop=stop)
    if as_json:
        typer.echo(json.dumps(stats.to_dict(), sort_keys=True))
    else:
        dropped = sum(stats.dropped.values())
        typer.echo(f"sent {stats.sent} frames in {stats.elapsed_s:.1f} s, dropped {dropped}")


@contextmanager
def terminal_progress(label: str, total: int | None = None) -> Iterator[Callable[..., None] | None]:
    """Yield `update(completed, total=None)` driving a progress bar when stderr is a terminal, else None."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        # rich keeps the task's total when `total` is None.
        yield lambda completed, total=None: bar.update(task, completed=completed, total=total)


def recording_info(
    file: Annotated[Path, typer.Argument(help="An MCAP recording (a .part left by a crash works too).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Print frames, duration, rate, scanners, seq gaps, attachments of a recording."""
    from scanner_io.recording import recording_info as scan

    info = scan(file)
    if as_json:
        typer.echo(json.dumps(info.to_dict(), sort_keys=True))
    else:
        typer.echo(info.render())
