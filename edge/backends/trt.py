"""TensorRT backend: runs a bundle's prebuilt engines from the device's engine cache, after checking them.

Engines live in the engine cache (`edge/backends/engine_cache.py`), keyed by TensorRT version,
L4T release, GPU name and compute capability, DLA core, precision and the sha256 of the bundle's
ONNX, and are written there only by `thzedge export engine`. Before anything is deserialised,
every graph's manifest is checked against that key and the plan's size and sha256; a missing or
refused engine raises EngineMismatchError with a message saying what to do
(tensorrt-and-quantization.md §14), and `--backend auto` then falls back to ONNX Runtime with a
warning (edge/backends/__init__.py). Nothing here ever builds an engine (R-NEW-14).

I/O is by tensor name (`num_io_tensors`, `set_input_shape`, `set_tensor_address`,
`execute_async_v3`), the TensorRT 8.5+/10/11 runtime API. Device buffers go through a small
`DeviceMemory` interface with cuda-bindings and pycuda adapters (whichever imports). `tensorrt`
and the CUDA bindings are imported lazily here, so importing this module never needs them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge.backends import Backend
from edge.backends.engine_cache import (
    EngineCache,
    EngineKey,
    EngineMismatchError,
    Platform,
    graph_sha256,
    resolve_engine_cache,
    source_variant,
)
from edge.bundle import Bundle
from edge.jetson import read_l4t
from scanner_io.errors import MissingDependencyError, ThzEdgeError

__all__ = ["EngineMismatchError", "Platform", "TrtBackend", "can_run", "create", "current_platform"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Probing TensorRT and the GPU
# --------------------------------------------------------------------------------------------


def import_tensorrt() -> ModuleType:
    """Import tensorrt or raise MissingDependencyError saying what to install."""
    try:
        import tensorrt

        return tensorrt
    except Exception as exc:  # ImportError, or OSError from a missing libnvinfer
        raise MissingDependencyError(
            f"TensorRT is not available here ({type(exc).__name__}: {exc}); engines are built and run on "
            "the device: on Jetson use JetPack's python3-libnvinfer in a venv made with "
            "--system-site-packages"
        ) from None


def trt_generation(version: str) -> int:
    """Map a TensorRT version to the API generation thzedge drives: 8 (8.6), 10 or 11."""
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        raise MissingDependencyError(f"cannot read the TensorRT version {version!r}") from None
    if major == 8 and minor >= 6:
        return 8
    if major in (10, 11):
        return major
    if major > 11:
        log.warning("TensorRT %s is newer than thzedge knows; using the 11.x API", version)
        return 11
    raise MissingDependencyError(
        f"TensorRT {version} is not supported; thzedge needs 8.6, 10.x or 11.x (JetPack 6.0 or later)"
    )


def _cudart() -> Any | None:
    try:
        from cuda.bindings import runtime  # cuda-bindings >= 12.8

        return runtime
    except Exception:
        try:
            from cuda import cudart  # older cuda-python layout

            return cudart
        except Exception:
            return None


def _read_l4t() -> str | None:
    release = read_l4t(Path("/"))
    return str(release) if release is not None else None


def probe_gpu(device: int = 0) -> tuple[str, str, str | None]:
    """Return (GPU name, compute capability, CUDA runtime version) or raise MissingDependencyError."""
    cudart = _cudart()
    if cudart is not None:
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            raise MissingDependencyError(
                f"no CUDA GPU is visible (cudaGetDeviceCount: error {int(err)}); "
                "TensorRT needs the device's GPU"
            )
        err, props = cudart.cudaGetDeviceProperties(device)
        if int(err) != 0:
            raise MissingDependencyError(
                f"cannot query GPU {device} (cudaGetDeviceProperties: error {int(err)})"
            )
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        err, rt = cudart.cudaRuntimeGetVersion()
        rt_s = f"{rt // 1000}.{(rt % 1000) // 10}" if int(err) == 0 else None
        return name.strip("\x00 "), f"{props.major}.{props.minor}", rt_s
    try:
        import pycuda.driver as cuda
    except Exception:
        raise MissingDependencyError(
            "no CUDA Python bindings: pip install 'cuda-bindings==12.9.*' (JetPack 6) or 13.x "
            "(JetPack 7), or pycuda"
        ) from None
    try:
        cuda.init()
        dev = cuda.Device(device)
    except Exception as exc:
        raise MissingDependencyError(
            f"no CUDA GPU is visible ({exc}); TensorRT needs the device's GPU"
        ) from None
    major, minor = dev.compute_capability()
    return dev.name(), f"{major}.{minor}", ".".join(map(str, cuda.get_version()[:2]))


def current_platform(trt: ModuleType | None = None) -> Platform:
    """Probe the running TensorRT and GPU (MissingDependencyError when either is missing)."""
    trt = trt or import_tensorrt()
    name, cc, rt = probe_gpu()
    return Platform(str(trt.__version__), name, cc, rt, _read_l4t())


# --------------------------------------------------------------------------------------------
# Engines from the cache
# --------------------------------------------------------------------------------------------


def open_cache(engine_cache: EngineCache | Path | str | None) -> EngineCache:
    """The engine cache an option names (an EngineCache, a path, or None for the default)."""
    if isinstance(engine_cache, EngineCache):
        return engine_cache
    return resolve_engine_cache(engine_cache)


def verified_engines(
    bundle: Bundle,
    precision: str,
    platform: Platform,
    cache: EngineCache,
    generation: int,
    dla_core: int | None = None,
) -> dict[str, tuple[bytes, dict[str, Any]]]:
    """Read and check every graph's engine from the cache; EngineMismatchError naming the first problem."""
    fix = (
        f"build it on this device with `thzedge export engine --bundle {bundle.path} --precision {precision}`"
        + (f" --dla-core {dla_core}" if dla_core is not None else "")
        + " (the daemon never builds engines), or run with --backend ort"
    )
    variant = source_variant(bundle.precisions, precision, generation)
    if variant is None:
        raise EngineMismatchError(
            f"bundle {bundle.path} has no {precision} graphs for TensorRT {platform.tensorrt_version}; {fix}"
        )
    out: dict[str, tuple[bytes, dict[str, Any]]] = {}
    for graph in bundle.graphs:
        key = EngineKey.for_platform(platform, precision, graph_sha256(bundle, graph, variant), dla_core)
        out[graph] = cache.load(graph, key, fix)
    return out


# --------------------------------------------------------------------------------------------
# Device memory
# --------------------------------------------------------------------------------------------


class DeviceMemory:
    """Device allocations, copies and one stream; adapters below wrap cuda-bindings or pycuda."""

    def alloc(self, nbytes: int) -> int:
        """Allocate device memory; returns its address."""
        raise NotImplementedError

    def free(self, ptr: int) -> None:
        """Free an allocation."""
        raise NotImplementedError

    def htod(self, ptr: int, host: np.ndarray) -> None:
        """Copy a contiguous host array to device memory on the stream."""
        raise NotImplementedError

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        """Copy device memory into a contiguous host array on the stream."""
        raise NotImplementedError

    @property
    def stream_handle(self) -> int:
        """The CUDA stream handle given to execute_async_v3."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for the stream."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the stream."""


def _check(result: Any, what: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise ThzEdgeError(f"CUDA {what} failed with error {int(err)}")
    return rest[0] if len(rest) == 1 else rest


class CudaBindingsMemory(DeviceMemory):
    """Device memory through NVIDIA's cuda-bindings runtime API (installs as a binary wheel everywhere)."""

    def __init__(self, cudart: Any) -> None:
        self._rt = cudart
        self._stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def alloc(self, nbytes: int) -> int:
        return int(_check(self._rt.cudaMalloc(max(1, nbytes)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._rt.cudaFree(ptr)

    def htod(self, ptr: int, host: np.ndarray) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(
            self._rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self._stream), "memcpy HtoD"
        )

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(
            self._rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self._stream), "memcpy DtoH"
        )

    @property
    def stream_handle(self) -> int:
        return int(self._stream)

    def synchronize(self) -> None:
        _check(self._rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        self._rt.cudaStreamDestroy(self._stream)


class PycudaMemory(DeviceMemory):  # pragma: no cover - needs a GPU; same calls as TensorRT's samples
    """Device memory through pycuda (the classic TensorRT sample pattern)."""

    def __init__(self) -> None:
        import pycuda.autoinit  # noqa: F401  - creates the context
        import pycuda.driver as cuda

        self._cuda = cuda
        self._stream = cuda.Stream()
        self._allocs: dict[int, Any] = {}

    def alloc(self, nbytes: int) -> int:
        a = self._cuda.mem_alloc(max(1, nbytes))
        self._allocs[int(a)] = a
        return int(a)

    def free(self, ptr: int) -> None:
        a = self._allocs.pop(ptr, None)
        if a is not None:
            a.free()

    def htod(self, ptr: int, host: np.ndarray) -> None:
        self._cuda.memcpy_htod_async(ptr, host, self._stream)

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        self._cuda.memcpy_dtoh_async(host, ptr, self._stream)

    @property
    def stream_handle(self) -> int:
        return int(self._stream.handle)

    def synchronize(self) -> None:
        self._stream.synchronize()


def default_device_memory() -> DeviceMemory:
    """cuda-bindings when it imports, else pycuda; MissingDependencyError when neither does."""
    cudart = _cudart()
    if cudart is not None:
        return CudaBindingsMemory(cudart)
    try:
        return PycudaMemory()
    except ImportError:
        raise MissingDependencyError(
            "no CUDA Python bindings: pip install 'cuda-bindings==12.9.*' (JetPack 6) or 13.x "
            "(JetPack 7), or pycuda"
        ) from None


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class _Engine:
    """One deserialised engine + execution context with device buffers sized for max batch."""

    def __init__(
        self, trt: ModuleType, runtime: Any, plan: bytes, mem: DeviceMemory, max_batch: int, name: str
    ):
        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineMismatchError(
                f"TensorRT refused to deserialise the {name} engine (see its log above); rebuild it on this "
                "device with `thzedge export engine`"
            )
        self.context = self.engine.create_execution_context()
        self.mem = mem
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.dtypes: dict[str, np.dtype] = {}
        self.ptrs: dict[str, int] = {}
        self.capacity: dict[str, int] = {}
        for i in range(self.engine.num_io_tensors):
            tname = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(tname)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs).append(tname)
            self.dtypes[tname] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(tname)))
            shape = [max_batch if d < 0 else d for d in self.engine.get_tensor_shape(tname)]
            nbytes = int(np.prod(shape)) * self.dtypes[tname].itemsize
            self.ptrs[tname] = mem.alloc(nbytes)
            self.capacity[tname] = nbytes
            self.context.set_tensor_address(tname, self.ptrs[tname])

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for tname in self.inputs:
            arr = np.ascontiguousarray(feeds[tname], dtype=self.dtypes[tname])
            if arr.nbytes > self.capacity[tname]:
                raise ThzEdgeError(f"input {tname} of {arr.nbytes} bytes exceeds the engine's max batch")
            if not self.context.set_input_shape(tname, tuple(arr.shape)):
                raise ThzEdgeError(
                    f"input shape {list(arr.shape)} of {tname} is outside the engine's profile"
                )
            self.mem.htod(self.ptrs[tname], arr)
        results: dict[str, np.ndarray] = {}
        for tname in self.outputs:
            shape = tuple(self.context.get_tensor_shape(tname))
            results[tname] = np.empty(shape, dtype=self.dtypes[tname])
        if not self.context.execute_async_v3(self.mem.stream_handle):
            raise ThzEdgeError("TensorRT execute_async_v3 failed (see its log)")
        for tname, host in results.items():
            self.mem.dtoh(host, self.ptrs[tname])
        self.mem.synchronize()
        return {k: v.astype(np.float32, copy=False) for k, v in results.items()}

    def close(self) -> None:
        for ptr in self.ptrs.values():
            self.mem.free(ptr)
        self.ptrs.clear()
        self.context = None
        self.engine = None


class TrtBackend(Backend):
    """Runs a bundle's TensorRT engines (one per graph), refusing engines built for another device."""

    name = "trt"

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "fp32",
        trt: ModuleType | None = None,
        platform: Platform | None = None,
        memory: DeviceMemory | None = None,
        engine_cache: EngineCache | Path | str | None = None,
        dla_core: int | None = None,
        **_ignored: Any,
    ) -> None:
        precision_variant = precision if precision in bundle.precisions else "fp32"
        super().__init__(bundle, precision_variant)
        self.precision = precision
        trt = trt or import_tensorrt()
        generation = trt_generation(str(trt.__version__))
        platform = platform or current_platform(trt)
        self.cache = open_cache(engine_cache)
        # Checked before deserialising anything: a mismatched plan must never reach TensorRT.
        engines = verified_engines(bundle, precision, platform, self.cache, generation, dla_core)
        self.platform = platform
        self.dla_core = dla_core
        self._mem = memory or default_device_memory()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engines: dict[str, _Engine] = {}
        self.engine_sha256: dict[str, str] = {}
        try:
            for graph, (plan, manifest) in engines.items():
                limit = int(manifest.get("max_batch", bundle.max_batch))
                self.max_batch = min(self.max_batch, limit)
                self._engines[graph] = _Engine(trt, self._runtime, plan, self._mem, limit, graph)
                self.engine_sha256[graph] = str(manifest.get("engine_sha256"))
        except BaseException:
            self._close()
            raise

    def _infer(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._engines[graph].run(feeds)

    def _close(self) -> None:
        for e in self._engines.values():
            e.close()
        self._engines.clear()
        self._mem.close()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "precision": self.precision,
            "tensorrt": self.platform.tensorrt_version,
            "gpu": self.platform.gpu_name,
            "engine_cache": str(self.cache.root),
            "engine_sha256": dict(self.engine_sha256),
        }


def can_run(bundle: Bundle, precision: str = "fp32", **options: Any) -> bool:
    """Whether the engine cache holds an engine of any of this bundle's graphs, so `auto` should try TensorRT.

    Only a manifest check, for any TensorRT and GPU: `create` verifies the engines against this
    platform (reading and hashing every plan once, not twice), and `create_backend` falls back to
    ONNX Runtime with a warning when it refuses them — at every start while one graph's engine is
    missing or stale, not only the first. No engine of this bundle at all: ONNX Runtime, quietly.
    """
    cache = open_cache(options.get("engine_cache"))
    variants = [v for v in dict.fromkeys((precision, "fp32")) if v in bundle.precisions]
    return any(
        cache.has_any(graph, precision, graph_sha256(bundle, graph, v))
        for graph in bundle.graphs
        for v in variants
    )


def create(bundle: Bundle, precision: str = "fp32", **options: Any) -> TrtBackend:
    """Build the TensorRT backend (the factory `edge.backends.create_backend` calls)."""
    return TrtBackend(bundle, precision, **options)
