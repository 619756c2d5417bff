"""Real TensorRT on a real GPU. Skipped where TensorRT, pycuda or the GPU is missing.

On the device (Jetson or x86 GPU box), from the repository root::

    pytest -m gpu tests/engine_build -v
    FOD_ENGINE_PACKAGE=/path/to/pkg pytest -m gpu tests/engine_build -v   # also a real model package

They build the toy package (a 64x64 graph with the real I/O contract) into an engine, check the manifest
against this box, compare the engine with ONNX Runtime at several batch sizes (including one larger than
the engine's max batch), cycle activate / deactivate, and refuse an edited or corrupt engine.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine_build.cli import build_engine
from engine_build.errors import EngineMismatchError
from engine_build.manifest import EngineManifest, find_engine, load_engine_manifest, manifest_path
from engine_build.parity import compare_runners, synthetic_frames
from engine_build.runner import TensorRTRunner, tensorrt_available
from fod.cli import main
from fod.package import VARIANT_FILES, ModelPackage
from fod.runner import OnnxRuntimeRunner
from tests.engine_build.helpers import copy_package

AVAILABLE, REASON = tensorrt_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not AVAILABLE, reason=f"needs TensorRT, pycuda and a GPU: {REASON.splitlines()[0]}"),
]
SIZE = (64, 64)


@pytest.fixture(scope="module")
def built(toy_package: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EngineManifest]:
    tmp = tmp_path_factory.mktemp("gpu")
    pkg = copy_package(toy_package, tmp / "pkg")
    manifest = build_engine(pkg, "fp32", max_batch=4, timing_cache=tmp / "timing.cache", heartbeat_s=2.0)
    return pkg, manifest


def test_build_records_this_box(built: tuple[Path, EngineManifest]):
    import tensorrt as trt

    from engine_build.util import gpu_info

    pkg, manifest = built
    engine = find_engine(pkg, "fp32")
    assert engine is not None
    assert manifest.tensorrt_version == trt.__version__
    assert manifest.gpu_name == gpu_info().name
    assert manifest.parity["passed"] is True, manifest.parity
    assert load_engine_manifest(engine).engine_sha256 == manifest.engine_sha256


@pytest.mark.parametrize("n", [1, 3, 4, 6])  # 6 > max batch 4: two executions
def test_engine_matches_onnxruntime_at_every_batch_size(built: tuple[Path, EngineManifest], n: int):
    pkg, _ = built
    frames = synthetic_frames(SIZE, n, seed=n)
    with (
        OnnxRuntimeRunner(pkg / "model.onnx", SIZE) as ref,
        TensorRTRunner(pkg / "model.fp32.engine", SIZE) as trt,
    ):
        expected, got = ref.infer(frames), trt.infer(frames)
        assert trt.max_batch == 4
    assert got.anomaly_map.shape == (n, 1, 64, 64)
    assert got.score.shape == (n,)
    np.testing.assert_allclose(got.score, expected.score, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got.anomaly_map, expected.anomaly_map, rtol=1e-3, atol=1e-4)


def test_activate_deactivate_cycles_release_everything(built: tuple[Path, EngineManifest]):
    pkg, _ = built
    runner = TensorRTRunner(pkg / "model.fp32.engine", SIZE)
    for _ in range(3):
        runner.activate()
        assert runner.infer(synthetic_frames(SIZE, 2)).score.shape == (2,)
        runner.deactivate()
        assert runner.released


def test_edited_manifest_is_refused(built: tuple[Path, EngineManifest], tmp_path: Path):
    pkg = copy_package(built[0], tmp_path / "copy")
    sidecar = manifest_path(pkg / "model.fp32.engine")
    raw = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**raw, "tensorrt_version": "0.0.0"}))
    runner = TensorRTRunner(pkg / "model.fp32.engine", SIZE)
    with pytest.raises(EngineMismatchError, match=r"TensorRT version: engine built with 0\.0\.0"):
        runner.activate()
    assert runner.released


def test_corrupt_plan_is_refused(tmp_path: Path):
    engine = tmp_path / "model.fp32.engine"
    engine.write_bytes(b"\x00" * 1024)
    runner = TensorRTRunner(engine, SIZE, verify=False)
    with pytest.raises(EngineMismatchError, match="cannot deserialise"):
        runner.activate()
    assert runner.released


def test_fod_build_command(toy_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    pkg = copy_package(toy_package, tmp_path / "pkg")
    out = tmp_path / "out" / "toy.engine"
    assert (
        main(["build", "--model", str(pkg), "--precision", "fp32", "--out", str(out), "--max-batch", "2"])
        == 0
    )
    assert "passed" in capsys.readouterr().out
    assert out.is_file()
    assert manifest_path(out).is_file()


@pytest.mark.skipif(
    not os.environ.get("FOD_ENGINE_PACKAGE"), reason="set FOD_ENGINE_PACKAGE to a model package"
)
def test_real_package_every_variant(tmp_path: Path):
    src = Path(os.environ["FOD_ENGINE_PACKAGE"])
    pkg = tmp_path / "pkg"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("*.engine", "*.engine.json"))
    variants = [p for p, name in VARIANT_FILES.items() if name in ModelPackage(pkg).manifest.files]
    size = ModelPackage(pkg).image_size
    for precision in variants:
        manifest = build_engine(pkg, precision, max_batch=4, heartbeat_s=5.0)
        assert manifest.parity["passed"] is True, manifest.parity
        report = compare_runners(
            OnnxRuntimeRunner(pkg / VARIANT_FILES[precision], size),
            TensorRTRunner(pkg / f"model.{precision}.engine", size),
            synthetic_frames(size, 6, seed=7),
            precision=precision,
            batch_size=4,
        )
        assert report.passed, report.summary()
