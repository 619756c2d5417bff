"""Export: the ONNX graph, its parity with PyTorch, the package and its failure modes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from fod.cli import main
from fod.errors import CheckpointError, InputError, PackageError
from fod.package import MANIFEST_NAME, SCHEMA_VERSION, ModelPackage
from fod.preprocess import to_model_input
from fod.runner import OnnxRuntimeRunner
from fod.torch_runner import TorchRunner
from tests.fod.conftest import synthetic_good_images


def test_graph_contract_and_ops(tiny_fod_package: Path):
    model = onnx.load(str(tiny_fod_package / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Einsum", "Tile", "Loop", "If"}
    (inp,) = model.graph.input
    assert inp.name == "image"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", 64, 64, 3]
    assert [o.name for o in model.graph.output] == ["anomaly_map", "score"]
    # intra sigma/target and entropies are training-only: 4 softmax per layer-level pair
    # (intra attn, inter attn, inter target rows and columns) x 3 layers x 2 levels + 2 patch softmaxes
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 26


def test_manifest_records_hashes_and_parity(tiny_fod_package: Path):
    pkg = ModelPackage(tiny_fod_package)
    m = pkg.manifest
    assert m.schema_version == SCHEMA_VERSION
    assert m.image_size == (64, 64)
    assert m.input.channel_order == "BGR"
    assert m.parity["passed"] is True
    assert m.parity["score_max_rel_err"] < 1e-3
    assert m.parity["batch_max_rel_err"] < 1e-4
    assert set(m.files) == {"model.onnx"}
    assert m.export["opset"] == 17


def test_onnxruntime_matches_pytorch_and_is_batch_invariant(tiny_run: Path, tiny_fod_package: Path):
    images = synthetic_good_images(4, 64, seed=7)
    images[1, 20:30, 20:30] = 255  # a defect-like blob
    with TorchRunner(tiny_run, device="cpu") as torch_runner, OnnxRuntimeRunner(
        tiny_fod_package / "model.onnx", (64, 64)
    ) as ort_runner:
        ref = torch_runner.infer(images)
        out = ort_runner.infer(images)
        alone = ort_runner.infer(images[1:2])
    scale = np.abs(ref.anomaly_map).max()
    assert np.abs(out.anomaly_map - ref.anomaly_map).max() / scale < 1e-3
    np.testing.assert_allclose(out.score, ref.score, rtol=1e-3)
    np.testing.assert_allclose(alone.anomaly_map[0], out.anomaly_map[1], rtol=1e-4, atol=1e-4 * scale)
    assert out.anomaly_map.shape == (4, 1, 64, 64)
    assert out.score.dtype == np.float32


def test_runner_takes_any_frame_size_through_to_model_input(tiny_fod_package: Path):
    pkg = ModelPackage(tiny_fod_package)
    with OnnxRuntimeRunner(pkg.onnx_path(), pkg.image_size) as runner:
        gray = np.full((120, 200), 128, np.uint8)
        out = runner.infer(to_model_input(gray, pkg.image_size)[None])
        assert out.anomaly_map.shape == (1, 1, *pkg.image_size)
        assert np.isfinite(out.score).all()
        assert out.inference_ms > 0
        with pytest.raises(InputError, match="uint8"):
            to_model_input(np.zeros((64, 64, 3), np.float32), pkg.image_size)
        with pytest.raises(InputError, match="channels"):
            to_model_input(np.zeros((64, 64, 2), np.uint8), pkg.image_size)


def test_edited_onnx_is_refused(tiny_fod_package: Path, tmp_path: Path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_fod_package, pkg)
    with open(pkg / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(PackageError, match=r"model\.onnx.*sha256"):
        ModelPackage(pkg)
    (pkg / "model.onnx").unlink()
    with pytest.raises(PackageError, match="missing"):
        ModelPackage(pkg)


def test_newer_schema_is_refused(tiny_fod_package: Path, tmp_path: Path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_fod_package, pkg)
    manifest = json.loads((pkg / MANIFEST_NAME).read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (pkg / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="newer than this software"):
        ModelPackage(pkg)


def test_checkpoint_of_another_version_is_refused(tiny_run: Path, tmp_path: Path):
    import torch

    payload = torch.load(tiny_run / "checkpoint.pt", weights_only=False)
    payload["version"] = 99
    torch.save(payload, tmp_path / "checkpoint.pt")
    from fod.checkpoint import load_checkpoint

    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path)


def test_export_cli_writes_a_package(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["export", "--model", str(tiny_run), "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "parity" in out
    assert "MatMul" in out
    assert ModelPackage(tmp_path / "p").manifest.parity["passed"]
    # a folder without checkpoint: exit 2, message names the file
    assert main(["export", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "q")]) == 2
    assert "checkpoint.pt" in capsys.readouterr().err


def test_export_prints_no_constant_folding_warning(tiny_run: Path, tmp_path: Path) -> None:
    import warnings

    from fod.checkpoint import load_checkpoint
    from fod.export import export_onnx

    model, _ = load_checkpoint(tiny_run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file()
    assert not [w for w in caught if "Constant folding" in str(w.message)]
