"""Commands owned by the scanner_io package, attached to the root CLI by `register`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from scanner_io.cli_common import global_options, stop_on_signals
from scanner_io.emulator import EmulatorSettings, serve_uri
from scanner_io.errors import ThzEdgeError
from scanner_io.recording import recording_info as scan_recording


def register(app: typer.Typer) -> None:
    """Attach `scanner serve` and `recording info` to the root `thzedge` app.

    `thzedge sim …` conditions frames and `thzedge record` attaches the calibration profile a
    source carries, so both live in calibration/cli.py (layers point down).
    """
    scanner = typer.Typer(help="Scanner acquisition: emulate a scanner's frame stream.", no_args_is_help=True)
    scanner.command("serve")(scanner_serve)
    app.add_typer(scanner, name="scanner")
    recording = typer.Typer(help="Inspect MCAP recordings of raw frames.", no_args_is_help=True)
    recording.command("info")(recording_info)
    app.add_typer(recording, name="recording")


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
    ctx: typer.Context,
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
) -> None:
    """Stream frames in the acquisition protocol, as a scanner would (PUSH socket, bound).

    After the last frame (`--frames N`, or the end of a recording) it sends the end-of-stream
    message, so a consumer such as `thzedge run` ends too; a stop by signal sends none.
    """
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
    if global_options(ctx).json:
        typer.echo(json.dumps(stats.to_dict(), sort_keys=True))
    else:
        dropped = sum(stats.dropped.values())
        end = "end of stream sent" if stats.end_of_stream else "no end of stream sent"
        typer.echo(f"sent {stats.sent} frames in {stats.elapsed_s:.1f} s, dropped {dropped}; {end}")


def recording_info(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="An MCAP recording (a .part left by a crash works too).")],
) -> None:
    """Print frames, duration, rate, scanners, seq gaps, attachments of a recording."""
    info = scan_recording(file)
    if global_options(ctx).json:
        typer.echo(json.dumps(info.to_dict(), sort_keys=True))
    else:
        typer.echo(info.render())
