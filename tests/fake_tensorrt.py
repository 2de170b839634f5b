"""A fake `tensorrt` module and fake device memory, for wiring tests of the builder and the trt backend.

It records every builder call (network flags, builder flags, profile shapes, workspace, timing
cache) and mimics the API differences between TensorRT 8.6, 10.x and 11.x that thzedge branches
on: 8.6 needs EXPLICIT_BATCH, 11.x has no FP16/INT8 builder flags. A "plan" is a magic prefix
plus the ONNX bytes; the fake runtime runs it with ONNX Runtime on the fake device memory, so
a test can compare the trt backend's outputs with the ort backend's. It checks nothing about
TensorRT numerics, kernels or performance (that needs the device; see tests marked `gpu`).
"""

from __future__ import annotations

import enum
import itertools
import types
from typing import Any

import numpy as np

MAGIC = b"FAKEPLAN1\n"


class FakeDeviceMemory:
    """Device memory as host byte buffers keyed by fake addresses; a no-op stream."""

    def __init__(self) -> None:
        self.buffers: dict[int, bytearray] = {}
        self._next = itertools.count(0x1000, 0x1000)
        self.freed: list[int] = []
        self.closed = False

    def alloc(self, nbytes: int) -> int:
        ptr = next(self._next)
        self.buffers[ptr] = bytearray(max(1, nbytes))
        return ptr

    def free(self, ptr: int) -> None:
        self.buffers.pop(ptr)
        self.freed.append(ptr)

    def htod(self, ptr: int, host: np.ndarray) -> None:
        self.buffers[ptr][: host.nbytes] = host.tobytes()

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        host.reshape(-1).view(np.uint8)[:] = np.frombuffer(bytes(self.buffers[ptr][: host.nbytes]), np.uint8)

    @property
    def stream_handle(self) -> int:
        return 7

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def make_fake_tensorrt(version: str = "10.3.0", memory: FakeDeviceMemory | None = None) -> types.ModuleType:
    """Build a fake `tensorrt` module of the given version; `memory` backs the fake runtime."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []  # (what, args) in call order
    trt.deserialized = 0
    memory = memory or FakeDeviceMemory()
    trt.memory = memory

    class Severity(enum.IntEnum):
        ERROR = 1
        WARNING = 2
        INFO = 3

    class Logger:
        ERROR, WARNING, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO

        def __init__(self, severity: Any = Severity.WARNING) -> None:
            self.severity = severity

    trt.Logger = Logger
    flag_names = ["GPU_FALLBACK", "REFIT", "TF32", "DISABLE_TIMING_CACHE", "VERSION_COMPATIBLE"]
    if major < 11:
        flag_names += ["FP16", "INT8"]
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flag_names)
    ncf = ["STRONGLY_TYPED"] if major >= 10 else []
    if major < 11:
        ncf.insert(0, "EXPLICIT_BATCH")
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", ncf)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM"])
    trt.DeviceType = enum.IntEnum("DeviceType", ["GPU", "DLA"])
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    trt.DataType = enum.IntEnum("DataType", ["FLOAT", "HALF", "INT8", "INT32"])
    trt.OnnxParserFlag = enum.IntEnum("OnnxParserFlag", ["NATIVE_INSTANCENORM", "ADJUST_FOR_DLA"])

    def nptype(dt: Any) -> type:
        return {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16}[dt]

    trt.nptype = nptype

    class Tensor:
        def __init__(self, name: str, shape: list[int]) -> None:
            self.name, self.shape, self.dtype = name, shape, trt.DataType.FLOAT

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.onnx: bytes | None = None
            self.ins: list[Tensor] = []
            self.outs: list[Tensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self.ins)

        @property
        def num_outputs(self) -> int:
            return len(self.outs)

        def get_input(self, i: int) -> Tensor:
            return self.ins[i]

        def get_output(self, i: int) -> Tensor:
            return self.outs[i]

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network
            self.flags: list[Any] = []
            self.num_errors = 0

        def set_flag(self, flag: Any) -> None:
            self.flags.append(flag)
            trt.calls.append(("parser.set_flag", flag.name))

        def parse_from_file(self, path: str) -> bool:
            import onnx

            trt.calls.append(("parse_from_file", path))
            with open(path, "rb") as fh:
                self.network.onnx = fh.read()
            m = onnx.load_from_string(self.network.onnx)
            inits = {i.name for i in m.graph.initializer}

            def dims(vi: Any) -> list[int]:
                return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]

            self.network.ins = [Tensor(i.name, dims(i)) for i in m.graph.input if i.name not in inits]
            self.network.outs = [Tensor(o.name, dims(o)) for o in m.graph.output]
            return True

        def get_error(self, i: int) -> str:
            return "fake error"

    trt.OnnxParser = OnnxParser

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        def set_shape(self, name: str, mn: Any, opt: Any, mx: Any) -> None:
            self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

    class TimingCache:
        def __init__(self, blob: bytes) -> None:
            self.blob = blob

        def serialize(self) -> bytes:
            return self.blob + b"+"

    class Config:
        def __init__(self) -> None:
            self.flags: list[str] = []
            self.pools: dict[str, int] = {}
            self.profiles: list[Profile] = []
            self.cache: TimingCache | None = None
            self.default_device_type = trt.DeviceType.GPU
            self.DLA_core = -1
            self.builder_optimization_level = 3

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pools[pool.name] = size

        def set_flag(self, flag: Any) -> None:
            self.flags.append(flag.name)

        def add_optimization_profile(self, p: Profile) -> int:
            self.profiles.append(p)
            return len(self.profiles) - 1

        def create_timing_cache(self, blob: bytes) -> TimingCache:
            trt.calls.append(("create_timing_cache", bytes(blob)))
            return TimingCache(bytes(blob))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, *args: int) -> Network:
            if major == 8 and (
                not args or not args[0] & (1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
            ):
                raise TypeError("TensorRT 8.6 fake: implicit-batch networks are not supported by thzedge")
            if major >= 11 and args and args[0] != 0:
                # Real 11.x ignores STRONGLY_TYPED; any other bit would be a misuse.
                pass
            trt.calls.append(("create_network", args))
            return Network(args[0] if args else 0)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            facts = {
                "flags": list(config.flags),
                "pools": dict(config.pools),
                "profiles": [p.shapes for p in config.profiles],
                "dla": (config.default_device_type.name, config.DLA_core),
            }
            trt.calls.append(("build", facts))
            assert network.onnx is not None
            return MAGIC + network.onnx

    trt.Builder = Builder

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.addresses: dict[str, int] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            if shape[0] < 1 or shape[0] > self.engine.max_batch:
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if name in self.shapes:
                return self.shapes[name]
            batch = next(iter(self.shapes.values()))[0]
            return tuple(batch if d < 0 else d for d in self.engine.shapes[name])

        def execute_async_v3(self, stream: int) -> bool:
            feeds = {}
            for name in self.engine.inputs:
                shape = self.shapes[name]
                n = int(np.prod(shape)) * 4
                feeds[name] = np.frombuffer(
                    bytes(memory.buffers[self.addresses[name]][:n]), np.float32
                ).reshape(shape)
            outs = self.engine.session.run(self.engine.outputs, feeds)
            for name, arr in zip(self.engine.outputs, outs, strict=True):
                memory.htod(self.addresses[name], np.ascontiguousarray(arr, dtype=np.float32))
            return True

    class Engine:
        def __init__(self, onnx_bytes: bytes, max_batch: int) -> None:
            import onnx
            import onnxruntime as ort

            m = onnx.load_from_string(onnx_bytes)
            inits = {i.name for i in m.graph.initializer}

            def dims(vi: Any) -> list[int]:
                return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]

            self.inputs = [i.name for i in m.graph.input if i.name not in inits]
            self.outputs = [o.name for o in m.graph.output]
            self.shapes = {i.name: dims(i) for i in m.graph.input} | {o.name: dims(o) for o in m.graph.output}
            self.max_batch = max_batch
            so = ort.SessionOptions()
            so.log_severity_level = 3
            self.session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
            # Exporters may leave output dims symbolic; TensorRT resolves them at build time, so
            # the fake resolves them once with a batch-1 run and keeps only the batch dynamic.
            probe = {i: np.zeros([1, *self.shapes[i][1:]], np.float32) for i in self.inputs}
            for name, arr in zip(self.outputs, self.session.run(self.outputs, probe), strict=True):
                self.shapes[name] = [-1, *arr.shape[1:]]

        @property
        def num_io_tensors(self) -> int:
            return len(self.inputs) + len(self.outputs)

        def get_tensor_name(self, i: int) -> str:
            return (self.inputs + self.outputs)[i]

        def get_tensor_mode(self, name: str) -> Any:
            return trt.TensorIOMode.INPUT if name in self.inputs else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> Any:
            return trt.DataType.FLOAT

        def get_tensor_shape(self, name: str) -> list[int]:
            return list(self.shapes[name])

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        max_batch = 4

        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            trt.deserialized += 1
            if not plan.startswith(MAGIC):
                return None  # what real TensorRT does on a foreign plan (and logs why)
            return Engine(plan[len(MAGIC) :], Runtime.max_batch)

    trt.Runtime = Runtime
    return trt
