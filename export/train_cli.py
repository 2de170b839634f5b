"""`thzedge train` and `thzedge export threshold`: parse, call export.train, render.

export/cli.py attaches them. torch loads inside the commands only (export.train imports no torch
at module level), so `thzedge --help` works without the export extra.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from edge.bundle import Precision, writable_model_path
from export.extras import require_export_extra
from export.train import (
    Augmentation,
    LabelScheme,
    Positives,
    Sampler,
    Selection,
    ThresholdPairs,
    TrainConfig,
    calibrate_threshold,
    train,
)
from scanner_io.cli_common import global_options

# Defaults are the shipped demo recipe.
D = TrainConfig()


def train_command(
    ctx: typer.Context,
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
        Augmentation, typer.Option("--augment", help="Input augmentation profile.")
    ] = Augmentation(D.augment),
    sampler: Annotated[
        Sampler, typer.Option("--sampler", help="Batches: random triplets, or runs of one identity (pk).")
    ] = Sampler(D.sampler),
    supcon_labels: Annotated[
        LabelScheme,
        typer.Option(
            "--supcon-labels", help="SupCon labels: true identities, or per triplet (research code)."
        ),
    ] = LabelScheme(D.label_scheme),
    positives: Annotated[
        Positives,
        typer.Option(
            "--positives",
            help="SupCon positives: the anchor's unconcealed crop (capture), or also another capture.",
        ),
    ] = Positives(D.positives),
    select: Annotated[
        Selection,
        typer.Option("--select", help="Epoch kept: best validation SSIM, or best cross-capture EER."),
    ] = Selection(D.select),
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Stop after this many steps (trial runs).")
    ] = None,
) -> None:
    """Train the multi-task network on a simulated (or research) dataset and write a checkpoint."""
    require_export_extra()
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
        positives=positives.value,
        select=select.value,
        max_steps=max_steps,
    )
    result = train(data, out, config)
    best = result.best_val
    if global_options(ctx).json:
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
        f"EER {best['eer']:.3f}, cross-capture EER {best['cross_eer']:.3f}; "
        f"{result.steps} steps in {result.seconds:.0f}s"
        + (f" ({result.skipped_steps} non-finite steps skipped)" if result.skipped_steps else "")
    )


def threshold_command(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Option("--model", help="Bundle directory whose manifest gets the threshold.")
    ],
    data: Annotated[Path, typer.Option("--data", help="The dataset the checkpoint was trained on.")],
    checkpoint: Annotated[
        Path,
        typer.Option("--checkpoint", help="Checkpoint from `thzedge train` (names the held-out identities)."),
    ],
    precision: Annotated[
        Precision, typer.Option("--precision", help="Bundle variant to calibrate.")
    ] = Precision.fp32,
    target_far: Annotated[
        float | None,
        typer.Option("--target-far", min=0.0, max=1.0, help="Threshold at this FAR instead of EER."),
    ] = None,
    roc: Annotated[
        Path | None,
        typer.Option("--roc", help="ROC PNG to write (default: BUNDLE-roc-PRECISION.png beside it)."),
    ] = None,
    pairs: Annotated[
        ThresholdPairs,
        typer.Option(
            "--pairs",
            help="Validation pairs: same-capture triplets, or a gallery of other captures.",
        ),
    ] = ThresholdPairs.capture,
) -> None:
    """Store the verification threshold (EER point or target FAR) in a bundle and draw its ROC."""
    require_export_extra()
    bundle = writable_model_path(model, "thzedge export threshold")
    roc = roc or bundle.resolve().with_name(f"{bundle.resolve().name}-roc-{precision.value}.png")
    r = calibrate_threshold(
        bundle,
        data,
        checkpoint,
        precision=precision.value,
        target_far=target_far,
        roc_png=roc,
        pairs=pairs.value,
    )
    if global_options(ctx).json:
        typer.echo(json.dumps(asdict(r) | {"roc": str(roc)}, indent=2))
        return
    typer.echo(
        f"{precision} threshold {r.threshold:.4f} (EER {r.eer:.4f} on {r.n_pairs} validation pairs of "
        f"{r.identities} held-out identities, {r.method}, {pairs.value} pairs) stored in {bundle}; "
        "bundle id now "
        f"{r.bundle_id[:12]}; ROC in {roc}"
    )
