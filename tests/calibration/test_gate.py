"""The accuracy gate against real ONNX Runtime sessions: identical, scaled and unrelated variants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from calibration.gate import GateCriteria, run_gate
from calibration.reader import resolve_evaluation_set
from fod.package import Calibration
from fod.runner import OnnxRuntimeRunner
from tests.calibration.toy_fod import make_toy_fod_model

SIZE = (64, 64)


def _scaled_variant(path: Path, factor: float) -> Path:
    """The toy graph with its anomaly map (hence its score) multiplied by ``factor``."""
    model = make_toy_fod_model(SIZE)
    for node in model.graph.node:
        if node.name == "smoothing":
            node.output[0] = "map_raw"
    model.graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "factor"))
    idx = next(i for i, n in enumerate(model.graph.node) if n.name == "smoothing")
    model.graph.node.insert(idx + 1, helper.make_node("Mul", ["map_raw", "factor"], ["anomaly_map"]))
    onnx.save(model, str(path))
    return path


def _calibration(threshold: float) -> Calibration:
    return Calibration(
        image_threshold=threshold,
        pixel_threshold=threshold,
        norm_min=0.0,
        norm_max=2 * threshold,
        method="test",
        target_far=1e-3,
        n_normal=40,
    )


@pytest.fixture(scope="module")
def images(mvtec_root):
    return resolve_evaluation_set(mvtec_root)


def _gate(fp32: Path, variant: Path, images, **kw):
    return run_gate(
        "int8",
        OnnxRuntimeRunner(fp32, SIZE),
        OnnxRuntimeRunner(variant, SIZE),
        images.good,
        [d.path for d in images.defects],
        **kw,
    )


def test_identical_variant_passes_every_check(toy_fod_package_src, images):
    fp32 = toy_fod_package_src / "model.onnx"
    report = _gate(fp32, fp32, images, calibration=_calibration(0.4))
    assert report.passed, report.failures
    m = report.metrics
    assert m["score_pearson"] == pytest.approx(1.0)
    assert m["map_max_rel_err"] == 0.0
    assert m["auroc_change"] == 0.0
    assert m["verdict_agreement"] == 1.0
    assert m["n_images"] == 52
    assert report.skipped == []
    # the toy's scores move under +-1 grey level, but far less than the variants below
    assert 0.9 < m["fp32_noise_floor"]["score_pearson"] < 1.0
    assert abs(m["fp32_noise_floor"]["auroc_change"]) <= 0.05


def test_scaled_scores_keep_correlation_but_break_maps_and_threshold(toy_fod_package_src, images, tmp_path):
    fp32 = toy_fod_package_src / "model.onnx"
    variant = _scaled_variant(tmp_path / "scaled.onnx", 1.5)
    report = _gate(fp32, variant, images, calibration=_calibration(0.4))
    assert not report.passed
    assert report.metrics["score_spearman"] == pytest.approx(1.0)
    assert report.metrics["auroc_change"] == 0.0
    text = "\n".join(report.failures)
    assert "max map error" in text
    # good scores 0.33-0.36, x 1.5 > 0.4: every good image becomes a false alarm at the FP32 threshold
    assert "false alarms on 40 good images" in text
    assert report.metrics["false_alarms_variant"] == 40
    assert report.metrics["false_alarms_fp32"] == 0


def test_lenient_criteria_and_missing_labels_or_calibration_are_reported(toy_fod_package_src, images, tmp_path):
    fp32 = toy_fod_package_src / "model.onnx"
    variant = _scaled_variant(tmp_path / "scaled.onnx", 1.001)
    report = run_gate(
        "fp16",
        OnnxRuntimeRunner(fp32, SIZE),
        OnnxRuntimeRunner(variant, SIZE),
        images.good,
        None,
        criteria=GateCriteria(max_map_error=0.01),
    )
    assert report.passed, report.failures
    assert any("AUROC" in s for s in report.skipped)
    assert any("not calibrated" in s for s in report.skipped)
    assert report.to_dict()["precision"] == "fp16"


def test_nan_variant_fails_cleanly(toy_fod_package_src, images, tmp_path, monkeypatch):
    import calibration.quantize as quantize

    monkeypatch.setattr(quantize, "remove_fp16_round_trips", lambda model: 0)
    quantize.convert_fp16(toy_fod_package_src / "model.onnx", tmp_path / "nan.onnx")
    report = _gate(toy_fod_package_src / "model.onnx", tmp_path / "nan.onnx", images, calibration=_calibration(0.4))
    assert not report.passed
    assert report.metrics["nonfinite_scores"] == 52
    assert any("NaN/inf image scores" in line for line in report.failures)
    assert report.to_dict()["metrics"]["auroc_variant"] == 0.5  # NaN ranks below everything: no detection
