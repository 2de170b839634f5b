"""Commands owned by the scanner_io package, attached to the root CLI by `register`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from scanner_io.atrest import StorageKey, find_storage_key, load_storage_key
from scanner_io.cli_common import global_options, stop_on_signals
from scanner_io.emulator import EmulatorSettings, serve_uri
from scanner_io.errors import ThzEdgeError
from scanner_io.recording import recording_info as scan_recording
from scanner_io.retention import parse_duration, redact_recording, sweep_recordings

STORAGE_KEY_HELP = (
    "Storage key file (`thzedge keys generate --kind storage`); default: $THZEDGE_STORAGE_KEY, "
    "else $CREDENTIALS_DIRECTORY/storage.key."
)


def storage_key_option(path: Path | None) -> StorageKey | None:
    """Return the key `--storage-key` names, else the one the environment gives, else None."""
    return load_storage_key(path) if path is not None else find_storage_key()


def register(app: typer.Typer) -> None:
    """Attach `scanner serve` and `recording info` to the root `thzedge` app.

    `thzedge sim …` conditions frames and `thzedge record` attaches the calibration profile a
    source carries, so both live in calibration/cli.py (layers point down).
    """
    scanner = typer.Typer(help="Scanner acquisition: emulate a scanner's frame stream.", no_args_is_help=True)
    scanner.command("serve")(scanner_serve)
    app.add_typer(scanner, name="scanner")
    recording = typer.Typer(
        help="Inspect MCAP recordings of raw frames; enforce retention; redact for sharing.",
        no_args_is_help=True,
    )
    recording.command("info")(recording_info)
    recording.command("sweep")(recording_sweep)
    recording.command("redact")(recording_redact)
    recording.command("export")(recording_export)
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
    curve_secret: Annotated[
        Path | None,
        typer.Option(
            "--curve-secret", help="Serve as a CURVE server with this certificate (NAME.key_secret)."
        ),
    ] = None,
    curve_clients: Annotated[
        Path | None,
        typer.Option(
            "--curve-clients", help="With --curve-secret: directory of the allowed consumers' .key files."
        ),
    ] = None,
) -> None:
    """Stream frames in the acquisition protocol, as a scanner would (PUSH socket, bound).

    After the last frame (`--frames N`, or the end of a recording) it sends the end-of-stream
    message, so a consumer such as `thzedge run` ends too; a stop by signal sends none.
    """
    if (curve_secret is None) != (curve_clients is None):
        raise ThzEdgeError("--curve-secret and --curve-clients go together")
    settings = EmulatorSettings(
        curve_secret_file=curve_secret,
        curve_clients_dir=curve_clients,
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
    storage_key: Annotated[Path | None, typer.Option("--storage-key", help=STORAGE_KEY_HELP)] = None,
) -> None:
    """Print frames, duration, rate, scanners, seq gaps, attachments, encryption of a recording."""
    info = scan_recording(file, key=storage_key_option(storage_key))
    if global_options(ctx).json:
        typer.echo(json.dumps(info.to_dict(), sort_keys=True))
    else:
        typer.echo(info.render())


def recording_sweep(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Recordings or directories of recordings.")],
    default_retention: Annotated[
        str | None,
        typer.Option(
            "--default-retention",
            help="Retention for files that carry none (e.g. 7d), counted from their modification time; "
            "default: such files are kept.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be deleted; delete nothing.")
    ] = False,
) -> None:
    """Delete recordings past their retention (the `expires_utc` each file carries); needs no key."""
    default_s = parse_duration(default_retention, "--default-retention") if default_retention else None
    report = sweep_recordings(paths, default_retention_s=default_s, dry_run=dry_run)
    typer.echo(json.dumps(report.to_dict(), sort_keys=True) if global_options(ctx).json else report.render())
    if report.errors:
        raise ThzEdgeError(f"{len(report.errors)} file(s) could not be read; they were kept")


def recording_redact(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The recording to redact (encrypted or not).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the redacted copy (plaintext MCAP).")],
    storage_key: Annotated[Path | None, typer.Option("--storage-key", help=STORAGE_KEY_HELP)] = None,
) -> None:
    """Write a copy without raw frames or templates, for sharing with vendors (R-NEW-16)."""
    summary = redact_recording(file, out, key=storage_key_option(storage_key))
    if global_options(ctx).json:
        typer.echo(json.dumps(summary.to_dict(), sort_keys=True))
    else:
        typer.echo(
            f"wrote {summary.path}: {summary.frames} frame headers, {summary.events} events, "
            "no raw frames, no templates, no claimed identities"
        )


def recording_export(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="An MCAP recording (a .part left by a crash works too).")],
    out: Annotated[Path, typer.Option("--out", help="The MCAP file to write.")],
    foxglove: Annotated[
        bool,
        typer.Option(
            "--foxglove", help="Write frames as foxglove.RawImage (Foxglove, Lichtblick can show them)."
        ),
    ] = False,
    storage_key: Annotated[Path | None, typer.Option("--storage-key", help=STORAGE_KEY_HELP)] = None,
) -> None:
    """Convert a recording for other tools: `--foxglove` writes its frames as foxglove.RawImage."""
    from scanner_io.errors import UsageError
    from scanner_io.foxglove import export_foxglove

    if not foxglove:
        raise UsageError("say which format to write: --foxglove (the one export there is)")
    if out.resolve() == file.resolve():
        raise UsageError("--out must be another file than the recording")
    result = export_foxglove(file, out, key=storage_key_option(storage_key))
    if result.decrypted:
        typer.echo(
            f"warning: {file} is encrypted at rest; {out} holds its raw frames in plaintext "
            "(0600): delete it when done",
            err=True,
        )
    if global_options(ctx).json:
        typer.echo(json.dumps(result.to_dict(), sort_keys=True))
    else:
        skipped = f", {result.malformed} malformed skipped" if result.malformed else ""
        typer.echo(
            f"wrote {result.path}: {result.frames} frames as foxglove.RawImage on "
            f"{', '.join(result.topics)}{skipped}"
        )
