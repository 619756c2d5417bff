"""INT8 Q/DQ and FP16 variants of the toy FOD graph: what is quantized, what stays FP32, and accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from sklearn.metrics import roc_auc_score

from calibration.graph import fp16_blocked_nodes, name_nodes, select_int8_nodes
from calibration.quantize import Int8Settings, convert_fp16, measure_latency, quantize_int8
from calibration.reader import ImageCalibrationDataReader, resolve_calibration_images, resolve_evaluation_set
from calibration.scoring import score_images
from fod.runner import OnnxRuntimeRunner
from tests.calibration.toy_fod import make_toy_fod_model

SIZE = (64, 64)


def test_int8_selection_keeps_attention_and_scoring_tail_in_fp32():
    model = make_toy_fod_model(SIZE)
    name_nodes(model)
    sel = select_int8_nodes(model, scope="all")
    assert set(sel.quantize) == {"Conv_4", "Conv_6", "proj", "head"}
    assert sel.excluded == {
        "attn_logits": "output feeds a softmax (attention logits / RBF sigma)",
        "attn_values": "input is softmax probabilities",
        "sigma_proj": "output feeds a softmax (attention logits / RBF sigma)",
        "smoothing": "scoring tail (after the last MatMul)",
    }
    keep_head = select_int8_nodes(model, keep_last_matmul=True, scope="all")
    assert "head" in keep_head.excluded
    assert "head" not in keep_head.quantize
    backbone = select_int8_nodes(model, scope="backbone")
    assert set(backbone.quantize) == {"Conv_4", "Conv_6"}
    assert backbone.excluded["proj"].startswith("scope backbone")
    transformer = select_int8_nodes(model, scope="transformer")
    assert set(transformer.quantize) == {"proj", "head"}
    assert transformer.excluded["Conv_4"].startswith("scope transformer")


def test_fp16_block_list_covers_softmax_surroundings_and_tail():
    model = make_toy_fod_model(SIZE)
    name_nodes(model)
    blocked = fp16_blocked_nodes(model)
    assert blocked["smoothing"] == "scoring tail"
    kinds = {n.name: n.op_type for n in model.graph.node}
    assert any(kinds[name] == "Mul" and why == "feeds a softmax" for name, why in blocked.items())  # logit scale
    assert any(kinds[name] == "Log" for name in blocked)  # the KL divergence
    assert "proj" not in blocked
    assert "Conv_4" not in blocked


def test_fp16_keeps_bank_distances_that_are_scores_in_fp32():
    from onnx import TensorProto, helper, numpy_helper

    bank = numpy_helper.from_array(np.ones((4, 3), np.float32), "bank")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "bank"], ["dot_min"], name="score_distance"),
         helper.make_node("Mul", ["dot_min", "two"], ["scaled"], name="scale"),
         helper.make_node("ReduceMin", ["scaled"], ["score"], name="score_min", keepdims=0),
         helper.make_node("MatMul", ["x", "bank"], ["dot_arg"], name="search_distance"),
         helper.make_node("ArgMin", ["dot_arg"], ["index"], name="search", axis=1),
         helper.make_node("MatMul", ["x", "bank"], ["features"], name="projection")],
        "bank_distances",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("index", TensorProto.INT64, [2]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, [2, 3])],
        [bank, numpy_helper.from_array(np.float32(2.0), "two")],
    )
    model = helper.make_model(graph)
    name_nodes(model)
    blocked = fp16_blocked_nodes(model)
    assert blocked["score_distance"] == "bank distance whose minimum is a score"  # regional / global level
    assert "search_distance" not in blocked  # the nearest-patch search only picks a patch: FP16 speed kept
    assert "projection" not in blocked


@pytest.fixture(scope="module")
def variants(toy_fod_package_src: Path, mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("variants")
    fp32 = toy_fod_package_src / "model.onnx"
    calib = resolve_calibration_images(mvtec_root, max_images=20)
    paths = {"fp32": fp32}
    for name, augment in (("int8", True), ("int8_good_only", False)):
        paths[name] = out / f"{name}.onnx"
        reader = ImageCalibrationDataReader(calib, SIZE, batch_size=4, augment=augment)
        quantize_int8(fp32, paths[name], reader, Int8Settings(scope="all"))
    paths["fp16"] = out / "fp16.onnx"
    convert_fp16(fp32, paths["fp16"])
    return paths


def _scores(path: Path, mvtec_root: Path) -> tuple[np.ndarray, np.ndarray]:
    images = resolve_evaluation_set(mvtec_root)
    labels = np.r_[np.zeros(len(images.good)), np.ones(len(images.defects))]
    with OnnxRuntimeRunner(path, SIZE) as runner:
        scored = score_images(runner, images.good + [d.path for d in images.defects])
    return scored.scores, labels


def test_int8_graph_is_symmetric_qdq_with_fp32_islands(variants):
    model = onnx.load(str(variants["int8"]))
    nodes = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq, "no Q/DQ nodes"
    for node in dq:  # TensorRT needs int8 with zero point 0 everywhere
        zp = inits[node.input[2]]
        assert zp.dtype == np.int8
        assert not zp.any()
    for name in ("proj", "head", "Conv_4"):
        assert any(producers[x].op_type == "DequantizeLinear" for x in nodes[name].input if x in producers)
    for name in ("attn_logits", "attn_values", "smoothing"):
        assert all(producers[x].op_type != "DequantizeLinear" for x in nodes[name].input if x in producers)
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    assert producers[softmax.input[0]].op_type != "DequantizeLinear"
    # the reconstruction error reads the FP32 tokens, not their INT8-rounded copy
    diff = next(n for n in model.graph.node if n.op_type == "Sub" and "recon" in n.input)
    assert producers[diff.input[0]].op_type == "Transpose"


def test_int8_tracks_fp32_and_synthetic_defects_keep_the_anomalies(variants, mvtec_root):
    s32, labels = _scores(variants["fp32"], mvtec_root)
    s8, _ = _scores(variants["int8"], mvtec_root)
    s8_good_only, _ = _scores(variants["int8_good_only"], mvtec_root)
    assert roc_auc_score(labels, s32) == 1.0
    assert np.corrcoef(s32, s8)[0, 1] > 0.999
    assert roc_auc_score(labels, s8) == 1.0
    # ranges from good images alone clip the blobs' activations: the anomaly signal collapses
    assert roc_auc_score(labels, s8_good_only) < 0.95


def test_cpu_target_uses_uint8_activations(toy_fod_package_src, mvtec_root, tmp_path):
    calib = resolve_calibration_images(mvtec_root, max_images=8)
    out = tmp_path / "cpu.onnx"
    info = quantize_int8(
        toy_fod_package_src / "model.onnx",
        out,
        ImageCalibrationDataReader(calib, SIZE, batch_size=4),
        Int8Settings(target="cpu", preprocess=False, scope="all"),
    )
    assert info["settings"]["target"] == "cpu"
    assert info["quantized_nodes"] == 4
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert any(z.dtype == np.uint8 for z in zps)


def test_fp16_runs_on_ort_cpu_with_fp32_io_and_matches(variants, mvtec_root):
    model = onnx.load(str(variants["fp16"]))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    s32, _ = _scores(variants["fp32"], mvtec_root)
    s16, _ = _scores(variants["fp16"], mvtec_root)
    np.testing.assert_allclose(s16, s32, rtol=1e-2)


def test_fp16_rounding_between_fp32_nodes_is_removed(toy_fod_package_src, tmp_path, monkeypatch):
    """The converter rounds tensors between two FP32-blocked nodes to FP16: sigma^2 = 1e-8 became 0."""
    import calibration.quantize as quantize

    x = np.full((2, *SIZE, 3), 128, np.uint8)
    convert_fp16(toy_fod_package_src / "model.onnx", tmp_path / "fixed.onnx")
    monkeypatch.setattr(quantize, "remove_fp16_round_trips", lambda model: 0)
    convert_fp16(toy_fod_package_src / "model.onnx", tmp_path / "raw.onnx")
    with OnnxRuntimeRunner(tmp_path / "raw.onnx", SIZE) as runner:
        assert np.isnan(runner.infer(x).score).all()
    with OnnxRuntimeRunner(tmp_path / "fixed.onnx", SIZE) as runner:
        assert np.isfinite(runner.infer(x).score).all()


def test_measure_latency_reports_timings(variants):
    lat = measure_latency(variants["fp32"], SIZE, batch=2, repeats=3)
    assert lat["batch"] == 2
    assert lat["calls"] == 3
    assert lat["provider"] == "CPUExecutionProvider"
    assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p95_ms"] <= lat["max_ms"]
    assert lat["per_frame_ms"] == pytest.approx(lat["p50_ms"] / 2, rel=1e-2)


def test_int8_keeps_the_input_flat_field_in_fp32(tmp_path: Path):
    import torch

    from fod.checkpoint import save_checkpoint
    from fod.export import export_package
    from fod.model import FODConfig, FODModel

    torch.manual_seed(0)
    config = FODConfig(image_size=64, levels=((16,),), d_models=(16,), heads=2, layers=1, ffn_mult=2,
                       intensity=(110.0, 30.0), flat_sigma=64 / 12)
    save_checkpoint(tmp_path / "run", FODModel(config, pretrained=False).eval(),
                    {"data": {"count": 2, "sha256": "0" * 64, "root": "synthetic"}})
    export_package(tmp_path / "run", tmp_path / "pkg")
    model = onnx.load(str(tmp_path / "pkg" / "model.onnx"))
    name_nodes(model)
    sel = select_int8_nodes(model, scope="all")
    flat = [name for name, why in sel.excluded.items() if why == "one-channel filter (input flat field)"]
    assert len(flat) == 2  # the separable blur: one horizontal, one vertical Conv
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert sum(name in sel.quantize for name in convs) > 10  # the backbone's convolutions are still INT8


@pytest.mark.parametrize("pick", ["ArgMin", "ReduceMin"])
def test_int8_selection_keeps_the_nearest_patch_search_in_fp32(pick: str):
    """The bank distances feed an ArgMin (the nearest-patch reference) or a ReduceMin (the regional
    level score): INT8 rounding would retrieve other patches or move the score (rule 7)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    bank = numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "bank")
    bank_norm = numpy_helper.from_array(rng.normal(size=(16,)).astype(np.float32), "bank_norm")
    proj_w = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "proj_w")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [
        helper.make_node("MatMul", ["x", "proj_w"], ["t"], name="proj"),
        helper.make_node("MatMul", ["t", "bank"], ["xb"], name="search"),
        helper.make_node("Mul", ["xb", "two"], ["xb2"], name="scale"),
        helper.make_node("Sub", ["bank_norm", "xb2"], ["dist"], name="dist"),
        helper.make_node(pick, ["dist"], ["idx"], name="pick", axis=-1, keepdims=0) if pick == "ArgMin"
        else helper.make_node(pick, ["dist"], ["idx"], name="pick", axes=[-1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "search", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("idx", TensorProto.INT64 if pick == "ArgMin" else TensorProto.FLOAT, [1, 4])],
        [bank, bank_norm, proj_w, two],
    )
    sel = select_int8_nodes(helper.make_model(graph), scope="all")
    assert sel.excluded == {"search": "output feeds an ArgMin / ReduceMin (nearest-patch search)"}
    assert sel.quantize == ["proj"]
