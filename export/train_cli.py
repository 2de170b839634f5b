"""`thzedge train`: parse, call export.train, render. Attached to the root app by `register(app)`.

torch loads inside the command only, so `thzedge --help` works without the export extra.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from export.train import TrainConfig

# Defaults are the shipped demo recipe (export.train imports no torch at module level).
D = TrainConfig()


class Augment(str, Enum):
    gentle = "gentle"
    none = "none"


class Sampler(str, Enum):
    random = "random"
    pk = "pk"


class LabelScheme(str, Enum):
    identity = "identity"
    triplet = "triplet"


def register(app: typer.Typer, export_app: typer.Typer | None = None) -> None:
    """Attach `thzedge train` to the root app and `threshold` to the `export` sub-app."""
    app.command("train")(train_command)
    if export_app is not None:
        export_app.command("threshold")(threshold_command)


def train_command(
    data: Annotated[
        Path, typer.Option("--data", help="Research-format dataset directory (with train_val.csv).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write (best epoch by validation SSIM).")],
    width: Annotated[
        float, typer.Option("--width", help="Channel width multiplier; width x 64 must be whole (0.125, 1).")
    ] = D.width,
    epochs: Annotated[
        int, typer.Option("--epochs", min=1, help="Passes over the training triplets.")
    ] = D.epochs,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of initialisation, order and augmentation.")
    ] = D.seed,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Triplets per step.")] = D.batch_size,
    lr: Annotated[
        float, typer.Option("--lr", help="Peak AdamW learning rate (warm-up, cosine decay).")
    ] = D.lr,
    dropout: Annotated[
        float, typer.Option("--dropout", min=0.0, max=0.9, help="Dropout of latent and head (research: 0.5).")
    ] = D.dropout,
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="torch CPU threads (fixed, for reproducibility).")
    ] = D.threads,
    augment: Annotated[
        Augment, typer.Option("--augment", help="Input augmentation profile.")
    ] = Augment.gentle,
    sampler: Annotated[
        Sampler, typer.Option("--sampler", help="Batches: random triplets, or runs of one identity (pk).")
    ] = Sampler.random,
    supcon_labels: Annotated[
        LabelScheme,
        typer.Option(
            "--supcon-labels", help="SupCon labels: true identities, or per triplet (research code)."
        ),
    ] = LabelScheme.identity,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Stop after this many steps (trial runs).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train the multi-task network on a simulated (or research) dataset and write a checkpoint."""
    from export.cli import require_export_extra

    require_export_extra()
    from export.train import TrainConfig, train

    config = TrainConfig(
        width=width,
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        threads=threads,
        dropout=dropout,
        sampler=sampler.value,
        augment=augment.value,
        label_scheme=supcon_labels.value,
        max_steps=max_steps,
    )
    result = train(data, out, config)
    best = result.best_val
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "checkpoint": str(result.checkpoint),
                    "best_epoch": result.best_epoch,
                    "best_val": best,
                    "seconds": round(result.seconds, 1),
                    "steps": result.steps,
                    "skipped_steps": result.skipped_steps,
                    "val_identities": len(result.val_identities),
                    "config": result.config,
                },
                indent=2,
            )
        )
        return
    typer.echo(
        f"wrote {result.checkpoint}: epoch {result.best_epoch} of {len(result.history)}, "
        f"validation ({len(result.val_identities)} held-out identities) SSIM {best['ssim']:.3f}, "
        f"posture {best['posture_accuracy']:.3f}, triplet accuracy {best['triplet_accuracy']:.3f}, "
        f"EER {best['eer']:.3f}; {result.steps} steps in {result.seconds:.0f}s"
        + (f" ({result.skipped_steps} non-finite steps skipped)" if result.skipped_steps else "")
    )


def threshold_command(
    model: Annotated[
        Path, typer.Option("--model", help="Bundle directory whose manifest gets the threshold.")
    ],
    data: Annotated[Path, typer.Option("--data", help="The dataset the checkpoint was trained on.")],
    checkpoint: Annotated[
        Path,
        typer.Option("--checkpoint", help="Checkpoint from `thzedge train` (names the held-out identities)."),
    ],
    precision: Annotated[
        str, typer.Option("--precision", help="Bundle variant to calibrate (fp32, int8, ...).")
    ] = "fp32",
    target_far: Annotated[
        float | None,
        typer.Option("--target-far", min=0.0, max=1.0, help="Threshold at this FAR instead of EER."),
    ] = None,
    roc: Annotated[
        Path | None,
        typer.Option("--roc", help="ROC PNG to write (default: BUNDLE-roc-PRECISION.png beside it)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Store the verification threshold (EER point or target FAR) in a bundle and draw its ROC."""
    from export.cli import require_export_extra

    require_export_extra()
    from dataclasses import asdict

    from export.train import calibrate_threshold

    roc = roc or model.resolve().with_name(f"{model.resolve().name}-roc-{precision}.png")
    r = calibrate_threshold(model, data, checkpoint, precision=precision, target_far=target_far, roc_png=roc)
    if json_out:
        typer.echo(json.dumps(asdict(r) | {"roc": str(roc)}, indent=2))
        return
    typer.echo(
        f"{precision} threshold {r.threshold:.4f} (EER {r.eer:.4f} on {r.n_pairs} validation pairs of "
        f"{r.identities} held-out identities, {r.method}) stored in {model}; bundle id now "
        f"{r.bundle_id[:12]}; ROC in {roc}"
    )
