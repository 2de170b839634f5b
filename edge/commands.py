"""Commands owned by the edge package (run, infer, eval, bench), attached by `register`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Attach this package's commands to the root `thzedge` app."""
    app.command("infer")(infer_command)
    app.command("eval")(eval_command)
    app.command("run")(run_command)


# --- infer / eval (H2) ---------------------------------------------------------------------------


class BackendKind(str, Enum):
    """Inference backend: auto takes a matching TensorRT engine if there is one, else ONNX Runtime."""

    auto = "auto"
    ort = "ort"
    trt = "trt"


class Routing(str, Enum):
    """Which posture picks each frame's decoder."""

    predicted = "predicted"
    truth = "truth"


_MODEL_HELP = "Model bundle directory (from `thzedge export onnx`)."
_BACKEND_HELP = "Inference backend: auto, ort (ONNX Runtime) or trt (TensorRT engine)."
_PRECISION_HELP = "Bundle precision variant to run (fp32, fp16, int8)."


def infer_command(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="Conditioned crops: 8-bit grayscale PNGs, .npy [N,64,64]/[N,1,64,64], or dirs."),
    ],
    model: Annotated[Path, typer.Option("--model", help=_MODEL_HELP)],
    out: Annotated[Path, typer.Option("--out", help="Where to write the results (.npz).")],
    backend: Annotated[BackendKind, typer.Option("--backend", help=_BACKEND_HELP)] = BackendKind.auto,
    precision: Annotated[str, typer.Option("--precision", help=_PRECISION_HELP)] = "fp32",
    routing: Annotated[
        Routing,
        typer.Option(
            "--routing", help="Decoder by predicted posture, or by the posture in research-format PNG names."
        ),
    ] = Routing.predicted,
    no_reconstruction: Annotated[
        bool, typer.Option("--no-reconstruction", help="Skip the decoders (no reconstruction in the .npz).")
    ] = False,
) -> None:
    """Run a bundle on conditioned 64x64 crops and write embeddings, postures, reconstructions (.npz)."""
    from edge.infer import load_inputs, run_batched, save_results, truth_postures
    from edge.runner import Runner

    batch = load_inputs(inputs)
    reconstruct = not no_reconstruction
    postures = truth_postures(batch) if reconstruct and routing is Routing.truth else None
    with Runner.from_bundle(model, backend=backend.value, precision=precision) as runner:
        outputs = run_batched(runner, batch.x, reconstruct=reconstruct, postures=postures)
        names = runner.postures
    path = save_results(out, outputs, batch.names)
    counts = ", ".join(f"{n} {int((outputs.posture == k).sum())}" for k, n in enumerate(names))
    recon = f"reconstruction routed by {routing.value} posture" if reconstruct else "no reconstruction"
    typer.echo(f"wrote {path}: {len(batch.names)} inputs; predicted postures: {counts}; {recon}")


def eval_command(
    model: Annotated[Path, typer.Option("--model", help=_MODEL_HELP)],
    data: Annotated[Path, typer.Option("--data", help="Dataset directory of research-format PNG crops.")],
    triplets: Annotated[Path, typer.Option("--triplets", help="Triplet CSV (anchor,positive,negative).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    routing: Annotated[
        Routing,
        typer.Option(
            "--routing", help="Decoder by predicted posture (deployed) or by file-name truth (research)."
        ),
    ] = Routing.predicted,
    backend: Annotated[BackendKind, typer.Option("--backend", help=_BACKEND_HELP)] = BackendKind.auto,
    precision: Annotated[str, typer.Option("--precision", help=_PRECISION_HELP)] = "fp32",
) -> None:
    """Score a bundle on a triplet dataset: verification, posture, reconstruction, per posture."""
    import json

    from edge.evaluation import evaluate
    from edge.runner import Runner

    with Runner.from_bundle(model, backend=backend.value, precision=precision) as runner:
        report = evaluate(runner, data, triplets, routing=routing.value)
    typer.echo(json.dumps(report.to_dict(), indent=2) if json_out else report.render())


# --- run (H5) -----------------------------------------------------------------------------------


def run_command(
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="Frame source: a URI (sim?fps=30, replay:FILE.mcap?rate=max, tcp://HOST:PORT, ipc://PATH) "
            "or a source name from the config file (e.g. scanner0).",
        ),
    ],
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Model bundle directory (default: config, else the demo model)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Config file (default /etc/thzedge/thzedge.toml if present)."),
    ] = None,
    backend: Annotated[BackendKind | None, typer.Option("--backend", help=_BACKEND_HELP)] = None,
    publish: Annotated[
        str | None,
        typer.Option("--publish", help="Results endpoint to bind (default: config, else an ipc:// socket)."),
    ] = None,
    record: Annotated[
        Path | None, typer.Option("--record", help="Also record the raw frames to this MCAP file.")
    ] = None,
    max_frames: Annotated[
        int | None,
        typer.Option("--max-frames", help="Stop after this many frames (default: run until stopped)."),
    ] = None,
    no_reconstruction: Annotated[
        bool, typer.Option("--no-reconstruction", help="Skip the decoders (posture and verification only).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the end-of-run summary as JSON.")] = False,
) -> None:
    """Stream frames through the model and publish results until the source ends or a signal stops it."""
    import json

    from edge.daemon import RunOptions, run_daemon

    summary = run_daemon(
        RunOptions(
            source=source,
            model=model,
            config=config,
            backend=backend.value if backend is not None else None,
            publish=publish,
            record=record,
            max_frames=max_frames,
            reconstruction=not no_reconstruction,
        )
    )
    typer.echo(json.dumps(summary.to_dict(), sort_keys=True) if json_out else summary.render())
