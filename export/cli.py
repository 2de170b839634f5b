"""Commands owned by the export package, attached to the root CLI by `register(app)`.

`thzedge export onnx|quantize|check|engine|threshold` is one sub-app, and `thzedge train` a
root command; the commands live here (onnx), in quantize_cli.py and in train_cli.py, and
`register` is the one place that attaches them. Nothing heavy is imported at module level:
torch and onnx load inside the commands, so `thzedge --help` works on a device without the
export extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from export.bundle_writer import check_destination, write_bundle
from export.extras import require_export_extra
from export.onnx_export import check_opset
from export.quantize_cli import check_command, engine_command, quantize_command
from export.train_cli import threshold_command, train_command


def register(app: typer.Typer) -> None:
    """Attach `export onnx|quantize|check|engine|threshold` and `train` to the root `thzedge` app."""
    export_app = typer.Typer(
        name="export",
        help="Turn research checkpoints into verified model bundles (ONNX, quantized variants, engines).",
        no_args_is_help=True,
    )
    export_app.command("onnx")(onnx_command)
    export_app.command("quantize")(quantize_command)
    export_app.command("check")(check_command)
    export_app.command("engine")(engine_command)
    export_app.command("threshold")(threshold_command)
    export_app.command("sign")(sign_command)
    app.add_typer(export_app, name="export")
    app.command("train")(train_command)


def onnx_command(
    checkpoint: Annotated[
        Path, typer.Option("--checkpoint", help="Research checkpoint (.pth): THz-only or distilled student.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Bundle directory to write (must not exist or be empty).")
    ],
    opset: Annotated[
        int, typer.Option("--opset", help="ONNX opset; 17 builds on JetPack 6.0 (TensorRT 8.6).")
    ] = 17,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="Largest batch the bundle promises (checked at export).")
    ] = 8,
    trust_checkpoint: Annotated[
        bool,
        typer.Option(
            "--trust-checkpoint",
            help="Allow a checkpoint whose pickle would run code. Only for files from a source you trust.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out directory.")] = False,
) -> None:
    """Import a research checkpoint and write a checked ONNX model bundle."""
    require_export_extra()
    from export.checkpoint import import_checkpoint  # imports torch

    # Cheap checks before the (slow) import, so a typo fails fast.
    check_opset(opset)
    check_destination(out, force)

    imported = import_checkpoint(checkpoint, trust=trust_checkpoint)
    typer.echo(
        f"imported {imported.layout} checkpoint: embedding {imported.config.embedding_dim}, "
        f"{imported.config.num_postures} postures, width {imported.config.width:g}, "
        f"{imported.dropped} training-only tensors dropped",
        err=True,
    )
    result = write_bundle(
        imported.model,
        out,
        variant=imported.layout,
        opset=opset,
        max_batch=max_batch,
        source=imported.source(),
        force=force,
    )
    typer.echo(result.parity.render())
    typer.echo(
        f"wrote bundle {result.bundle.path} (id {result.bundle.id}, opset {opset}, max batch {max_batch})"
    )


def sign_command(
    bundle: Annotated[Path, typer.Option("--bundle", help="Bundle directory whose manifest.json to sign.")],
    key: Annotated[
        Path,
        typer.Option(
            "--key", help="Ed25519 secret key NAME.sign_key (`thzedge keys generate --kind signing`)."
        ),
    ],
) -> None:
    """Sign a bundle's manifest (Ed25519): devices with [model] trusted_keys_dir load only signed bundles."""
    from edge.bundle import Bundle
    from edge.signing import sign_bundle

    Bundle.open(bundle)  # sign only what verifies: every file matches its manifest sha256
    out = sign_bundle(bundle, key)
    typer.echo(f"signed {bundle}: wrote {out}")
