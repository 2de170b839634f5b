"""`thzedge export quantize | check | engine`: parse, call export.quantize / gate / engine, render.

export/cli.py attaches them to the `export` sub-app. Nothing heavy is imported at module level:
onnx, onnxruntime.quantization and tensorrt load inside the library functions, so
`thzedge --help` works on a device without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edge.backends.engine_cache import resolve_engine_cache
from edge.backends.trt import current_platform, import_tensorrt
from edge.bundle import Bundle, Precision, model_path, writable_model_path
from edge.config import load_model_config
from export.engine import EngineSettings, build_bundle_engines, prune_engine_cache
from export.extras import require_export_extra
from export.gate import GateFailedError, GateTolerances, run_gate
from export.quantize import (
    QUANTIZED_PRECISIONS,
    CalibrationMethod,
    Quantizer,
    QuantizeSettings,
    quantize_bundle,
)
from scanner_io.cli_common import global_options
from scanner_io.errors import ThzEdgeError

_QUANTIZED = " or ".join(QUANTIZED_PRECISIONS)


def _quantized_precision(value: Precision) -> Precision:
    """Refuse fp32 where a quantized variant is meant: it is the reference every bundle has."""
    if value not in QUANTIZED_PRECISIONS:
        raise typer.BadParameter(f"{value} is the reference every bundle has; use {_QUANTIZED}")
    return value


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip().lower() for v in value.split(",") if v.strip())


# Options `quantize` and `check` share: the gate's threshold method and its tolerances.
TargetFar = Annotated[
    float | None, typer.Option("--target-far", help="Derive the threshold at this FAR instead of the EER.")
]
MaxTripletDrop = Annotated[
    float, typer.Option("--max-triplet-drop", help="Largest allowed drop of triplet accuracy vs fp32, in pp.")
]
MaxEerRise = Annotated[
    float, typer.Option("--max-eer-rise", help="Largest allowed rise of the verification EER, in pp.")
]
MaxPostureDrop = Annotated[
    float, typer.Option("--max-posture-drop", help="Largest allowed drop of posture accuracy, in pp.")
]
MaxSsimDrop = Annotated[
    float, typer.Option("--max-ssim-drop", help="Largest allowed drop of reconstruction SSIM (0-1).")
]
MaxPsnrDrop = Annotated[
    float, typer.Option("--max-psnr-drop", help="Largest allowed drop of reconstruction PSNR, in dB.")
]
MinCosine = Annotated[float, typer.Option("--min-cosine", help="Median embedding cosine vs fp32.")]


def _tolerances(
    triplet_pp: float, eer_pp: float, posture_pp: float, ssim: float, psnr_db: float, cosine: float
) -> GateTolerances:
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
    ctx: typer.Context,
    bundle: Annotated[str, typer.Option("--bundle", help="Model bundle directory to add the variant to.")],
    calibration: Annotated[
        Path,
        typer.Option(
            "--calibration", help="Research-format dataset dir, folder of MCAP recordings, or .npy of inputs."
        ),
    ],
    precision: Annotated[
        Precision,
        typer.Option("--precision", help=f"Variant to make: {_QUANTIZED}.", callback=_quantized_precision),
    ] = Precision.int8,
    method: Annotated[
        CalibrationMethod, typer.Option("--method", help="INT8 range calibration.")
    ] = CalibrationMethod.max,
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
        Quantizer,
        typer.Option(
            "--quantizer",
            help="auto: Model Optimizer if installed, else ONNX Runtime (int8) or onnxconverter (fp16).",
        ),
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
) -> None:
    """Add an INT8 (Q/DQ) or FP16 variant to a bundle; it is kept only if the accuracy gate passes."""
    require_export_extra(("onnx",))  # graphs are rewritten with onnx; torch is not needed
    bundle_dir = writable_model_path(bundle, "thzedge export quantize")
    settings = QuantizeSettings(
        precision=precision,
        method=method,
        samples=samples,
        keep_float=_split(keep_float),
        quantizer=quantizer,
    )
    data_dir, csv = _default_triplets(data, calibration, triplets)
    tol = _tolerances(
        max_triplet_drop, max_eer_rise, max_posture_drop, max_ssim_drop, max_psnr_drop, min_cosine
    )
    outcome = quantize_bundle(bundle_dir, calibration, settings, data_dir, csv, tol, target_far, profile)
    if global_options(ctx).json:
        typer.echo(
            json.dumps({"added": outcome.added, "report": outcome.report.to_dict()}, indent=2, default=str)
        )
    else:
        typer.echo(outcome.report.render())
        if outcome.added:
            typer.echo(f"added the {precision} variant to {bundle} (report: {precision}/gate_report.json)")
    if not outcome.added:
        raise GateFailedError(
            f"the {precision} variant failed the accuracy gate; it was not added to {bundle}"
        )


def check_command(
    ctx: typer.Context,
    bundle: Annotated[
        str, typer.Option("--bundle", help="Model bundle directory, or `demo` for the shipped demo model.")
    ],
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision", help=f"Variant to check against fp32: {_QUANTIZED}.", callback=_quantized_precision
        ),
    ],
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
) -> None:
    """Compare a bundle's variant with fp32 on held-out data; exit 1 if any line fails."""
    tol = _tolerances(
        max_triplet_drop, max_eer_rise, max_posture_drop, max_ssim_drop, max_psnr_drop, min_cosine
    )
    report = run_gate(
        model_path(bundle), precision.value, data, triplets, tol, target_far, speed_seconds=speed_seconds
    )
    as_json = global_options(ctx).json
    typer.echo(json.dumps(report.to_dict(), indent=2, default=str) if as_json else report.render())
    if not report.passed:
        raise GateFailedError(
            f"the {precision} variant of {bundle} fails the accuracy gate on {len(report.failures)} line(s)"
        )


def engine_command(
    ctx: typer.Context,
    bundle: Annotated[
        str, typer.Option("--bundle", help="Model bundle directory, or `demo` for the shipped demo model.")
    ],
    precision: Annotated[Precision, typer.Option("--precision", help="Engine precision.")] = Precision.fp16,
    max_batch: Annotated[
        int | None, typer.Option("--max-batch", help="Profile max (default: bundle's).")
    ] = None,
    workspace: Annotated[
        int | None,
        typer.Option(
            "--workspace",
            help="Builder workspace in MB (default: a quarter of the free memory on a Jetson, within "
            "256..2048; 1024 elsewhere).",
        ),
    ] = None,
    dla_core: Annotated[
        int | None, typer.Option("--dla-core", help="Build for this DLA core (Orin).")
    ] = None,
    engine_cache: Annotated[
        Path | None,
        typer.Option(
            "--engine-cache",
            help="Engine cache directory (default: the config's model.engine_cache, else "
            "$THZEDGE_ENGINE_CACHE, $STATE_DIRECTORY/engines, /var/lib/thzedge/engines).",
        ),
    ] = None,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune/--no-prune",
            help="Afterwards delete cached engines that neither this bundle nor the configured one needs.",
        ),
    ] = True,
) -> None:
    """Build one TensorRT engine per graph into this device's engine cache (the daemon never builds)."""
    bundle_dir = model_path(bundle)
    # The config names the cache and the bundle the daemon runs (kept when pruning).
    model_cfg = load_model_config(global_options(ctx).config)
    cache = resolve_engine_cache(engine_cache or model_cfg.engine_cache)
    # Fail at once, in one line, when TensorRT or the GPU is missing or the cache is not writable.
    trt = import_tensorrt()
    platform = current_platform(trt)
    cache.ensure_writable()
    b = Bundle.open(bundle_dir)
    settings = EngineSettings(
        precision=precision,
        max_batch=max_batch or b.max_batch,
        workspace_mb=workspace,
        dla_core=dla_core,
    ).with_workspace_for(platform)
    typer.echo(f"engine cache {cache.root} ({cache.source}); workspace {settings.workspace_mb} MB", err=True)
    manifests = build_bundle_engines(bundle_dir, settings, trt=trt, platform=platform, cache=cache)
    for m in manifests:
        typer.echo(
            f"{m['graph']:<10} {m['precision']}  TensorRT {m['tensorrt_version']}  {m['gpu_name']} "
            f"(sm {m['compute_capability']})  engine {m['engine_sha256'][:12]}"
        )
    if prune:
        keep = [b.path] + ([model_cfg.bundle] if model_cfg.bundle is not None else [])
        removed = prune_engine_cache(cache, platform, keep)
        if removed:
            typer.echo(f"pruned {len(removed)} file(s) no current bundle needs from {cache.root}", err=True)
