"""A tiny model package with the real graph contract, for tests that must not train a model.

Graph: ``image`` uint8 [N, H, W, 3] -> ``anomaly_map`` float32 [N, 1, H, W] = mean over channels of
``|x - 128| / 128``, ``score`` float32 [N] = max of the map. Bright or dark blobs on a mid-grey
frame therefore score high, a uniform grey frame scores 0. Built with ``onnx.helper`` (no torch).
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from fod.package import (
    SCHEMA_VERSION,
    Calibration,
    DataFingerprint,
    InputSpec,
    Manifest,
    ModelPackage,
    TensorSpec,
    sha256_file,
    write_manifest,
)


def make_toy_onnx(path: Path, opset: int = 18) -> None:
    """Write the toy graph to ``path``."""
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["xf", "c128"], ["centered"]),
        helper.make_node("Abs", ["centered"], ["absdev"]),
        helper.make_node("Div", ["absdev", "c128"], ["scaled"]),
        helper.make_node("ReduceMean", ["scaled", "axis3"], ["mean_c"], keepdims=1),  # [N,H,W,1]
        helper.make_node("Transpose", ["mean_c"], ["anomaly_map"], perm=[0, 3, 1, 2]),
        helper.make_node("ReduceMax", ["anomaly_map", "axes123"], ["score"], keepdims=0),
    ]
    inits = [
        helper.make_tensor("c128", TensorProto.FLOAT, [], [128.0]),
        helper.make_tensor("axis3", TensorProto.INT64, [1], [3]),
        helper.make_tensor("axes123", TensorProto.INT64, [3], [1, 2, 3]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy_fod",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", "H", "W", 3])],
        [
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", 1, "H", "W"]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_package_manifest(root: Path, image_size: tuple[int, int], *, model_name: str, backbone: str) -> None:
    """Write a valid ``manifest.json`` for ``root/model.onnx`` with the real graph contract."""
    h, w = image_size
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model_name=model_name,
        created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        image_size=(h, w),
        backbone=backbone,
        input=InputSpec(name="image", dtype="uint8", shape=["N", h, w, 3]),
        outputs=[
            TensorSpec(name="anomaly_map", dtype="float32", shape=["N", 1, h, w]),
            TensorSpec(name="score", dtype="float32", shape=["N"]),
        ],
        files={"model.onnx": sha256_file(root / "model.onnx")},
        checkpoint_sha256="0" * 64,
        training_data=DataFingerprint(count=0, sha256="0" * 64, root="synthetic"),
        export={"opset": 18, "tool": "onnx.helper"},
    )
    write_manifest(root, manifest)


def make_toy_package(root: Path, image_size: tuple[int, int] = (64, 64)) -> Path:
    """Create a complete, valid model package with the toy graph in ``root``; return ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    make_toy_onnx(root / "model.onnx")
    write_package_manifest(root, image_size, model_name="toy", backbone="none")
    return root


def calibrated_copy(package: Path, dest: Path, threshold: float = 0.3) -> Path:
    """Copy ``package`` to ``dest`` and write a calibration with image threshold ``threshold``; return ``dest``."""
    shutil.copytree(package, dest)
    copy = ModelPackage(dest)
    copy.manifest.calibration = Calibration(
        image_threshold=threshold,
        pixel_threshold=threshold / 2,
        norm_min=0.0,
        norm_max=1.0,
        method="test",
        target_far=0.001,
        n_normal=100,
    )
    copy.save()
    return dest
