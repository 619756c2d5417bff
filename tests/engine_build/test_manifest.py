"""Engine manifest: write / read, find_engine, and every mismatch refused with the right message."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from engine_build.errors import EngineMismatchError
from engine_build.manifest import (
    ENGINE_SCHEMA_VERSION,
    default_engine_path,
    find_engine,
    load_engine_manifest,
    manifest_path,
    read_engine_manifest,
    rebuild_command,
)
from tests.engine_build.helpers import RUNTIME, copy_package, fake_engine, perturb_toy_onnx


@pytest.fixture
def pkg(toy_package: Path, tmp_path: Path) -> Path:
    return copy_package(toy_package, tmp_path / "pkg")


def test_roundtrip_and_sidecar_location(pkg: Path):
    engine = fake_engine(pkg)
    assert engine == pkg / "model.fp32.engine"
    assert manifest_path(engine) == pkg / "model.fp32.engine.json"
    raw = json.loads(manifest_path(engine).read_text())
    assert raw["schema_version"] == ENGINE_SCHEMA_VERSION
    assert raw["source_onnx"] == "model.onnx"
    manifest = load_engine_manifest(engine, runtime=RUNTIME)
    assert manifest.tensorrt_version == "10.3.0"
    assert manifest.image_size == (64, 64)
    assert read_engine_manifest(engine) == manifest


def test_find_engine_prefers_fastest_and_honours_precision(pkg: Path):
    assert find_engine(pkg) is None
    fake_engine(pkg, "fp32")
    assert find_engine(pkg) == pkg / "model.fp32.engine"
    (pkg / "model.int8.engine").write_bytes(b"x")
    assert find_engine(pkg) == pkg / "model.int8.engine"
    assert find_engine(pkg, "fp32") == pkg / "model.fp32.engine"
    assert find_engine(pkg, "fp16") is None
    with pytest.raises(EngineMismatchError, match="unknown engine precision 'bf16'"):
        find_engine(pkg, "bf16")


# (field changed on this box, what the message must name, value of the engine, value of the box)
MISMATCHES = [
    ({"tensorrt_version": "10.7.0"}, "TensorRT version", "10.3.0", "10.7.0"),
    ({"gpu_name": "NVIDIA GeForce RTX 4090"}, "GPU", "Orin", "NVIDIA GeForce RTX 4090"),
    ({"compute_capability": "8.9"}, "compute capability", "8.7", "8.9"),
]


@pytest.mark.parametrize(("change", "label", "engine_value", "box_value"), MISMATCHES)
def test_runtime_mismatch_names_difference_and_rebuild(pkg: Path, change, label, engine_value, box_value):
    engine = fake_engine(pkg)
    box = replace(RUNTIME, **change)
    with pytest.raises(EngineMismatchError) as info:
        load_engine_manifest(engine, runtime=box)
    msg = str(info.value)
    assert f"{label}: engine built" in msg
    assert engine_value in msg
    assert box_value in msg
    assert f"fod build --model {pkg} --precision fp32" in msg
    assert info.value.rebuild_command == f"fod build --model {pkg} --precision fp32"
    assert len(info.value.differences) == 1


def test_changed_source_onnx_is_refused(pkg: Path):
    engine = fake_engine(pkg)
    perturb_toy_onnx(pkg / "model.onnx")  # the package was re-exported after the build
    with pytest.raises(
        EngineMismatchError, match=r"source ONNX: .*model.onnx changed since the build"
    ) as info:
        load_engine_manifest(engine, runtime=RUNTIME)
    assert "fod build --model" in str(info.value)


def test_missing_source_onnx_is_refused(pkg: Path):
    engine = fake_engine(pkg)
    (pkg / "model.onnx").unlink()
    with pytest.raises(EngineMismatchError, match=r"source ONNX: .* not found"):
        load_engine_manifest(engine, runtime=RUNTIME)


def test_corrupt_engine_is_refused(pkg: Path):
    engine = fake_engine(pkg)
    engine.write_bytes(b"truncated")
    with pytest.raises(EngineMismatchError, match=r"engine file: sha256 .* corrupt or was replaced"):
        load_engine_manifest(engine, runtime=RUNTIME)


def test_all_differences_are_listed_at_once(pkg: Path):
    engine = fake_engine(pkg)
    box = replace(RUNTIME, tensorrt_version="11.0.0", gpu_name="H100", compute_capability="9.0")
    with pytest.raises(EngineMismatchError) as info:
        load_engine_manifest(engine, runtime=box, precision="fp16", image_size=(32, 32))
    labels = [d.split(":")[0] for d in info.value.differences]
    assert labels == ["TensorRT version", "GPU", "compute capability", "precision", "input size"]
    assert str(info.value).count("\n  - ") == 5


def test_engine_outside_package_uses_recorded_package_and_out_flag(pkg: Path, tmp_path: Path):
    out = tmp_path / "engines" / "line3.engine"
    out.parent.mkdir()
    engine = fake_engine(pkg, engine_path=out)
    assert load_engine_manifest(engine, runtime=RUNTIME).source_onnx == "model.onnx"
    with pytest.raises(EngineMismatchError) as info:
        load_engine_manifest(engine, runtime=replace(RUNTIME, tensorrt_version="10.4.0"))
    assert info.value.rebuild_command == f"fod build --model {pkg.resolve()} --precision fp32 --out {out}"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "missing, so model.fp32.engine cannot be checked"),
        (lambda p: p.write_text("{not json"), "not valid JSON"),
        (lambda p: p.write_text(json.dumps({"schema_version": 99})), "schema_version 99 is newer"),
        (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "extra": 1})), "key 'extra'"),
    ],
)
def test_unreadable_manifest_says_how_to_rebuild(pkg: Path, damage, message):
    engine = fake_engine(pkg)
    damage(manifest_path(engine))
    with pytest.raises(EngineMismatchError, match=message) as info:
        read_engine_manifest(engine)
    assert f"fod build --model {pkg} --precision fp32" in str(info.value)


def test_missing_engine(pkg: Path):
    with pytest.raises(EngineMismatchError, match="engine not found; build it with `fod build"):
        read_engine_manifest(default_engine_path(pkg, "fp16"))


def test_rebuild_command_quotes_paths():
    cmd = rebuild_command(Path("/data/my pkg"), "int8")
    assert cmd == "fod build --model '/data/my pkg' --precision int8"
