"""Pick and load the inference backend for a model package: TensorRT engine or ONNX Runtime.

Both backends are :class:`fod.runner.Runner` subclasses with the same ``infer`` contract
(``image`` uint8 ``[N, H, W, 3]`` BGR -> ``anomaly_map`` ``[N, 1, H, W]`` float32, ``score`` ``[N]``).
The registry is built from what imports: TensorRT (``engine_build.runner``) is imported lazily
and only when asked for or when ``auto`` finds an engine, so the agent runs on a machine with no
CUDA; ONNX Runtime is the fallback. ``auto`` picks TensorRT when
``engine_build.runner.tensorrt_available()`` and the package has an engine for the precision,
else ONNX Runtime, and says why (:attr:`LoadedModel.reason`).

The package's calibration gives the threshold and the normalisation; ``model.threshold`` in the
config overrides it, and is required when the package has none.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import ModelConfig
from agent.errors import BackendError, ConfigError
from fod.errors import FodError
from fod.package import Calibration, ModelPackage
from fod.runner import OnnxRuntimeRunner, Runner

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


@dataclass
class LoadedModel:
    """An activated runner and what the pipeline needs to know about its model.

    Attributes:
        runner: the active :class:`fod.runner.Runner`.
        package: the validated model package.
        backend: ``tensorrt`` or ``onnxruntime``.
        reason: why this backend was chosen, in words (logged and shown on the status page).
        model_file: the ONNX or engine file that is running.
        calibration: the calibration in force (the package's, or one built from ``model.threshold``).
        calibrated: True when the package had a calibration.
    """

    runner: Runner
    package: ModelPackage
    backend: str
    reason: str
    model_file: Path
    calibration: Calibration
    calibrated: bool

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the model input in px."""
        return self.package.image_size

    @property
    def name(self) -> str:
        """Model name and file, for status messages."""
        return f"{self.package.manifest.model_name} ({self.model_file})"

    def close(self) -> None:
        """Deactivate the runner (releases sessions, engines and buffers). Idempotent."""
        self.runner.deactivate()


def split_model_path(path: Path) -> tuple[Path, Path | None]:
    """Split ``--model`` into the package folder and an explicit engine file.

    Args:
        path: a package folder, or an engine file (``.engine``, ``.plan``, ``.trt``) inside one.

    Returns:
        ``(package_dir, engine_file or None)``.

    Raises:
        BackendError: the path does not exist.
    """
    if path.is_dir():
        return path, None
    if path.is_file() and path.suffix in ENGINE_SUFFIXES:
        return path.parent, path
    if path.is_file():
        raise BackendError(
            f"model.path {path} is a file but not a TensorRT engine ({', '.join(ENGINE_SUFFIXES)}); "
            "pass the model package folder made by `fod export`"
        )
    raise BackendError(f"model.path {path} not found; set model.path in config.toml or pass --model PKG_DIR")


def check_input_size(package: ModelPackage, config: ModelConfig) -> None:
    """Refuse a package whose graph input is larger than ``model.max_input_side_px`` (before any allocation).

    Raises:
        ConfigError: names the manifest, the size and the limit.
    """
    height, width = package.image_size
    limit = config.max_input_side_px
    if not (0 < height <= limit and 0 < width <= limit):
        raise ConfigError(
            f"{package.root}/manifest.json declares an input of {height}x{width} px, outside 1..{limit} px per side "
            f"(model.max_input_side_px): refusing it before allocating buffers; export the model at a smaller "
            "input size, or raise model.max_input_side_px if the box has the memory"
        )


def check_calibration(calibration: Calibration, root: Path) -> None:
    """Refuse calibration values the pipeline cannot use (NaN, inf, thresholds <= 0, empty range).

    Raises:
        ConfigError: names the manifest field and the fix.
    """
    where = f"{root}/manifest.json calibration"
    for key in ("image_threshold", "pixel_threshold", "norm_min", "norm_max"):
        value = getattr(calibration, key)
        if not math.isfinite(value):
            raise ConfigError(
                f"{where}.{key} is {value}: re-run `fod calibrate --model {root}`, or set model.threshold / "
                "model.pixel_threshold in config.toml"
            )
    for key in ("image_threshold", "pixel_threshold"):
        if getattr(calibration, key) <= 0:
            raise ConfigError(
                f"{where}.{key} is {getattr(calibration, key)}, it must be > 0: re-run `fod calibrate --model {root}` "
                "or set model.threshold in config.toml"
            )
    if calibration.norm_max <= calibration.norm_min:
        raise ConfigError(
            f"{where}: norm_max ({calibration.norm_max}) must be above norm_min ({calibration.norm_min}); "
            f"re-run `fod calibrate --model {root}`"
        )


def effective_calibration(package: ModelPackage, config: ModelConfig) -> tuple[Calibration, bool]:
    """The calibration in force: the package's with the config's overrides applied.

    Args:
        package: the model package.
        config: ``[model]`` settings (``threshold``, ``pixel_threshold``).

    Returns:
        ``(calibration, package_was_calibrated)``.

    Raises:
        ConfigError: the package has no calibration and ``model.threshold`` is not set.
    """
    calibration = package.manifest.calibration
    if calibration is not None:
        updates: dict[str, Any] = {}
        if config.threshold is not None:
            updates["image_threshold"] = config.threshold
        if config.pixel_threshold is not None:
            updates["pixel_threshold"] = config.pixel_threshold
        effective = calibration.model_copy(update=updates) if updates else calibration
        check_calibration(effective, package.root)
        return effective, True
    if config.threshold is None:
        raise ConfigError(
            f"model package {package.root} has no calibration (no threshold); run "
            f"`fod calibrate --model {package.root} --normal GOOD_IMAGES_DIR` or set model.threshold "
            "in config.toml (or --threshold)"
        )
    threshold = config.threshold
    return (
        Calibration(
            image_threshold=threshold,
            pixel_threshold=config.pixel_threshold if config.pixel_threshold is not None else threshold,
            norm_min=0.0,
            norm_max=2.0 * threshold,
            method="model.threshold from the agent config (package not calibrated)",
            target_far=math.nan,
            n_normal=0,
        ),
        False,
    )


def _engine_build(module: str) -> Any:
    """Import ``engine_build.<module>`` or return None (with the reason logged at debug level)."""
    try:
        return importlib.import_module(f"engine_build.{module}")
    except ImportError as exc:
        log.debug("engine_build.%s not importable: %s", module, exc)
        return None


def tensorrt_status() -> tuple[bool, str]:
    """Whether the TensorRT backend can run here.

    Returns:
        ``(available, reason)``; never raises.
    """
    runner_module = _engine_build("runner")
    if runner_module is None:
        return False, "engine_build.runner cannot be imported (TensorRT support not installed)"
    try:
        ok, reason = runner_module.tensorrt_available()
        return bool(ok), str(reason)
    except Exception as exc:  # a broken CUDA install must not stop the CPU fallback
        return False, f"tensorrt_available() failed: {exc}"


def find_engine(package_dir: Path, precision: str) -> Path | None:
    """The engine built for ``precision`` in the package folder, or None."""
    manifest_module = _engine_build("manifest")
    if manifest_module is not None:
        try:
            found = manifest_module.find_engine(package_dir, precision)
            return Path(found) if found is not None else None
        except Exception as exc:
            log.warning("looking for a TensorRT engine in %s failed: %s", package_dir, exc)
            return None
    candidate = package_dir / f"model.{precision}.engine"
    return candidate if candidate.is_file() else None


def _tensorrt_runner(engine: Path, image_size: tuple[int, int], package_dir: Path) -> Runner:
    """Create and activate a TensorRT runner; it checks the engine manifest against this box first."""
    from engine_build.errors import EngineBuildError  # lazy: engine_build imports TensorRT lazily too

    runner_module = _engine_build("runner")
    if runner_module is None:
        raise BackendError(
            "engine_build.runner cannot be imported; install the tensorrt extra on the box "
            "(pip install '.[cpu,tensorrt]' in the fod-agent clone)"
        )
    runner: Runner = runner_module.TensorRTRunner(engine, image_size, package_dir=package_dir)
    try:
        runner.activate()
    except (EngineBuildError, FodError) as exc:
        runner.deactivate()
        raise BackendError(f"TensorRT engine {engine} refused: {exc}") from exc
    return runner


def _onnx_runner(package: ModelPackage, config: ModelConfig) -> tuple[OnnxRuntimeRunner, Path]:
    """The activated ONNX Runtime runner of the package's ``config.precision`` graph, and that graph."""
    try:
        model_file = package.onnx_path(config.precision)
    except FodError as exc:
        raise BackendError(str(exc)) from exc
    runner = OnnxRuntimeRunner(model_file, package.image_size, intra_op_threads=config.onnx_threads)
    try:
        runner.activate()
    except FodError as exc:
        raise BackendError(str(exc)) from exc
    return runner, model_file


def load_model(config: ModelConfig, *, path: Path | None = None) -> LoadedModel:
    """Validate the package, choose the backend, and activate a runner.

    Args:
        config: ``[model]`` settings.
        path: model package folder or engine file; None = ``config.path``.

    Returns:
        A :class:`LoadedModel` with an active runner.

    Raises:
        ConfigError: no model path, or no threshold (package not calibrated, ``model.threshold`` unset).
        BackendError: the package is invalid (missing file, sha256 mismatch: the message names the
            file), TensorRT was asked for but cannot run, the engine does not match this box, or
            ONNX Runtime cannot load the graph.
    """
    path = path if path is not None else config.path
    if path is None:
        raise ConfigError("model.path is not set; set it in config.toml or pass --model PKG_DIR")
    package_dir, engine = split_model_path(Path(path))
    try:
        package = ModelPackage(package_dir)
    except FodError as exc:
        raise BackendError(f"model package refused: {exc}") from exc
    check_input_size(package, config)
    calibration, calibrated = effective_calibration(package, config)

    requested = config.backend
    if engine is not None and requested == "onnxruntime":
        raise ConfigError(
            f"--model {engine} is a TensorRT engine but model.backend is onnxruntime; "
            "pass the package folder "
            f"{package_dir} or use --backend tensorrt"
        )
    runner: Runner | None = None
    backend = "onnxruntime"
    reason = "model.backend = onnxruntime"
    model_file: Path
    if requested in ("auto", "tensorrt") or engine is not None:
        available, why = tensorrt_status()
        engine = engine or find_engine(package_dir, config.precision)
        if requested == "tensorrt" or (requested == "auto" and engine is not None and available):
            if not available:
                raise BackendError(f"TensorRT backend requested but not available: {why}; use --backend onnxruntime")
            if engine is None:
                raise BackendError(
                    f"TensorRT backend requested but {package_dir} has no {config.precision} engine; "
                    "build one on "
                    f"this box with `fod build --model {package_dir} --precision {config.precision}`"
                )
            try:
                runner = _tensorrt_runner(engine, package.image_size, package_dir)
                backend, reason, model_file = (
                    "tensorrt",
                    f"TensorRT engine {engine.name} found and TensorRT available",
                    engine,
                )
            except BackendError as exc:
                if requested == "tensorrt":
                    raise
                log.warning("%s; falling back to ONNX Runtime", exc)
                reason = f"auto: engine refused ({exc}); ONNX Runtime"
        elif engine is None:
            reason = f"auto: no {config.precision} TensorRT engine in the package; ONNX Runtime"
        else:
            reason = f"auto: TensorRT not available ({why}); ONNX Runtime"
    if runner is None:
        onnx_runner, model_file = _onnx_runner(package, config)
        runner = onnx_runner
        reason += f" ({', '.join(onnx_runner.active_providers)})"
    log.info("backend %s: %s; model %s", backend, reason, model_file)
    return LoadedModel(runner, package, backend, reason, model_file, calibration, calibrated)
