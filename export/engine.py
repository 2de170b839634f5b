"""Build TensorRT engines from a bundle's ONNX graphs, on the device, with the installed TensorRT's API.

One engine per graph (encoder, one decoder per posture) and precision, an optimisation profile
of batch 1..max, a timing cache kept per GPU and TensorRT version, and a manifest per engine
(TensorRT version, L4T, GPU, compute capability, DLA core, profile shapes, source ONNX sha256,
engine size and sha256) that the `trt` backend checks before it deserialises anything. Engines
and timing caches go to the device's engine cache (`edge/backends/engine_cache.py`), never into
the bundle; the cache is locked while building and checked writable before the first graph.
Progress is reported per graph (`export/build_progress.py`); `prune_engine_cache` removes what
no current bundle needs.

Per TensorRT generation (reference §2, §9; docs/quantization.md):
- 8.6:  create_network(1 << EXPLICIT_BATCH); FP16 flag for fp16; INT8 (+FP16) flags on the Q/DQ graph.
- 10.x: create_network(0); same flags (weakly typed), the Q/DQ / fp16 ONNX carries the precision.
- 11.x: create_network(); no precision flags exist; the fp16 (AutoCast/float16) or Q/DQ ONNX is the
        precision, so those variants must be in the bundle first (`thzedge export quantize`).

`tensorrt` and the CUDA bindings are imported lazily, only here and in `edge/backends/trt.py`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from edge import __version__
from edge.backends.engine_cache import (
    EngineCache,
    EngineKey,
    Platform,
    graph_sha256,
    source_variant,
    write_atomic,
)
from edge.backends.trt import current_platform, import_tensorrt, open_cache, trt_generation
from edge.bundle import Bundle, Precision
from export.build_progress import BuildProgress, default_workspace_mb
from scanner_io.errors import EXIT_DATA, BundleError, ThzEdgeError

log = logging.getLogger(__name__)

__all__ = [
    "EngineSettings",
    "Platform",
    "build_bundle_engines",
    "build_engine_from_onnx",
    "prune_engine_cache",
]


class EngineBuildError(ThzEdgeError):
    """The bundle's graphs cannot become an engine with this TensorRT (exit 65: the bundle must change)."""

    exit_code = EXIT_DATA


@dataclass(frozen=True)
class EngineSettings:
    """What fixes an engine build (recorded in the engine manifest)."""

    precision: Precision = Precision.fp16
    max_batch: int = 8
    opt_batch: int | None = None  # default: max_batch (the daemon batches what is queued)
    # None: capped from the memory free on a Jetson, else 1024 (export/build_progress.py).
    workspace_mb: int | None = None
    dla_core: int | None = None
    optimization_level: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision, "precision"))
        if self.max_batch < 1:
            raise ThzEdgeError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise ThzEdgeError(f"--workspace must be >= 1 MB, got {self.workspace_mb}")
        if self.dla_core is not None and self.precision == "fp32":
            raise ThzEdgeError("DLA runs fp16 or int8 only; use --precision fp16 or int8 with --dla-core")

    @property
    def opt(self) -> int:
        return self.opt_batch or self.max_batch

    def with_workspace_for(self, platform: Platform, meminfo: Path | None = None) -> EngineSettings:
        """These settings with the workspace filled in for this device when it was left open."""
        if self.workspace_mb is not None:
            return self
        mb = default_workspace_mb(platform.l4t is not None, meminfo)
        return dataclasses.replace(self, workspace_mb=mb)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _onnx_inputs(onnx_path: Path) -> list[tuple[str, list[int | str]]]:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    out = []
    for i in m.graph.input:
        if i.name in inits:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "N")
            for d in i.type.tensor_type.shape.dim
        ]
        out.append((i.name, dims))
    return out


def _onnx_opset(onnx_path: Path) -> int:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)


def profile_shapes(onnx_path: Path, settings: EngineSettings) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min/opt/max shape per input: batch 1 / opt / max, the other dims as the ONNX fixes them."""
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    for name, dims in _onnx_inputs(onnx_path):
        rest = dims[1:]
        if any(not isinstance(d, int) or d <= 0 for d in rest):
            raise EngineBuildError(f"{onnx_path.name}: input {name} has dynamic non-batch dims {dims}")
        rest_t = tuple(int(d) for d in rest)
        shapes[name] = ((1, *rest_t), (settings.opt, *rest_t), (settings.max_batch, *rest_t))
    return shapes


def build_engine_from_onnx(
    trt: ModuleType,
    onnx_path: Path,
    settings: EngineSettings,
    generation: int,
    onnx_precision: str,
    timing_cache: bytes | None = None,
) -> tuple[bytes, bytes | None, dict[str, Any]]:
    """Parse one ONNX and build a serialized engine; returns (plan, timing cache, build facts)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if generation == 8:
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    elif generation == 10:
        network = builder.create_network(0)
    else:
        network = builder.create_network()
    parser = trt.OnnxParser(network, logger)
    if settings.dla_core is not None and generation >= 11 and hasattr(trt, "OnnxParserFlag"):
        parser.set_flag(trt.OnnxParserFlag.ADJUST_FOR_DLA)
    # parse_from_file resolves external weight files next to the ONNX.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(
            f"TensorRT could not parse {onnx_path.name}: {'; '.join(errors) or 'no detail'}"
        )
    config = builder.create_builder_config()
    workspace_mb = settings.workspace_mb or default_workspace_mb(False)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = settings.optimization_level
    flags: list[str] = []
    if generation < 11:
        # 8.6 / 10.x weakly typed: the flags allow the lower precision; the fp16 / Q/DQ ONNX
        # already fixes what must be low precision. FP16 with INT8 lets non-quantized layers
        # (Sigmoid, the embedding head kept float) run in fp16 instead of fp32.
        if settings.precision in ("fp16", "int8"):
            flags.append("FP16")
        if settings.precision == "int8":
            flags.append("INT8")
    elif settings.precision != onnx_precision:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} takes precision from the graph only; the bundle needs a "
            f"{settings.precision} variant: run `thzedge export quantize --precision "
            f"{settings.precision}` first"
        )
    if settings.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(settings.dla_core)
        flags.append("GPU_FALLBACK")
    for f in flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    profile = builder.create_optimization_profile()
    shapes = profile_shapes(onnx_path, settings)
    for name, (mn, opt, mx) in shapes.items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(
            f"TensorRT failed to build {onnx_path.name} ({settings.precision}); rerun with --log-level debug "
            "and read TensorRT's log above"
        )
    cache_out = config.get_timing_cache()
    cache_bytes = bytes(cache_out.serialize()) if cache_out is not None else None
    facts = {
        "api_generation": generation,
        "strongly_typed": generation >= 11,
        "builder_flags": flags,
        "profile": {n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in shapes.items()},
        "io": _network_io(network),
    }
    return bytes(plan), cache_bytes, facts


def _network_io(network: Any) -> list[dict[str, Any]]:
    io = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        io.append({"name": t.name, "mode": "input", "dtype": str(t.dtype), "shape": list(t.shape)})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io.append({"name": t.name, "mode": "output", "dtype": str(t.dtype), "shape": list(t.shape)})
    return io


def build_bundle_engines(
    bundle_path: Path,
    settings: EngineSettings,
    trt: ModuleType | None = None,
    platform: Platform | None = None,
    cache: EngineCache | Path | str | None = None,
    progress: BuildProgress | None = None,
) -> list[dict[str, Any]]:
    """Build an engine per graph of a bundle at one precision into the engine cache; returns the manifests."""
    trt = trt or import_tensorrt()
    generation = trt_generation(str(trt.__version__))
    platform = platform or current_platform(trt)
    settings = settings.with_workspace_for(platform)
    bundle = Bundle.open(bundle_path)
    variant = source_variant(bundle.precisions, settings.precision, generation)
    if variant is None:
        raise EngineBuildError(
            f"the bundle has no {settings.precision} variant (it has {', '.join(bundle.precisions)}); run "
            f"`thzedge export quantize --bundle {bundle.path} --precision {settings.precision}` first"
        )
    graphs = list(bundle.variant(variant)["graphs"])
    cache = open_cache(cache)
    progress = progress or BuildProgress(len(graphs), settings.precision)
    manifests = []
    # The lock also proves the cache writable before minutes of building (jetson-inference 1031).
    with cache.lock():
        timing_path = cache.timing_cache_path(platform)
        timing = timing_path.read_bytes() if timing_path.is_file() else None
        for graph in graphs:
            onnx_path = bundle.graph_file(graph, variant)
            key = EngineKey.for_platform(
                platform, settings.precision, graph_sha256(bundle, graph, variant), settings.dla_core
            )
            log.info("building %s engine for %s from %s", settings.precision, graph, onnx_path.name)
            with progress.step(graph):
                plan, timing_new, facts = build_engine_from_onnx(
                    trt, onnx_path, settings, generation, variant, timing
                )
            if timing_new:
                timing = timing_new
                write_atomic(timing_path, timing_new)
            manifest = {
                "onnx_variant": variant,
                "onnx_file": str(onnx_path.relative_to(bundle.path)),
                "onnx_opset": _onnx_opset(onnx_path),
                "bundle_sha256": bundle.sha256,
                "bundle_path": str(bundle.path),
                "cuda_runtime_version": platform.cuda_runtime_version,
                "max_batch": settings.max_batch,
                "opt_batch": settings.opt,
                "workspace_mb": settings.workspace_mb,
                "optimization_level": settings.optimization_level,
                "version_compatible": False,
                "timing_cache": {"file": str(timing_path.relative_to(cache.root)),
                                 "sha256": sha256_bytes(timing) if timing else None},
                "thzedge_version": __version__,
                "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **facts,
            }  # fmt: skip
            gate = bundle.variant(variant).get("gate")
            if isinstance(gate, Mapping):
                manifest["gate"] = {"passed": gate.get("passed"), "report": gate.get("report")}
            manifests.append(cache.store(graph, key, plan, manifest))
    progress.finish()
    return manifests


def prune_engine_cache(
    cache: EngineCache | Path | str | None, platform: Platform, bundles: Iterable[Path | Bundle]
) -> list[Path]:
    """Delete cache entries no bundle in `bundles` needs on this platform; returns the files removed.

    Needed: an engine of one of those bundles' graphs (any variant, precision or DLA core) built
    for this TensorRT, L4T and GPU. Everything else can never load here again (superseded after
    an upgrade or a re-export, innate-inc/innate-os PR 447), nor can leftover temp files, plans
    whose manifest was never written, or timing caches of other TensorRT versions.
    """
    cache = open_cache(cache)
    shas: set[str] = set()
    for b in bundles:
        try:
            bundle = b if isinstance(b, Bundle) else Bundle.open(b)
        except BundleError as exc:
            log.warning("engine cache: not keeping engines of %s (%s)", b, exc)
            continue
        for variant in bundle.precisions:
            shas |= {graph_sha256(bundle, g, variant) for g in bundle.variant(variant)["graphs"]}
    fields = ("tensorrt_version", "l4t", "gpu_name", "compute_capability")
    here = {f: getattr(platform, f) for f in fields}
    keep = [
        e.name
        for e in cache.entries()
        if e.manifest.get("onnx_sha256") in shas and all(e.manifest.get(f) == here[f] for f in fields)
    ]
    with cache.lock():
        return cache.prune(keep, [cache.timing_cache_path(platform)])
