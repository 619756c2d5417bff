"""Lazy access to TensorRT and pycuda, the install instructions, GPU facts and the TensorRT logger.

Nothing here imports ``tensorrt`` or ``pycuda`` at module import time, so ``import engine_build`` works
on a machine without them (the agent then runs ONNX Runtime). Functions that need them call
:func:`require_tensorrt` / :func:`require_pycuda` first, which raise
:class:`~engine_build.errors.TensorRTUnavailableError` with what is missing and how to install it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine_build.errors import TensorRTUnavailableError

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger("engine_build")

#: oldest TensorRT major version supported (JetPack 6.1+ ships 10.3)
MIN_TENSORRT_MAJOR = 10

INSTALL_HELP = (
    "How to install it:\n"
    "  - Jetson (JetPack 6): TensorRT comes with JetPack: `sudo apt install python3-libnvinfer` and pycuda "
    "with `sudo apt install python3-pycuda` or `pip install pycuda` (with /usr/local/cuda/bin on PATH); "
    "create the virtual environment with `--system-site-packages` so that it sees the apt packages.\n"
    "  - x86 PC with an NVIDIA GPU and driver: `pip install '.[cpu,tensorrt]'` in the fod-agent clone.\n"
    "  - No NVIDIA GPU: no engine is needed; the agent runs the package with ONNX Runtime "
    "(`pip install '.[cpu]'` in the fod-agent clone)."
)


def require_tensorrt(purpose: str) -> str:
    """Check that the real TensorRT Python bindings import; return their version.

    ``tensorrt-stubs`` installs a ``tensorrt`` folder of type stubs that Python imports as an empty
    namespace package: that is reported as missing too.

    Args:
        purpose: what needs TensorRT, for the message (``"fod build"``).

    Raises:
        TensorRTUnavailableError: not installed, or only the type stubs are.
    """
    try:
        import tensorrt as trt_module
    except Exception as exc:  # ImportError, or OSError for a missing libnvinfer.so
        raise TensorRTUnavailableError(
            f"{purpose} needs the TensorRT Python bindings, which cannot be imported ({exc}).\n{INSTALL_HELP}"
        ) from exc
    version = getattr(trt_module, "__version__", None)
    if not isinstance(version, str) or not hasattr(trt_module, "Builder"):
        raise TensorRTUnavailableError(
            f"{purpose} needs the TensorRT Python bindings; the `tensorrt` module found "
            f"({list(getattr(trt_module, '__path__', []))}) is not them (only type stubs are installed).\n"
            f"{INSTALL_HELP}"
        )
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailableError(
            f"{purpose} needs TensorRT {MIN_TENSORRT_MAJOR} or newer (strongly typed networks, "
            f"execute_async_v3), found {version}; on a Jetson upgrade to JetPack 6.1 or newer.\n"
            f"{INSTALL_HELP}"
        )
    return version


def require_pycuda(purpose: str) -> Any:
    """Import ``pycuda.driver``, initialise CUDA and check that a GPU is present; return the module.

    Args:
        purpose: what needs CUDA, for the message.

    Returns:
        the ``pycuda.driver`` module (typed ``Any``: pycuda ships no type information).

    Raises:
        TensorRTUnavailableError: pycuda missing, no usable CUDA driver, or no GPU.
    """
    try:
        import pycuda.driver as cuda
    except Exception as exc:
        raise TensorRTUnavailableError(
            f"{purpose} needs pycuda for GPU buffers, which cannot be imported ({exc}).\n{INSTALL_HELP}"
        ) from exc
    try:
        cuda.init()
        count = int(cuda.Device.count())
    except Exception as exc:
        raise TensorRTUnavailableError(
            f"{purpose}: the CUDA driver is not usable ({exc}); check the NVIDIA driver (`nvidia-smi` on "
            f"x86, JetPack on a Jetson) and that this user may open the GPU.\n{INSTALL_HELP}"
        ) from exc
    if count == 0:
        raise TensorRTUnavailableError(f"{purpose}: CUDA reports no GPU on this machine.\n{INSTALL_HELP}")
    return cuda


@dataclass(frozen=True)
class GpuInfo:
    """Identity of a CUDA device.

    Attributes:
        index: CUDA device ordinal.
        name: device name as CUDA reports it (``"Orin"``, ``"NVIDIA GeForce RTX 4090"``).
        compute_capability: ``"major.minor"`` (``"8.7"`` on Jetson Orin).
    """

    index: int
    name: str
    compute_capability: str


def gpu_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device``.

    Raises:
        TensorRTUnavailableError: pycuda, the driver or the device is missing.
    """
    cuda = require_pycuda("reading the GPU's identity")
    if device >= int(cuda.Device.count()):
        raise TensorRTUnavailableError(
            f"CUDA device {device} does not exist ({cuda.Device.count()} found); pick another device index"
        )
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return GpuInfo(index=device, name=str(dev.name()), compute_capability=f"{major}.{minor}")


_logger_lock = threading.Lock()
_trt_logger: Any = None


def trt_logger() -> trt.ILogger:
    """The process-wide TensorRT logger, forwarding to Python logging (``engine_build.tensorrt``).

    TensorRT errors and warnings are logged at ERROR / WARNING; its INFO and VERBOSE messages at DEBUG
    (shown with ``fod -v``). One logger is shared by every builder and runtime, as TensorRT expects.

    Raises:
        TensorRTUnavailableError: TensorRT is not installed.
    """
    global _trt_logger
    require_tensorrt("the TensorRT logger")
    import tensorrt as trt

    with _logger_lock:
        if _trt_logger is None:
            target = logging.getLogger("engine_build.tensorrt")
            levels = {
                trt.ILogger.INTERNAL_ERROR: logging.CRITICAL,
                trt.ILogger.ERROR: logging.ERROR,
                trt.ILogger.WARNING: logging.WARNING,
                trt.ILogger.INFO: logging.DEBUG,
                trt.ILogger.VERBOSE: logging.DEBUG,
            }

            class _PythonLogger(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
                    level = levels.get(severity, logging.INFO)
                    if target.isEnabledFor(level):
                        target.log(level, "%s", msg)

            _trt_logger = _PythonLogger()
        logger: trt.ILogger = _trt_logger
    return logger


def dims_to_tuple(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple of ints (``-1`` marks a dynamic axis)."""
    return tuple(int(dims[i]) for i in range(len(dims)))
