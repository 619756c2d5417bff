"""``fod build``: the error path without TensorRT (real), and the whole build on the fake of fake_trt.py."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine_build.errors import EngineMismatchError
from engine_build.manifest import RuntimeInfo, find_engine, load_engine_manifest, manifest_path
from engine_build.runner import tensorrt_available
from fod.cli import main
from fod.package import ModelPackage
from tests.engine_build import fake_trt
from tests.engine_build.helpers import copy_package

FAKE_BOX = RuntimeInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")


@pytest.fixture
def pkg(toy_package: Path, tmp_path: Path) -> Path:
    return copy_package(toy_package, tmp_path / "pkg")


# --------------------------------------------------------------------------- real: no TensorRT here


@pytest.mark.skipif(tensorrt_available()[0], reason="TensorRT and a GPU are present")
def test_build_without_tensorrt_exits_2_with_install_help(pkg: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["build", "--model", str(pkg), "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fod build: error: `fod build` cannot run on this machine")
    assert "sudo apt install python3-libnvinfer" in err  # Jetson
    assert "pip install '.[cpu,tensorrt]'" in err  # x86
    assert not list(pkg.glob("*.engine*"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--precision", "fp16"], "no model.fp16.onnx in this package; create it with `fod quantize"),
        (["--precision", "fp32", "--max-batch", "0"], "--max-batch 0: must be at least 1"),
        (["--precision", "fp32", "--opt-level", "9"], "--opt-level 9: TensorRT accepts 0..5"),
        (
            ["--precision", "fp32", "--parity-images", "/nonexistent"],
            "--parity-images /nonexistent: not a folder",
        ),
    ],
)
def test_bad_arguments_exit_2_before_any_build(pkg: Path, capsys: pytest.CaptureFixture[str], extra, message):
    assert main(["build", "--model", str(pkg), *extra]) == 2
    assert message in capsys.readouterr().err


def test_precision_is_required_and_checked(pkg: Path):
    with pytest.raises(SystemExit):
        main(["build", "--model", str(pkg)])
    with pytest.raises(SystemExit):
        main(["build", "--model", str(pkg), "--precision", "bf16"])


# ------------------------------------------------------------------ the whole build, on the fake


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> fake_trt.FakeState:
    return fake_trt.install(monkeypatch)


def test_build_writes_engine_and_manifest(fake, pkg: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    cache = tmp_path / "trt.cache"
    argv = [
        "build",
        "--model",
        str(pkg),
        "--precision",
        "fp32",
        "--max-batch",
        "3",
        "--timing-cache",
        str(cache),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    engine = pkg / "model.fp32.engine"
    assert f"engine:   {engine.resolve()}" in out
    assert "parity:   parity tensorrt vs onnxruntime (fp32, 8 frames) passed" in out
    assert find_engine(pkg) == engine
    assert sorted(p.name for p in pkg.iterdir() if "engine" in p.name) == [
        "model.fp32.engine",
        "model.fp32.engine.json",
    ]
    raw = json.loads(manifest_path(engine).read_text())
    assert raw["tensorrt_version"] == "10.3.0"
    assert raw["gpu_name"] == "Orin"
    assert raw["compute_capability"] == "8.7"
    assert raw["precision"] == "fp32"
    assert raw["source_onnx"] == "model.onnx"
    assert raw["source_onnx_sha256"] == ModelPackage(pkg).manifest.files["model.onnx"]
    assert raw["build_settings"]["max_batch"] == 3
    assert raw["build_settings"]["strongly_typed"] is True
    assert raw["parity"]["passed"] is True
    assert raw["parity"]["n_images"] == 8
    assert cache.is_file()
    assert load_engine_manifest(engine, runtime=FAKE_BOX).engine_file == "model.fp32.engine"
    assert [e for e in fake.executions if e]
    assert max(fake.executions) <= 3


def test_failed_parity_keeps_the_previous_engine(fake, pkg: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["build", "--model", str(pkg), "--precision", "fp32"]) == 0
    engine = pkg / "model.fp32.engine"
    good_plan, good_manifest = engine.read_bytes(), manifest_path(engine).read_text()
    fake.offset = 0.05  # the next engine is "miscompiled"
    assert main(["build", "--model", str(pkg), "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "parity tensorrt vs onnxruntime (fp32, 8 frames) FAILED" in err
    assert "The engine was not written" in err
    assert "--force" in err
    assert engine.read_bytes() == good_plan
    assert manifest_path(engine).read_text() == good_manifest
    assert not list(pkg.glob("*.new"))


def test_force_keeps_a_failing_engine_and_says_so(fake, pkg: Path):
    fake.offset = 0.05
    assert main(["build", "--model", str(pkg), "--precision", "fp32", "--force"]) == 0
    raw = json.loads(manifest_path(pkg / "model.fp32.engine").read_text())
    assert raw["parity"]["passed"] is False
    assert raw["parity"]["forced"] is True


def test_out_elsewhere_and_real_parity_images(fake, pkg: Path, tmp_path: Path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), np.full((40, 70, 3), 60 + 60 * i, np.uint8))
    out = tmp_path / "engines" / "line1.engine"
    argv = [
        "build",
        "--model",
        str(pkg),
        "--precision",
        "fp32",
        "--out",
        str(out),
        "--parity-images",
        str(images),
    ]
    assert main(argv) == 0
    raw = json.loads(manifest_path(out).read_text())
    assert raw["parity"]["n_images"] == 3
    assert raw["package_dir"] == str(pkg.resolve())
    assert find_engine(pkg) is None  # not in the package folder
    other_box = RuntimeInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.6")
    with pytest.raises(EngineMismatchError) as info:
        load_engine_manifest(out, runtime=other_box)
    assert info.value.rebuild_command == f"fod build --model {pkg.resolve()} --precision fp32 --out {out}"


def test_missing_onnxruntime_is_reported_before_building(
    fake, pkg: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find_spec(name)
    )
    assert main(["build", "--model", str(pkg), "--precision", "fp32"]) == 2
    assert "`pip install onnxruntime`" in capsys.readouterr().err
    assert not [c for c in fake.calls if c[0] == "build"]  # no build of minutes first
    assert main(["build", "--model", str(pkg), "--precision", "fp32", "--force"]) == 0
    raw = json.loads(manifest_path(pkg / "model.fp32.engine").read_text())
    assert raw["parity"]["skipped"] == "onnxruntime not installed"
