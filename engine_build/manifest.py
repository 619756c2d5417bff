"""The engine manifest (``engine.json`` sidecar) and the checks made before an engine is used.

Layout: an engine lives in its model package by default, ``PKG_DIR/model.<precision>.engine``, with
the manifest beside it, ``PKG_DIR/model.<precision>.engine.json``. The manifest records the TensorRT
version, GPU name and compute capability, precision, the sha256 of the source ONNX and of the engine,
the build settings and time, and the parity report against ONNX Runtime.

:func:`load_engine_manifest` compares all of it with this box and the package, and refuses a mismatch
with an :class:`~engine_build.errors.EngineMismatchError` that lists every difference and the
``fod build`` command that rebuilds the engine.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine_build.errors import EngineMismatchError
from engine_build.steps import PRECISIONS
from fod.package import MANIFEST_NAME, sha256_file

ENGINE_SCHEMA_VERSION = 1
#: order in which :func:`find_engine` picks an engine when no precision is asked for (fastest first)
ENGINE_PREFERENCE = ("int8", "fp16", "fp32")


class EngineManifest(BaseModel):
    """``model.<precision>.engine.json``: how and where an engine was built.

    Schema version :data:`ENGINE_SCHEMA_VERSION`; unknown keys are refused.
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: int = ENGINE_SCHEMA_VERSION
    engine_file: str = Field(description="file name of the engine this manifest describes")
    engine_sha256: str = Field(description="sha256 of the engine file")
    precision: str = Field(description="ONNX variant the engine was built from: fp32, fp16 or int8")
    tensorrt_version: str = Field(description="tensorrt.__version__ of the build")
    gpu_name: str = Field(description="CUDA device name of the build GPU")
    compute_capability: str = Field(description="'major.minor' of the build GPU")
    model_name: str = Field(description="model_name of the package manifest")
    package_dir: str = Field(description="absolute path of the model package at build time")
    source_onnx: str = Field(description="file name of the ONNX variant in the package")
    source_onnx_sha256: str = Field(description="sha256 of that ONNX file at build time")
    image_size: tuple[int, int] = Field(description="(height, width) of the engine input in px")
    build_settings: dict[str, Any] = Field(description="BuildSettings.to_dict() of the build")
    build_time_s: float = Field(description="wall time of the TensorRT build in s")
    built_utc: str = Field(description="ISO 8601 time the build finished, UTC")
    fod_agent_version: str = Field(description="version of fod-agent that built it")
    parity: dict[str, Any] = Field(default_factory=dict, description="ParityReport.to_dict() vs ONNX Runtime")


@dataclass(frozen=True)
class RuntimeInfo:
    """What an engine must match on the box that runs it.

    Attributes:
        tensorrt_version: ``tensorrt.__version__``.
        gpu_name: CUDA device name.
        compute_capability: ``"major.minor"``.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def current_runtime(device: int = 0) -> RuntimeInfo:
    """TensorRT version and GPU identity of this box.

    Raises:
        TensorRTUnavailableError: TensorRT, pycuda or the GPU is missing.
    """
    from engine_build.util import gpu_info, require_tensorrt

    version = require_tensorrt("checking an engine")
    gpu = gpu_info(device)
    return RuntimeInfo(tensorrt_version=version, gpu_name=gpu.name, compute_capability=gpu.compute_capability)


def default_engine_path(package_dir: str | Path, precision: str) -> Path:
    """``PKG_DIR/model.<precision>.engine``."""
    return Path(package_dir) / f"model.{precision}.engine"


def manifest_path(engine_path: str | Path) -> Path:
    """The sidecar manifest of an engine: ``<engine>.json``."""
    path = Path(engine_path)
    return path.with_name(path.name + ".json")


def rebuild_command(package_dir: str | Path, precision: str, engine_path: str | Path | None = None) -> str:
    """The ``fod build`` command that (re)builds this engine; ``--out`` only when not at the default path."""
    parts = ["fod", "build", "--model", str(package_dir), "--precision", precision]
    if engine_path is not None and Path(engine_path) != default_engine_path(package_dir, precision):
        parts += ["--out", str(engine_path)]
    return shlex.join(parts)


def find_engine(package_dir: str | Path, precision: str | None = None) -> Path | None:
    """The engine of a model package, or None when none was built.

    Args:
        package_dir: the model package folder.
        precision: ``fp32``, ``fp16`` or ``int8``; None takes the first that exists in the order
            :data:`ENGINE_PREFERENCE` (int8, fp16, fp32: the fastest one built; each passed its parity
            check when it was built).

    Returns:
        ``PKG_DIR/model.<precision>.engine`` if that file exists, else None. Whether it fits this box is
        checked by :func:`load_engine_manifest`.

    Raises:
        EngineMismatchError: ``precision`` is not one of fp32, fp16, int8.
    """
    if precision is not None and precision not in PRECISIONS:
        raise EngineMismatchError(
            f"unknown engine precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    for candidate in (precision,) if precision else ENGINE_PREFERENCE:
        path = default_engine_path(package_dir, candidate)
        if path.is_file():
            return path
    return None


def write_engine_manifest(engine_path: str | Path, manifest: EngineManifest) -> Path:
    """Write the sidecar of ``engine_path`` atomically; return its path."""
    path = manifest_path(engine_path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(path)
    return path


def _guess_origin(engine_path: Path) -> tuple[Path, str]:
    """Package folder and precision of an engine whose manifest cannot be read (from its name)."""
    stem = engine_path.name
    precision = next((p for p in PRECISIONS if stem == f"model.{p}.engine"), "fp16")
    return engine_path.parent, precision


def read_engine_manifest(engine_path: str | Path) -> EngineManifest:
    """Read and validate the sidecar manifest of an engine (no compatibility checks).

    Raises:
        EngineMismatchError: the engine or its manifest is missing, unreadable, of a newer schema or
            invalid; the message names the file and the rebuild command.
    """
    engine = Path(engine_path)
    path = manifest_path(engine)
    pkg, precision = _guess_origin(engine)
    command = rebuild_command(pkg, precision, engine)
    if not engine.is_file():
        raise EngineMismatchError(
            f"{engine}: engine not found; build it with `{command}`", rebuild_command=command
        )
    if not path.is_file():
        raise EngineMismatchError(
            f"{path}: missing, so {engine.name} cannot be checked against this box; "
            f"rebuild it with `{command}`",
            rebuild_command=command,
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EngineMismatchError(
            f"{path}: not valid JSON ({exc}); rebuild the engine with `{command}`", rebuild_command=command
        ) from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if isinstance(version, int) and version > ENGINE_SCHEMA_VERSION:
        raise EngineMismatchError(
            f"{path}: schema_version {version} is newer than this software reads ({ENGINE_SCHEMA_VERSION}); "
            f"upgrade fod-agent or rebuild with `{command}`",
            rebuild_command=command,
        )
    try:
        return EngineManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise EngineMismatchError(
            f"{path}: key '{key}': {first['msg']}; rebuild the engine with `{command}`",
            rebuild_command=command,
        ) from exc


def resolve_package_dir(
    engine_path: Path, manifest: EngineManifest, package_dir: str | Path | None = None
) -> Path:
    """The model package an engine belongs to.

    ``package_dir`` if given, else the engine's own folder when it is a package holding the source
    ONNX, else the folder recorded in the manifest at build time.
    """
    if package_dir is not None:
        return Path(package_dir)
    here = engine_path.parent
    if (here / MANIFEST_NAME).is_file() and (here / manifest.source_onnx).is_file():
        return here
    return Path(manifest.package_dir)


def engine_differences(
    engine_path: str | Path,
    manifest: EngineManifest,
    runtime: RuntimeInfo,
    *,
    package_dir: str | Path | None = None,
    precision: str | None = None,
    image_size: tuple[int, int] | None = None,
) -> list[str]:
    """Everything that keeps an engine from running here, one line each (empty: it fits).

    Checks the engine file's sha256, the TensorRT version, GPU name, compute capability, the source
    ONNX's sha256 in the package and, when given, the precision and input size asked for.
    """
    engine = Path(engine_path)
    diffs: list[str] = []
    actual = sha256_file(engine)
    if actual != manifest.engine_sha256:
        diffs.append(
            f"engine file: sha256 {actual[:12]}… differs from {manifest_path(engine).name} "
            f"({manifest.engine_sha256[:12]}…): the engine is corrupt or was replaced"
        )
    if manifest.tensorrt_version != runtime.tensorrt_version:
        diffs.append(
            f"TensorRT version: engine built with {manifest.tensorrt_version}, "
            f"this box runs {runtime.tensorrt_version}"
        )
    if manifest.gpu_name != runtime.gpu_name:
        diffs.append(f"GPU: engine built on {manifest.gpu_name!r}, this box has {runtime.gpu_name!r}")
    if manifest.compute_capability != runtime.compute_capability:
        diffs.append(
            f"compute capability: engine built for {manifest.compute_capability}, "
            f"this GPU is {runtime.compute_capability}"
        )
    onnx = resolve_package_dir(engine, manifest, package_dir) / manifest.source_onnx
    if not onnx.is_file():
        diffs.append(f"source ONNX: {onnx} not found (the engine was built from it); pass the model package")
    else:
        onnx_sha = sha256_file(onnx)
        if onnx_sha != manifest.source_onnx_sha256:
            diffs.append(
                f"source ONNX: {onnx} changed since the build (sha256 {onnx_sha[:12]}… now, "
                f"{manifest.source_onnx_sha256[:12]}… then): the package was re-exported or re-calibrated"
            )
    if precision is not None and precision != manifest.precision:
        diffs.append(f"precision: engine is {manifest.precision}, {precision} was asked for")
    if image_size is not None and tuple(image_size) != tuple(manifest.image_size):
        diffs.append(
            f"input size: engine takes {list(manifest.image_size)}, the model needs {list(image_size)}"
        )
    return diffs


def load_engine_manifest(
    engine_path: str | Path,
    *,
    runtime: RuntimeInfo | None = None,
    package_dir: str | Path | None = None,
    precision: str | None = None,
    image_size: tuple[int, int] | None = None,
) -> EngineManifest:
    """Read an engine's manifest and check that the engine fits this box and its package.

    Args:
        engine_path: the ``.engine`` file.
        runtime: TensorRT version and GPU to check against; None reads them from this box
            (:func:`current_runtime`, needs TensorRT and pycuda).
        package_dir: the model package; None: the engine's folder, else the one recorded at build time.
        precision: refuse an engine of another precision (None: any).
        image_size: refuse an engine with another ``(height, width)`` input (None: any).

    Returns:
        the validated :class:`EngineManifest`.

    Raises:
        EngineMismatchError: anything differs (all differences listed) or the files are missing or
            corrupt; ``.rebuild_command`` holds the ``fod build`` command that fixes it.
        TensorRTUnavailableError: ``runtime`` is None and TensorRT / pycuda / the GPU is missing.
    """
    engine = Path(engine_path)
    manifest = read_engine_manifest(engine)
    info = runtime if runtime is not None else current_runtime()
    diffs = engine_differences(
        engine, manifest, info, package_dir=package_dir, precision=precision, image_size=image_size
    )
    if diffs:
        pkg = resolve_package_dir(engine, manifest, package_dir)
        command = rebuild_command(pkg, manifest.precision, engine)
        lines = "\n".join(f"  - {d}" for d in diffs)
        raise EngineMismatchError(
            f"{engine}: this engine cannot be used here:\n{lines}\nrebuild it on this box with `{command}`",
            differences=diffs,
            rebuild_command=command,
        )
    return manifest
