"""Backend selection and model loading on the toy package (real ONNX Runtime sessions)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.backends import effective_calibration, load_model, split_model_path, tensorrt_status
from agent.config import ModelConfig
from agent.errors import BackendError, ConfigError
from fod.package import ModelPackage
from tests.toy_package import calibrated_copy


def test_auto_picks_onnxruntime_without_tensorrt_and_says_why(toy_package: Path) -> None:
    model = load_model(ModelConfig(path=toy_package, threshold=0.5))
    try:
        assert model.backend == "onnxruntime"
        assert "ONNX Runtime" in model.reason
        assert model.runner.is_active
        out = model.runner.infer(np.full((2, 64, 64, 3), 128, np.uint8))
        assert out.score.tolist() == [0.0, 0.0]
        assert model.calibration.image_threshold == 0.5
        assert not model.calibrated
    finally:
        model.close()
    assert not model.runner.is_active  # deactivated: the session is released


def test_calibrated_package_gives_its_threshold_and_config_overrides_it(toy_package: Path, tmp_path: Path) -> None:
    package = ModelPackage(calibrated_copy(toy_package, tmp_path / "pkg"))
    calibration, calibrated = effective_calibration(package, ModelConfig())
    assert calibrated
    assert (calibration.image_threshold, calibration.pixel_threshold) == (0.3, 0.15)
    calibration, _ = effective_calibration(package, ModelConfig(threshold=0.9))
    assert calibration.image_threshold == 0.9
    assert calibration.pixel_threshold == 0.15


def test_package_without_calibration_needs_a_threshold(toy_package: Path) -> None:
    with pytest.raises(ConfigError, match=r"fod calibrate.*model\.threshold"):
        load_model(ModelConfig(path=toy_package))


def test_package_with_a_bad_hash_is_refused(toy_package: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(toy_package, bad)
    with open(bad / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BackendError, match=r"model\.onnx.*sha256"):
        load_model(ModelConfig(path=bad, threshold=0.5))


def test_tensorrt_requested_without_tensorrt_is_refused_with_the_reason(toy_package: Path) -> None:
    available, _ = tensorrt_status()
    if available:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(BackendError, match="--backend onnxruntime"):
        load_model(ModelConfig(path=toy_package, backend="tensorrt", threshold=0.5))


def test_engine_file_with_onnxruntime_backend_is_a_config_error(toy_package: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    shutil.copytree(toy_package, pkg)
    engine = pkg / "model.fp32.engine"
    engine.write_bytes(b"not an engine")
    assert split_model_path(engine) == (pkg, engine)
    with pytest.raises(ConfigError, match="TensorRT engine"):
        load_model(ModelConfig(path=engine, backend="onnxruntime", threshold=0.5))


def test_auto_with_an_engine_but_no_tensorrt_falls_back(toy_package: Path, tmp_path: Path) -> None:
    if tensorrt_status()[0]:
        pytest.skip("TensorRT is installed here")
    pkg = tmp_path / "pkg"
    shutil.copytree(toy_package, pkg)
    (pkg / "model.fp32.engine").write_bytes(b"not an engine")
    model = load_model(ModelConfig(path=pkg, threshold=0.5))
    try:
        assert model.backend == "onnxruntime"
        assert "TensorRT not available" in model.reason
    finally:
        model.close()


@pytest.mark.parametrize("name", ["missing", "file.txt"])
def test_bad_model_paths(tmp_path: Path, name: str) -> None:
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BackendError, match=r"model\.path"):
        split_model_path(tmp_path / name)


def test_missing_precision_variant_names_the_fix(toy_package: Path) -> None:
    with pytest.raises(BackendError, match="fod quantize"):
        load_model(ModelConfig(path=toy_package, precision="int8", backend="onnxruntime", threshold=0.5))


def test_oversized_model_input_is_refused_before_allocation(tmp_path, toy_package, capsys):
    """Issue 14 item 10: a manifest claiming a 20000 px input is refused by load and --check-config."""
    import shutil

    from agent.backends import load_model
    from agent.cli import main
    from agent.config import ModelConfig
    from agent.errors import ConfigError
    from fod.package import ModelPackage

    dest = tmp_path / "huge"
    shutil.copytree(toy_package, dest)
    package = ModelPackage(dest)
    package.manifest.image_size = (20000, 20000)
    package.save()
    with pytest.raises(ConfigError, match="max_input_side_px"):
        load_model(ModelConfig(path=dest, threshold=0.5))
    assert main(["--model", str(dest), "--threshold", "0.5", "--check-config"]) == 2
    assert "20000x20000" in capsys.readouterr().err
