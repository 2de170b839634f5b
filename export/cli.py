"""Commands owned by the export package, attached to the root CLI by `register`.

`thzedge export ...` is one sub-app (`export_app`); each command registers on it, so new
export steps (quantize, check, engine) add a function here. Nothing heavy is imported at
module level: torch and onnx load inside the commands, so `thzedge --help` works on a device
without the export extra.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from scanner_io.errors import MissingDependencyError

export_app = typer.Typer(
    name="export",
    help="Turn research checkpoints into verified model bundles (ONNX, quantized variants, engines).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Attach this package's commands to the root `thzedge` app."""
    app.add_typer(export_app, name="export")
    # `thzedge train` and `thzedge export threshold` (demo model, H7) live in export/train_cli.py.
    from export.train_cli import register as _register_training

    _register_training(app, export_app)


def require_export_extra() -> None:
    """Fail with what to install when torch/onnx (the `export` extra) are missing."""
    missing = [m for m in ("torch", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"{' and '.join(missing)} not installed; install the export extra: pip install 'thzedge[export]'"
        )


@export_app.command("onnx")
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
    from export.bundle_writer import check_destination, write_bundle
    from export.checkpoint import import_checkpoint
    from export.onnx_export import check_opset

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


# quantize / check / engine (H8) live in their own module and register on the same sub-app.
from export.quantize_cli import register as _register_quantization  # noqa: E402

_register_quantization(export_app)
