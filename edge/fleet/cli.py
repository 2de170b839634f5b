"""Commands of the fleet package: `thzedge rescore` and `thzedge replay --verify|--make-golden`.

Ray and pyarrow (the `fleet` extra) are imported only when a command needs them, so both
commands show in `--help` without it and say what to install when run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edge.backends import BackendKind
from edge.bundle import Bundle, Precision, model_path
from edge.fleet.engines import Engine, expand_recordings, import_ray, require_pyarrow, run_engine
from edge.fleet.rescore import ModelSpec, RescoreJob, check_job, summarize
from edge.gallery import VerificationMode
from edge.pipeline.context import ModelInfo
from edge.runner import Runner
from scanner_io.cli import STORAGE_KEY_HELP, storage_key_option
from scanner_io.cli_common import global_options, terminal_progress
from scanner_io.errors import UsageError


def _key_file(explicit: Path | None) -> str | None:
    """The storage key file workers read (`--storage-key`, else the default places), or None."""
    key = storage_key_option(explicit)
    if key is not None and key.path is None:
        raise UsageError("give the storage key as a file (--storage-key): Ray workers read it from there")
    return str(key.path) if key is not None and key.path is not None else None


def register(app: typer.Typer) -> None:
    """Attach this package's commands to the root `thzedge` app."""
    app.command("rescore")(rescore_command)
    app.command("replay")(replay_command)


def rescore_command(
    ctx: typer.Context,
    recordings: Annotated[list[str], typer.Argument(help="MCAP recordings: files, directories or globs.")],
    model: Annotated[str, typer.Option("--model", help="The new model bundle (or `demo`).")],
    out: Annotated[
        Path, typer.Option("--out", help="Directory for rows.parquet, summary.json, report.html.")
    ],
    precision: Annotated[Precision, typer.Option("--precision", help="Precision of the new model.")] = (
        Precision.fp32
    ),
    baseline: Annotated[
        str | None, typer.Option("--baseline", help="The bundle deployed now, or `demo` (default: --model).")
    ] = None,
    baseline_precision: Annotated[
        Precision, typer.Option("--baseline-precision", help="Precision of the baseline.")
    ] = Precision.fp32,
    gallery: Annotated[
        Path | None, typer.Option("--gallery", help="Gallery enrolled with the new model (for decisions).")
    ] = None,
    baseline_gallery: Annotated[
        Path | None,
        typer.Option(
            "--baseline-gallery", help="Gallery of the baseline (default: --gallery if same bundle)."
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option("--calibration", help="Profile for every recording (default: the one each carries)."),
    ] = None,
    engine: Annotated[Engine, typer.Option("--engine", help="local (in-process) or ray (Ray Data).")] = (
        Engine.local
    ),
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster address (default: start Ray locally).")
    ] = None,
    actors: Annotated[int, typer.Option("--actors", help="Ray actors (model copies).", min=1)] = 1,
    threads: Annotated[int, typer.Option("--threads", help="ORT intra-op threads per session.", min=1)] = 1,
    backend: Annotated[
        BackendKind, typer.Option("--backend", help="Backend of both models in every worker.")
    ] = BackendKind.ort,
    scores: Annotated[
        bool, typer.Option("--scores", help="Keep match distances in the rows (biometric-derived; opt-in).")
    ] = False,
    no_reconstruction: Annotated[
        bool, typer.Option("--no-reconstruction", help="Skip the decoders (no SSIM column).")
    ] = False,
    storage_key: Annotated[Path | None, typer.Option("--storage-key", help=STORAGE_KEY_HELP)] = None,
) -> None:
    """Re-score recordings with a new bundle against the deployed one: flips per recording, Parquet, HTML."""
    from edge.fleet.report import write_outputs

    kind = engine
    require_pyarrow()  # before hours of scoring, not after
    if kind is Engine.ray:
        import_ray()
    new_bundle = model_path(model)
    base_bundle = model_path(baseline) if baseline is not None else new_bundle
    # A gallery is tied to its bundle: reuse it for the baseline only when that is the same bundle.
    if (
        baseline_gallery is None
        and gallery is not None
        and Bundle.open(base_bundle).sha256 == Bundle.open(new_bundle).sha256
    ):
        baseline_gallery = gallery
    job = RescoreJob(
        model=ModelSpec(
            str(new_bundle), precision.value, backend.value, gallery=str(gallery) if gallery else None
        ),
        baseline=ModelSpec(
            str(base_bundle),
            baseline_precision.value,
            backend.value,
            gallery=str(baseline_gallery) if baseline_gallery else None,
        ),
        calibration=str(calibration) if calibration else None,
        threads=threads,
        scores=scores,
        reconstruction=not no_reconstruction,
        verification_mode=VerificationMode.auto,
        storage_key=_key_file(storage_key),
    )
    check_job(job)
    paths = expand_recordings(recordings)
    with terminal_progress(f"rescoring {len(paths)} recordings", total=len(paths)) as progress:
        rows, seconds = run_engine(kind, paths, job, actors=actors, address=address, progress=progress)
    summary = summarize(rows, job, kind.value if kind.value == "local" else f"ray x{actors}", seconds)
    written = write_outputs(rows, summary, job, out)
    if global_options(ctx).json:
        typer.echo(json.dumps({**summary.to_dict(), "outputs": written.to_dict()}, indent=2))
    else:
        typer.echo(summary.render())
        files = (written.rows, written.summary, written.html, *written.plots)
        typer.echo(f"wrote {', '.join(str(p) for p in files)}")


def replay_command(
    ctx: typer.Context,
    recording: Annotated[
        Path | None, typer.Argument(help="Recording to make a golden file from (with --make-golden).")
    ] = None,
    verify: Annotated[
        Path | None, typer.Option("--verify", help="Golden file to replay and compare frame by frame.")
    ] = None,
    make_golden: Annotated[
        Path | None, typer.Option("--make-golden", help="Write RECORDING plus this model's results here.")
    ] = None,
    model: Annotated[str, typer.Option("--model", help="Model bundle directory, or `demo`.")] = "demo",
    backend: Annotated[BackendKind, typer.Option("--backend", help="Inference backend.")] = BackendKind.auto,
    precision: Annotated[Precision, typer.Option("--precision", help="Bundle precision.")] = Precision.fp32,
    calibration: Annotated[
        Path | None, typer.Option("--calibration", help="Profile instead of the one the recording carries.")
    ] = None,
    max_frames: Annotated[
        int | None, typer.Option("--max-frames", help="With --make-golden: keep the first N frames.", min=1)
    ] = None,
    storage_key: Annotated[Path | None, typer.Option("--storage-key", help=STORAGE_KEY_HELP)] = None,
) -> None:
    """Golden replays: --make-golden pins a model's results on a recording; --verify fails on any drift."""
    from edge.fleet.golden import make_golden as make
    from edge.fleet.golden import verify_golden

    if (verify is None) == (make_golden is None):
        raise UsageError("give exactly one of --verify GOLDEN.mcap or --make-golden OUT.mcap RECORDING")
    if make_golden is not None and recording is None:
        raise UsageError("--make-golden OUT.mcap needs the RECORDING to replay")
    if verify is not None and recording is not None:
        raise UsageError("--verify replays the golden file itself; drop RECORDING")
    key = storage_key_option(storage_key)
    bundle = Bundle.open(model_path(model))
    with Runner.from_bundle(bundle, backend=backend.value, precision=precision.value) as runner:
        info = ModelInfo(bundle.sha256, precision.value, runner.backend.name)
        if make_golden is not None:
            assert recording is not None
            g = make(
                recording, runner, info, make_golden, calibration=calibration, max_frames=max_frames, key=key
            )
            result = {"golden": str(g.path), "frames": len(g.frames), "pins": vars(g.pins)}
            pins = f"{info.bundle[:12]} {info.precision} {info.backend}"
            text = f"wrote {g.path}: {len(g.frames)} frames pinned to {pins}"
        else:
            assert verify is not None
            report = verify_golden(verify, runner, info, calibration=calibration, key=key)
            result, text = report.to_dict(), report.render()
    typer.echo(json.dumps(result, indent=2) if global_options(ctx).json else text)
