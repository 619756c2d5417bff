"""Helpers for the engine_build tests: copies of the toy package, a perturbed toy graph, fake manifests."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import onnx
from onnx import numpy_helper

from engine_build.manifest import EngineManifest, RuntimeInfo, default_engine_path, write_engine_manifest
from fod.package import ModelPackage, sha256_file

RUNTIME = RuntimeInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")


def copy_package(src: Path, dst: Path) -> Path:
    """A private copy of a package (tests edit files in it)."""
    shutil.copytree(src, dst)
    return dst


def perturb_toy_onnx(path: Path, center: float = 120.0) -> None:
    """Rewrite the toy graph with another centre constant: map = |x - center| / center (was 128)."""
    model = onnx.load(str(path))
    for i, init in enumerate(model.graph.initializer):
        if init.name == "c128":
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(init) * 0 + center, "c128")
            )
    onnx.save(model, str(path))


def fake_engine(
    pkg_dir: Path,
    precision: str = "fp32",
    *,
    engine_path: Path | None = None,
    runtime: RuntimeInfo = RUNTIME,
    content: bytes = b"not a real TensorRT plan",
) -> Path:
    """Write an engine file (arbitrary bytes) and a manifest that matches ``runtime`` and the package."""
    pkg = ModelPackage(pkg_dir)
    engine = engine_path or default_engine_path(pkg_dir, precision)
    engine.write_bytes(content)
    onnx_name = pkg.onnx_path(precision).name
    manifest = EngineManifest(
        engine_file=engine.name,
        engine_sha256=hashlib.sha256(content).hexdigest(),
        precision=precision,
        tensorrt_version=runtime.tensorrt_version,
        gpu_name=runtime.gpu_name,
        compute_capability=runtime.compute_capability,
        model_name=pkg.manifest.model_name,
        package_dir=str(pkg_dir.resolve()),
        source_onnx=onnx_name,
        source_onnx_sha256=sha256_file(pkg_dir / onnx_name),
        image_size=pkg.image_size,
        build_settings={"precision": precision, "max_batch": 4},
        build_time_s=1.0,
        built_utc="2025-01-01T00:00:00+00:00",
        fod_agent_version="0.1.0",
        parity={"passed": True},
    )
    write_engine_manifest(engine, manifest)
    return engine
