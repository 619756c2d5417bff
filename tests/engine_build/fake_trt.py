"""A stand-in for the few TensorRT and pycuda calls engine_build makes, backed by ONNX Runtime.

TensorRT and pycuda cannot be installed here and no GPU is attached. With this fake the tests run OUR
code around them: settings -> builder-config calls, the staged engine write and the parity gate of
``build_engine``, and the runner's buffer handling (page-locked host buffers, device buffers,
``set_input_shape`` per chunk, copies back) and its release on ``deactivate``. It proves that plumbing,
NOT that TensorRT accepts the calls: that is what mypy against ``tensorrt-stubs`` and the ``@gpu``
tests on a device are for.

A fake "engine" is JSON ``{"onnx": path, "profile": [min, opt, max], "offset": x}``; executing it runs
the ONNX file with ONNX Runtime on the bytes in fake device memory and adds ``offset`` to the outputs
(a "miscompiled" engine for the parity tests). Only the calls engine_build makes exist here.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest


@dataclass
class FakeState:
    """What the fakes recorded; knobs that change their behaviour."""

    version: str = "10.3.0"
    gpu_name: str = "Orin"
    capability: tuple[int, int] = (8, 7)
    offset: float = 0.0  # added to every output of engines built from now on
    fail_build: bool = False  # build_serialized_network returns None
    memory: dict[int, np.ndarray] = field(default_factory=dict)  # device address -> bytes
    next_address: int = 0x1000
    freed: int = 0
    pinned: int = 0
    ctx_depth: int = 0
    ctx_retained: int = 0
    ctx_detached: int = 0
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    executions: list[int] = field(default_factory=list)  # batch size of each execute_async_v3


def make_tensorrt(state: FakeState) -> types.ModuleType:
    """The fake ``tensorrt`` module."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = state.version  # type: ignore[attr-defined]

    class ILogger:
        Severity = int
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class Tensor:
        def __init__(self, name: str, shape: tuple[int, ...]) -> None:
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.inputs, self.onnx = flags, [], ""
            self.num_outputs, self.num_layers = 2, 7

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Any) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            for inp in onnx.load(path).graph.input:
                dims = tuple(
                    d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim
                )
                self.network.inputs.append(Tensor(inp.name, dims))
            self.network.onnx = path
            return True

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, list[list[int]]] = {}

        def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
            self.shapes[name] = [list(low), list(opt), list(high)]

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data + b"+tuned"

    class Config:
        def __init__(self) -> None:
            self.profiles: list[Profile] = []
            self.builder_optimization_level = 3
            self.progress_monitor: Any = None
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            state.calls.append(("set_memory_pool_limit", pool, size))

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            assert self.cache is not None
            return self.cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            state.calls.append(("build", network.flags, config.builder_optimization_level))
            if config.progress_monitor is not None:
                config.progress_monitor.phase_start("Building", None, 2)
                config.progress_monitor.step_complete("Building", 0)
                config.progress_monitor.phase_finish("Building")
            if state.fail_build:
                return None
            plan = {
                "onnx": network.onnx,
                "profile": config.profiles[0].shapes["image"],
                "offset": state.offset,
            }
            return json.dumps(plan).encode()

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine, self.batch, self.address = engine, 0, {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            low, _, high = self.engine.plan["profile"]
            if name != "image" or not low[0] <= shape[0] <= high[0] or list(shape[1:]) != high[1:]:
                return False
            self.batch = shape[0]
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            _, h, w, _ = self.engine.plan["profile"][2]
            return {
                "image": (self.batch, h, w, 3),
                "anomaly_map": (self.batch, 1, h, w),
                "score": (self.batch,),
            }[name]

        def set_tensor_address(self, name: str, address: int) -> bool:
            self.address[name] = address
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            state.executions.append(self.batch)
            shape = self.get_tensor_shape("image")
            x = state.memory[self.address["image"]][: int(np.prod(shape))].reshape(shape)
            amap, score = self.engine.session.run(["anomaly_map", "score"], {"image": x})
            for name, value in (("anomaly_map", amap), ("score", score)):
                raw = (value + self.engine.plan["offset"]).astype(np.float32).reshape(-1).view(np.uint8)
                state.memory[self.address[name]][: raw.size] = raw
            return True

    class Engine:
        num_io_tensors = 3
        names = ("image", "anomaly_map", "score")

        def __init__(self, plan: dict[str, Any]) -> None:
            self.plan = plan
            self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> str:
            return TensorIOMode.INPUT if name == "image" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> type:
            return np.uint8 if name == "image" else np.float32

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
            return [tuple(s) for s in self.plan["profile"]]

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            try:
                return Engine(json.loads(data))
            except ValueError:
                return None

    for obj in (
        ILogger,
        IProgressMonitor,
        NetworkDefinitionCreationFlag,
        MemoryPoolType,
        TensorIOMode,
        OnnxParser,
        Builder,
        Runtime,
    ):
        setattr(trt, obj.__name__, obj)
    trt.Dims = tuple  # type: ignore[attr-defined]
    trt.nptype = lambda t: t  # type: ignore[attr-defined]
    return trt


def make_pycuda_driver(state: FakeState) -> types.ModuleType:
    """The fake ``pycuda.driver`` module: device memory is a dict of numpy byte arrays."""
    cuda = types.ModuleType("pycuda.driver")

    class PrimaryContext:
        def push(self) -> None:
            state.ctx_depth += 1

        def detach(self) -> None:
            state.ctx_detached += 1

    class Context:
        @staticmethod
        def pop() -> None:
            assert state.ctx_depth > 0, "pop without push"
            state.ctx_depth -= 1

    class Device:
        def __init__(self, index: int) -> None:
            self.index = index

        @staticmethod
        def count() -> int:
            return 1

        def name(self) -> str:
            return state.gpu_name

        def compute_capability(self) -> tuple[int, int]:
            return state.capability

        def retain_primary_context(self) -> PrimaryContext:
            state.ctx_retained += 1
            return PrimaryContext()

    class Stream:
        handle = 7

        def synchronize(self) -> None:
            pass

    class Allocation:
        def __init__(self, nbytes: int) -> None:
            self.address = state.next_address
            state.next_address += nbytes + 256
            state.memory[self.address] = np.zeros(nbytes, np.uint8)

        def __int__(self) -> int:
            return self.address

        def free(self) -> None:
            del state.memory[self.address]
            state.freed += 1

    def pagelocked_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        state.pinned += 1
        return np.empty(shape, dtype)

    def memcpy_htod_async(dest: Allocation, src: np.ndarray, stream: Stream) -> None:
        assert state.ctx_depth > 0, "CUDA call without a current context"
        raw = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
        state.memory[int(dest)][: raw.size] = raw

    def memcpy_dtoh_async(dest: np.ndarray, src: Allocation, stream: Stream) -> None:
        assert state.ctx_depth > 0, "CUDA call without a current context"
        assert dest.flags.c_contiguous
        dest.reshape(-1).view(np.uint8)[:] = state.memory[int(src)][: dest.nbytes]

    cuda.init = lambda: None  # type: ignore[attr-defined]
    cuda.mem_alloc = Allocation  # type: ignore[attr-defined]
    for obj in (Context, Device, Stream, pagelocked_empty, memcpy_htod_async, memcpy_dtoh_async):
        setattr(cuda, obj.__name__, obj)
    return cuda


def install(monkeypatch: pytest.MonkeyPatch, state: FakeState | None = None) -> FakeState:
    """Put the fakes in ``sys.modules`` for one test (and reset the cached TensorRT logger)."""
    import engine_build.util

    state = state or FakeState()
    driver = make_pycuda_driver(state)
    package = types.ModuleType("pycuda")
    package.driver = driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(state))
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setattr(engine_build.util, "_trt_logger", None)
    return state
