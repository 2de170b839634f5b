"""Commands owned by the calibration package, attached to the root CLI by `register`.

`thzedge sim dataset|preview|profile` and `thzedge record` live here rather than in scanner_io:
each of them needs a calibration profile (the simulated sensor's, or the one a source carries) or
the conditioning, and scanner_io never imports calibration (DESIGN.md, layers).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import cv2
import typer

from calibration.calibrate_cli import calibrate_app
from calibration.profile import resolve_profile
from calibration.simulated import preview_sheet, true_profile, write_dataset
from scanner_io.cli import STORAGE_KEY_HELP, storage_key_option
from scanner_io.cli_common import global_options, stop_on_signals, terminal_progress
from scanner_io.errors import ThzEdgeError
from scanner_io.recording import Recorder, RecordingPolicy, default_manifest, record_source
from scanner_io.retention import parse_duration
from scanner_io.simulator import ScannerSimulator
from scanner_io.sources import open_source

log = logging.getLogger("thzedge.record")


def register(app: typer.Typer) -> None:
    """Attach `sim dataset|preview|profile` and `record` to the root `thzedge` app."""
    sim = typer.Typer(
        help="THz scanner simulator: datasets, previews, its true calibration.", no_args_is_help=True
    )
    sim.command("dataset")(sim_dataset)
    sim.command("preview")(sim_preview)
    sim.command("profile")(sim_profile)
    app.add_typer(sim, name="sim")
    app.command("record")(record)
    app.add_typer(calibrate_app, name="calibrate")


def record(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="Source URI (tcp://, ipc://, sim[?..], replay:FILE) or a source name from the config.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="MCAP file to write (FILE.mcap.part until finished).")],
    frames: Annotated[int | None, typer.Option("--frames", min=1, help="Stop after N frames.")] = None,
    duration: Annotated[
        float | None, typer.Option("--duration", min=0.0, help="Stop after S seconds.")
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="Calibration profile directory to attach (default: the configured source's, else "
            "the one the source carries, if any).",
        ),
    ] = None,
    chunk_kib: Annotated[
        int, typer.Option("--chunk-kib", min=1, help="Chunk size in KiB (fsync'ed).")
    ] = 1024,
    storage_key: Annotated[Path | None, typer.Option("--storage-key", help=STORAGE_KEY_HELP)] = None,
    retention: Annotated[
        str | None,
        typer.Option(
            "--retention", help="Delete the file at the first sweep after this long (e.g. 7d, 12h)."
        ),
    ] = None,
    consent: Annotated[
        str, typer.Option("--consent", help="Basis of the recording, stored in the file (e.g. obtained).")
    ] = "unspecified",
    purpose: Annotated[str, typer.Option("--purpose", help="Purpose, stored in the file.")] = "unspecified",
) -> None:
    """Record raw frames from a source into an MCAP file (zstd chunks, encrypted under a storage key)."""
    if frames is not None and duration is not None:
        raise ThzEdgeError("give --frames or --duration, not both")
    key = storage_key_option(storage_key)
    policy = RecordingPolicy(
        retention_s=parse_duration(retention) if retention is not None else None,
        consent=consent,
        purpose=purpose,
    )
    named = global_options(ctx).resolve_source(source)
    src = open_source(named.uri, curve=named.curve)
    if key is None:  # only once the source is known: a wrong --source stays a one-line error
        log.warning("recording %s WITHOUT encryption: no storage key (R-SEC-7); see --storage-key", out)
    try:
        manifest = default_manifest(
            source=named.uri, extra={"frames_requested": frames, "duration_s": duration}
        )
        # Without --calibration, attach the configured source's profile, else what the source
        # carries (a recording's own, the simulator's true maps), so a replay is conditioned
        # exactly as the live stream was.
        attach = resolve_profile(calibration or named.calibration, src).profile
        recorder = Recorder(
            out, manifest=manifest, calibration=attach, chunk_bytes=chunk_kib * 1024, key=key, policy=policy
        )
        with stop_on_signals() as stop, terminal_progress("recording", frames) as progress:
            summary = record_source(
                src, recorder, frames=frames, duration_s=duration, stop=stop, progress=progress
            )
    finally:
        src.close()
    if summary.frames == 0:
        log.warning("%s delivered no frame: is the scanner sending?", source)
    if global_options(ctx).json:
        typer.echo(json.dumps(summary.to_dict(), sort_keys=True))
    else:
        typer.echo(
            f"recorded {summary.frames} frames to {summary.path} ({summary.bytes} bytes, "
            f"{summary.duration_s:.1f} s, {summary.malformed} malformed, "
            f"{summary.upstream_gaps} missing upstream)"
        )


def sim_profile(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Directory to write the calibration profile into.")],
    seed: Annotated[int, typer.Option("--seed", help="Simulator seed (the sensor depends on it).")] = 0,
    scanner: Annotated[str, typer.Option("--scanner", help="Scanner id the profile is for.")] = "sim0",
) -> None:
    """Write the simulated sensor's true calibration profile (for `--source sim?seed=S`)."""
    profile = true_profile(ScannerSimulator(seed=seed, identities=1, scanner=scanner))
    path = profile.save(out)
    if global_options(ctx).json:
        typer.echo(json.dumps({"profile_id": profile.profile_id, "path": str(path), "scanner": scanner}))
    else:
        typer.echo(
            f"wrote calibration profile {profile.profile_id} for {scanner} (simulator seed {seed}) to {path} "
            f"({profile.bad_pixel_fraction:.2%} bad pixels)"
        )


def sim_dataset(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Directory to write the dataset into (created).")],
    identities: Annotated[int, typer.Option("--identities", min=2, help="Number of simulated people.")] = 20,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="Concealed/unconcealed pairs per identity and posture.")
    ] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Simulator seed (same seed, same dataset).")] = 0,
    test_identities: Annotated[
        int | None,
        typer.Option(
            "--test-identities", min=0, help="Identities held out for test.csv (default: a quarter)."
        ),
    ] = None,
) -> None:
    """Write a research-format dataset: 64×64 PNG crops plus train_val.csv / test.csv triplets."""
    if out.exists() and any(out.iterdir()):
        raise ThzEdgeError(f"{out} exists and is not empty; choose a new --out directory or empty it")
    with terminal_progress("simulating") as progress:
        summary = write_dataset(
            out,
            identities=identities,
            samples=samples,
            seed=seed,
            test_identities=test_identities,
            progress=progress,
        )
    if global_options(ctx).json:
        typer.echo(json.dumps(summary.to_dict(), sort_keys=True))
    else:
        typer.echo(
            f"wrote {summary.images} crops of {summary.identities} identities to {summary.out_dir} in "
            f"{summary.seconds:.1f} s: train_val.csv {summary.train_triplets} triplets "
            f"({len(summary.train_identities)} identities), test.csv {summary.test_triplets} triplets "
            f"({len(summary.test_identities)} identities), calibration profile {summary.profile_id}"
        )


def sim_preview(
    out: Annotated[Path, typer.Option("--out", help="PNG file to write the contact sheet to.")],
    identities: Annotated[
        int, typer.Option("--identities", min=1, max=12, help="Rows (people) to show.")
    ] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Simulator seed.")] = 0,
    tile: Annotated[int, typer.Option("--tile", min=32, max=256, help="Tile size in pixels.")] = 64,
) -> None:
    """Render a contact sheet: concealed crop, unconcealed target and raw frame per posture."""
    if out.suffix.lower() != ".png":  # before the (slow) rendering
        raise ThzEdgeError(f"--out {out} must end in .png")
    sheet = preview_sheet(ScannerSimulator(seed=seed, identities=max(identities, 1)), identities, tile=tile)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), sheet):
        raise ThzEdgeError(f"cannot write {out}; check the directory is writable")
    typer.echo(f"wrote {out} ({sheet.shape[1]}x{sheet.shape[0]})")
