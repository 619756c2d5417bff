"""The TensorRT runtime used by the agent: :class:`TensorRTRunner`, same interface as ONNX Runtime's.

One engine, one execution context, one CUDA stream, page-locked host buffers and device buffers
(pycuda) sized for the engine's largest batch, allocated by :meth:`~fod.runner.Runner.activate` and all
released by :meth:`~fod.runner.Runner.deactivate`. I/O tensors are bound by name (TensorRT 10 API:
``set_tensor_address`` / ``set_input_shape`` / ``execute_async_v3``). Batches larger than the engine's
optimisation profile allows are split. CUDA work runs in the device's primary context (the one the
TensorRT runtime uses), pushed for each call, so any thread may call :meth:`infer`.

:func:`tensorrt_available` tells, without raising, whether this box can run engines at all.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine_build.errors import EngineBuildError, EngineMismatchError, TensorRTUnavailableError
from engine_build.manifest import EngineManifest, current_runtime, load_engine_manifest, rebuild_command
from engine_build.steps import INPUT_NAME
from engine_build.util import dims_to_tuple, gpu_info, require_pycuda, require_tensorrt, trt_logger
from fod.errors import FodError
from fod.runner import Runner

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger("engine_build.runner")

OUTPUT_NAMES = ("anomaly_map", "score")


def tensorrt_available(device: int = 0) -> tuple[bool, str]:
    """Whether TensorRT engines can run here; never raises.

    Args:
        device: CUDA device index to check.

    Returns:
        ``(True, "TensorRT 10.3.0, GPU Orin (compute 8.7)")`` or ``(False, reason with install help)``.
    """
    try:
        version = require_tensorrt("building or running TensorRT engines")
        gpu = gpu_info(device)
    except TensorRTUnavailableError as exc:
        return False, str(exc)
    except Exception as exc:  # contract: never raises
        return False, f"TensorRT check failed unexpectedly: {exc!r}"
    return True, f"TensorRT {version}, GPU {gpu.name} (compute {gpu.compute_capability})"


def batch_slices(n: int, max_batch: int) -> list[tuple[int, int]]:
    """Split ``n`` images into ``[start, stop)`` chunks of at most ``max_batch``.

    Raises:
        EngineBuildError: ``max_batch`` < 1.
    """
    if max_batch < 1:
        raise EngineBuildError(f"max batch {max_batch}: the engine's profile must allow at least 1")
    return [(start, min(start + max_batch, n)) for start in range(0, n, max_batch)]


class TensorRTRunner(Runner):
    """Run a TensorRT engine built by ``fod build``.

    Args:
        engine_path: the ``.engine`` file (``PKG_DIR/model.<precision>.engine``).
        image_size: ``(height, width)`` of the model input in px.
        device: CUDA device index.
        verify: check the engine manifest against this box and the package before loading
            (:func:`~engine_build.manifest.load_engine_manifest`); the builder passes False for the
            fresh engine it checks for parity before writing its manifest.
        package_dir: the model package, for the source-ONNX check (None: the engine's folder, else
            the one recorded at build time).

    Raises (from :meth:`activate`):
        TensorRTUnavailableError: TensorRT, pycuda or the GPU is missing.
        EngineMismatchError: the engine does not fit this box or its package, is corrupt, or its
            inputs and outputs are not ``image`` -> ``anomaly_map``, ``score``.
        EngineBuildError: no execution context could be created (GPU memory).
    """

    name = "tensorrt"

    def __init__(
        self,
        engine_path: str | Path,
        image_size: tuple[int, int],
        *,
        device: int = 0,
        verify: bool = True,
        package_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.engine_path = Path(engine_path)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.device = device
        self.verify = verify
        self.package_dir = package_dir
        self.manifest: EngineManifest | None = None
        self.max_batch = 0
        self._cuda: Any = None  # pycuda.driver
        self._cuda_ctx: Any = None  # retained primary context
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._stream: Any = None
        self._host: dict[str, np.ndarray] = {}  # page-locked, shaped for max_batch
        self._device_mem: dict[str, Any] = {}  # pycuda DeviceAllocation per tensor
        self._lock = threading.Lock()  # one stream and one set of buffers: one batch at a time

    @property
    def released(self) -> bool:
        """True when no engine, context, stream, CUDA context or buffer is held."""
        held = (self._cuda_ctx, self._runtime, self._engine, self._context, self._stream)
        return all(x is None for x in held) and not self._host and not self._device_mem

    # ------------------------------------------------------------------------------------- lifecycle

    def _activate_impl(self) -> None:
        version = require_tensorrt("the TensorRT backend")
        cuda = require_pycuda("the TensorRT backend")
        import tensorrt as trt

        if self.verify:
            self.manifest = load_engine_manifest(
                self.engine_path,
                runtime=current_runtime(self.device),
                package_dir=self.package_dir,
                image_size=self.image_size,
            )
        elif not self.engine_path.is_file():
            raise EngineMismatchError(f"{self.engine_path}: engine not found; build it with `fod build`")
        self._cuda = cuda
        self._cuda_ctx = cuda.Device(self.device).retain_primary_context()
        self._cuda_ctx.push()
        try:
            self._runtime = trt.Runtime(trt_logger())
            engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if engine is None:
                raise EngineMismatchError(
                    f"{self.engine_path}: TensorRT {version} cannot deserialise this engine (built by "
                    f"another TensorRT version or for another GPU, or corrupt); rebuild it with "
                    f"`{self._rebuild()}`",
                    rebuild_command=self._rebuild(),
                )
            self._engine = engine
            context = engine.create_execution_context()
            if context is None:
                raise EngineBuildError(
                    f"{self.engine_path}: TensorRT could not create an execution context (GPU memory full?); "
                    "close other GPU programs or rebuild with a smaller --max-batch"
                )
            self._context = context
            self._stream = cuda.Stream()
            self._allocate(engine, context, cuda)
        except BaseException:
            self._drop_gpu_objects()
            self._leave_cuda_context(detach=True)
            raise
        self._leave_cuda_context(detach=False)
        log.info(
            "TensorRT engine %s loaded (TensorRT %s, device %d, batch 1..%d)",
            self.engine_path.name,
            version,
            self.device,
            self.max_batch,
        )

    def _allocate(self, engine: trt.ICudaEngine, context: trt.IExecutionContext, cuda: Any) -> None:
        """Check the engine's I/O against the graph contract and bind buffers for the largest batch."""
        import tensorrt as trt

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [INPUT_NAME] or sorted(outputs) != sorted(OUTPUT_NAMES):
            raise EngineMismatchError(
                f"{self.engine_path}: engine has inputs {inputs} and outputs {outputs}, expected "
                f"['{INPUT_NAME}'] -> {list(OUTPUT_NAMES)}; rebuild it from a package made by `fod export`",
                rebuild_command=self._rebuild(),
            )
        low, _, high = (dims_to_tuple(d) for d in engine.get_tensor_profile_shape(INPUT_NAME, 0))
        h, w = self.image_size
        if tuple(high[1:]) != (h, w, 3) or low[0] > 1:
            raise EngineMismatchError(
                f"{self.engine_path}: engine input accepts {list(low)}..{list(high)}, the model needs "
                f"[1..N, {h}, {w}, 3]; rebuild it with `{self._rebuild()}`",
                rebuild_command=self._rebuild(),
            )
        self.max_batch = int(high[0])
        if not context.set_input_shape(INPUT_NAME, tuple(high)):
            raise EngineBuildError(f"{self.engine_path}: TensorRT refused input shape {list(high)}")
        for tensor in names:
            shape = dims_to_tuple(context.get_tensor_shape(tensor))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tensor)))
            if tensor == INPUT_NAME and dtype != np.uint8:
                raise EngineMismatchError(
                    f"{self.engine_path}: engine input is {dtype}, expected uint8; "
                    "rebuild it from the package",
                    rebuild_command=self._rebuild(),
                )
            if any(d < 0 for d in shape):
                raise EngineBuildError(
                    f"{self.engine_path}: output {tensor} has unresolved shape {list(shape)}"
                )
            host = cuda.pagelocked_empty(shape, dtype)
            mem = cuda.mem_alloc(max(int(host.nbytes), 1))
            self._host[tensor] = host
            self._device_mem[tensor] = mem
            if not context.set_tensor_address(tensor, int(mem)):
                raise EngineBuildError(f"{self.engine_path}: TensorRT refused the buffer of {tensor}")

    def _deactivate_impl(self) -> None:
        with self._lock:  # never free buffers under a running batch
            if self._cuda_ctx is not None:
                self._cuda_ctx.push()
            try:
                self._drop_gpu_objects()
            finally:
                self._leave_cuda_context(detach=True)
        log.info("TensorRT engine %s released", self.engine_path.name)

    def _drop_gpu_objects(self) -> None:
        """Free device buffers, then context, engine, runtime and stream (CUDA context must be current)."""
        for mem in self._device_mem.values():
            try:
                mem.free()
            except Exception:  # a failed free must not keep the rest alive
                log.warning("freeing a device buffer of %s failed", self.engine_path.name, exc_info=True)
        self._device_mem = {}
        self._host = {}
        self._context = None  # before the engine, as TensorRT requires
        self._engine = None
        self._runtime = None
        self._stream = None

    def _leave_cuda_context(self, *, detach: bool) -> None:
        if self._cuda_ctx is None:
            return
        self._cuda.Context.pop()
        if detach:
            self._cuda_ctx.detach()
            self._cuda_ctx = None
            self._cuda = None

    def _rebuild(self) -> str:
        pkg = self.package_dir or self.engine_path.parent
        precision = self.manifest.precision if self.manifest else None
        if precision is None:
            stem = self.engine_path.name
            precision = next((p for p in ("fp32", "fp16", "int8") if stem == f"model.{p}.engine"), "fp16")
        return rebuild_command(pkg, precision, self.engine_path)

    # ------------------------------------------------------------------------------------- inference

    def _infer_impl(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = [], []
        with self._lock:
            self._cuda_ctx.push()
            try:
                for start, stop in batch_slices(len(images), self.max_batch):
                    anomaly_map, score = self._run_chunk(images[start:stop])
                    maps.append(anomaly_map)
                    scores.append(score)
            finally:
                self._cuda.Context.pop()
        if len(maps) == 1:
            return maps[0], scores[0]
        return np.concatenate(maps), np.concatenate(scores)

    def _run_chunk(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One ``execute_async_v3`` call for ``k <= max_batch`` images; returns fresh float32 arrays."""
        cuda, stream, context = self._cuda, self._stream, self._context
        if context is None:
            raise FodError(f"{self.engine_path}: the TensorRT runner is not active; call activate()")
        k = len(chunk)
        host_in = self._host[INPUT_NAME]
        host_in[:k] = chunk
        if not context.set_input_shape(INPUT_NAME, (k, *chunk.shape[1:])):
            raise EngineBuildError(
                f"{self.engine_path}: TensorRT refused batch size {k} (1..{self.max_batch})"
            )
        cuda.memcpy_htod_async(self._device_mem[INPUT_NAME], host_in[:k], stream)
        if not context.execute_async_v3(stream.handle):
            raise EngineBuildError(f"{self.engine_path}: TensorRT execution failed (see the log above)")
        views = {}
        for name in OUTPUT_NAMES:
            shape = dims_to_tuple(context.get_tensor_shape(name))
            if shape[0] != k:
                raise EngineBuildError(
                    f"{self.engine_path}: output {name} has shape {list(shape)} for batch {k}"
                )
            views[name] = self._host[name][:k]
            cuda.memcpy_dtoh_async(views[name], self._device_mem[name], stream)
        stream.synchronize()
        # copies: the page-locked buffers are reused by the next call
        return views["anomaly_map"].astype(np.float32, copy=True), views["score"].astype(
            np.float32, copy=True
        )
