"""ONNX -> TensorRT engine, engine manifest and checks, parity check, and the TensorRT runtime.

Importing this package needs neither TensorRT nor pycuda (they are imported when used), so the agent
can import it everywhere and fall back to ONNX Runtime when :func:`tensorrt_available` says no.

Modules: :mod:`~engine_build.steps` (build steps), :mod:`~engine_build.manifest` (``engine.json``),
:mod:`~engine_build.parity`, :mod:`~engine_build.runner` (:class:`TensorRTRunner`),
:mod:`~engine_build.cli` (``fod build``), :mod:`~engine_build.util`, :mod:`~engine_build.errors`.
"""

from engine_build.errors import (
    EngineBuildError,
    EngineMismatchError,
    ParityError,
    TensorRTUnavailableError,
)
from engine_build.manifest import EngineManifest, RuntimeInfo, find_engine, load_engine_manifest
from engine_build.parity import ParityReport, ParityTolerance, compare_runners
from engine_build.runner import TensorRTRunner, tensorrt_available
from engine_build.steps import (
    BuildSettings,
    CreateConfig,
    EngineBytesFromNetwork,
    NetworkFromOnnx,
    SaveEngine,
)

__all__ = [
    "BuildSettings",
    "CreateConfig",
    "EngineBuildError",
    "EngineBytesFromNetwork",
    "EngineManifest",
    "EngineMismatchError",
    "NetworkFromOnnx",
    "ParityError",
    "ParityReport",
    "ParityTolerance",
    "RuntimeInfo",
    "SaveEngine",
    "TensorRTRunner",
    "TensorRTUnavailableError",
    "compare_runners",
    "find_engine",
    "load_engine_manifest",
    "tensorrt_available",
]
