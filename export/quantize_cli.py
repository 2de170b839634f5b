"""`thzedge export quantize | check | engine`: parse, call export.quantize / gate / engine, render.

Attached to the `export` sub-app by `register(export_app)` (called from export/cli.py). Nothing
heavy is imported at module level: onnx, onnxruntime.quantization and tensorrt load inside the
commands, so `thzedge --help` works on a device without them.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from scanner_io.errors import EXIT_USER_ERROR, ThzEdgeError


class QuantPrecision(str, Enum):
    int8 = "int8"
    fp16 = "fp16"


class EnginePrecision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class CalibMethod(str, Enum):
    max = "max"
    entropy = "entropy"
    percentile = "percentile"


class Quantizer(str, Enum):
    auto = "auto"
    modelopt = "modelopt"
    ort = "ort"


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip().lower() for v in value.split(",") if v.strip())


# Options `quantize` and `check` share: the gate's threshold method and its tolerances.
TargetFar = Annotated[
    float | None, typer.Option("--target-far", help="Derive the threshold at this FAR instead of the EER.")
]
MaxTripletDrop = Annotated[float, typer.Option("--max-triplet-drop", help="pp")]
MaxEerRise = Annotated[float, typer.Option("--max-eer-rise", help="pp")]
MaxPostureDrop = Annotated[float, typer.Option("--max-posture-drop", help="pp")]
MaxSsimDrop = Annotated[float, typer.Option("--max-ssim-drop")]
MaxPsnrDrop = Annotated[float, typer.Option("--max-psnr-drop", help="dB")]
MinCosine = Annotated[float, typer.Option("--min-cosine", help="Median embedding cosine vs fp32.")]


def _tolerances(
    triplet_pp: float, eer_pp: float, posture_pp: float, ssim: float, psnr_db: float, cosine: float
):  # noqa: ANN202 - returns export.gate.GateTolerances, imported lazily
    from export.gate import GateTolerances

    return GateTolerances(
        triplet_accuracy_pp=triplet_pp,
        eer_pp=eer_pp,
        posture_accuracy_pp=posture_pp,
        ssim=ssim,
        psnr_db=psnr_db,
        median_cosine=cosine,
    )


def _default_triplets(data: Path | None, calibration: Path, triplets: Path | None) -> tuple[Path, Path]:
    """Held-out data for the gate: --data/--triplets, else test_dataset.csv next to the calibration set."""
    data = data or (calibration if calibration.is_dir() else None)
    if data is not None and triplets is None:
        for name in ("test_dataset.csv", "test.csv", "triplets_test.csv"):
            if (data / name).is_file():
                triplets = data / name
                break
    if data is None or triplets is None:
        raise ThzEdgeError(
            "quantize runs the accuracy gate and needs held-out data: pass --data DIR --triplets CSV "
            "(research format, e.g. from `thzedge sim dataset`)"
        )
    return data, triplets


def quantize_command(
    bundle: Annotated[Path, typer.Option("--bundle", help="Model bundle directory to add the variant to.")],
    calibration: Annotated[
        Path,
        typer.Option(
            "--calibration", help="Research-format dataset dir, folder of MCAP recordings, or .npy of inputs."
        ),
    ],
    precision: Annotated[
        QuantPrecision, typer.Option("--precision", help="Variant to make.")
    ] = QuantPrecision.int8,
    method: Annotated[
        CalibMethod, typer.Option("--method", help="INT8 range calibration.")
    ] = CalibMethod.max,
    samples: Annotated[
        int, typer.Option("--samples", help="Calibration frames (stratified by posture).")
    ] = 512,
    keep_float: Annotated[
        str,
        typer.Option(
            "--keep-float", help="Comma list kept in float: embedding, latent, sigmoid, stem; '' for none."
        ),
    ] = "embedding,latent,sigmoid",
    quantizer: Annotated[
        Quantizer, typer.Option("--quantizer", help="auto: Model Optimizer if installed, else ONNX Runtime.")
    ] = Quantizer.auto,
    data: Annotated[Path | None, typer.Option("--data", help="Held-out dataset dir for the gate.")] = None,
    triplets: Annotated[
        Path | None, typer.Option("--triplets", help="Held-out triplet CSV for the gate.")
    ] = None,
    profile: Annotated[
        Path | None, typer.Option("--profile", help="Calibration profile to condition MCAP frames with.")
    ] = None,
    target_far: TargetFar = None,
    max_triplet_drop: MaxTripletDrop = 1.0,
    max_eer_rise: MaxEerRise = 1.0,
    max_posture_drop: MaxPostureDrop = 1.0,
    max_ssim_drop: MaxSsimDrop = 0.01,
    max_psnr_drop: MaxPsnrDrop = 0.5,
    min_cosine: MinCosine = 0.99,
    as_json: Annotated[bool, typer.Option("--json", help="Print the gate report as JSON.")] = False,
) -> None:
    """Add an INT8 (Q/DQ) or FP16 variant to a bundle; it is kept only if the accuracy gate passes."""
    from export.quantize import QuantizeSettings, quantize_bundle

    settings = QuantizeSettings(
        precision=precision.value,
        method=method.value,
        samples=samples,
        keep_float=_split(keep_float),
        quantizer=quantizer.value,
    )
    data_dir, csv = _default_triplets(data, calibration, triplets)
    tol = _tolerances(
        max_triplet_drop, max_eer_rise, max_posture_drop, max_ssim_drop, max_psnr_drop, min_cosine
    )
    outcome = quantize_bundle(bundle, calibration, settings, data_dir, csv, tol, target_far, profile)
    if as_json:
        typer.echo(
            json.dumps({"added": outcome.added, "report": outcome.report.to_dict()}, indent=2, default=str)
        )
    else:
        typer.echo(outcome.report.render())
        if outcome.added:
            typer.echo(
                f"added the {precision.value} variant to {bundle} "
                f"(report: {precision.value}/gate_report.json)"
            )
    if not outcome.added:
        typer.echo(
            f"thzedge: error: the {precision.value} variant failed the accuracy gate; "
            f"it was not added to {bundle}",
            err=True,
        )
        raise typer.Exit(EXIT_USER_ERROR)


def check_command(
    bundle: Annotated[Path, typer.Option("--bundle", help="Model bundle directory.")],
    precision: Annotated[QuantPrecision, typer.Option("--precision", help="Variant to check against fp32.")],
    data: Annotated[Path, typer.Option("--data", help="Held-out dataset directory (research format).")],
    triplets: Annotated[Path, typer.Option("--triplets", help="Held-out triplet CSV.")],
    target_far: TargetFar = None,
    max_triplet_drop: MaxTripletDrop = 1.0,
    max_eer_rise: MaxEerRise = 1.0,
    max_posture_drop: MaxPostureDrop = 1.0,
    max_ssim_drop: MaxSsimDrop = 0.01,
    max_psnr_drop: MaxPsnrDrop = 0.5,
    min_cosine: MinCosine = 0.99,
    speed_seconds: Annotated[
        float, typer.Option("--speed-seconds", help="Timing per side; 0 skips it.")
    ] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Compare a bundle's variant with fp32 on held-out data; exit 1 if any line fails."""
    from export.gate import run_gate

    tol = _tolerances(
        max_triplet_drop, max_eer_rise, max_posture_drop, max_ssim_drop, max_psnr_drop, min_cosine
    )
    report = run_gate(bundle, precision.value, data, triplets, tol, target_far, speed_seconds=speed_seconds)
    typer.echo(json.dumps(report.to_dict(), indent=2, default=str) if as_json else report.render())
    if not report.passed:
        raise typer.Exit(EXIT_USER_ERROR)


def engine_command(
    bundle: Annotated[Path, typer.Option("--bundle", help="Model bundle directory.")],
    precision: Annotated[EnginePrecision, typer.Option("--precision")] = EnginePrecision.fp16,
    max_batch: Annotated[
        int | None, typer.Option("--max-batch", help="Profile max (default: bundle's).")
    ] = None,
    workspace: Annotated[int, typer.Option("--workspace", help="Builder workspace in MB.")] = 1024,
    dla_core: Annotated[
        int | None, typer.Option("--dla-core", help="Build for this DLA core (Orin).")
    ] = None,
) -> None:
    """Build one TensorRT engine per graph on this device, with a manifest the trt backend checks."""
    from edge.backends.trt import current_platform, import_tensorrt
    from edge.bundle import Bundle
    from export.engine import EngineSettings, build_bundle_engines

    # Fail at once, in one line, when TensorRT or the GPU is missing (before touching the bundle).
    trt = import_tensorrt()
    platform = current_platform(trt)
    b = Bundle.open(bundle)
    settings = EngineSettings(
        precision=precision.value,
        max_batch=max_batch or b.max_batch,
        workspace_mb=workspace,
        dla_core=dla_core,
    )
    manifests = build_bundle_engines(bundle, settings, trt=trt, platform=platform)
    for m in manifests:
        typer.echo(
            f"{m['graph']:<10} {m['precision']}  TensorRT {m['tensorrt_version']}  {m['gpu_name']} "
            f"(sm {m['compute_capability']})  engine {m['engine_sha256'][:12]}"
        )


def register(export_app: typer.Typer) -> None:
    """Attach quantize / check / engine to the `export` sub-app."""
    export_app.command("quantize")(quantize_command)
    export_app.command("check")(check_command)
    export_app.command("engine")(engine_command)
