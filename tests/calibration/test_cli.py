"""``fod calibrate`` and ``fod quantize`` end to end on the toy FOD package (in-process CLI)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

import calibration.cli_quantize as cli_quantize
from calibration.gate import GateCriteria
from fod.cli import main
from fod.normalization import normalize_score
from fod.package import ModelPackage


def _manifest(pkg):
    return json.loads((pkg / "manifest.json").read_text())


def test_calibrate_mvtec_root_writes_threshold_report_and_histogram(toy_fod_package, mvtec_root, capsys):
    assert main(["calibrate", "--model", str(toy_fod_package), "--normal", str(mvtec_root)]) == 0
    out = capsys.readouterr().out
    assert "NOT demonstrable" in out  # 40 images cannot show 1e-3
    assert "recall 100.00%" in out
    cal = ModelPackage(toy_fod_package).manifest.calibration
    assert cal is not None
    assert cal.n_normal == 40
    assert cal.details["n_defect"] == 12
    assert cal.details["labelled"]["image_auroc"] == 1.0
    assert cal.details["fit"]["rule"] == "max_plus_margin"
    assert cal.far_upper_95 == pytest.approx(1 - 0.05 ** (1 / 40))
    assert normalize_score(cal.image_threshold, cal) == 0.5
    assert cal.pixel_threshold < cal.image_threshold
    assert "pixels" in cal.details  # masks found under ground_truth/
    assert (toy_fod_package / "calibration_scores.png").stat().st_size > 1000
    assert (toy_fod_package / "calibration_report.txt").read_text().startswith("fod calibrate report")


def test_calibrating_twice_replaces_and_says_so(toy_fod_package, mvtec_root, caplog):
    args = ["calibrate", "--model", str(toy_fod_package), "--normal", str(mvtec_root / "test" / "good")]
    assert main(args) == 0
    first = ModelPackage(toy_fod_package).manifest.calibration
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--margin-k", "3"]) == 0
    second = ModelPackage(toy_fod_package).manifest.calibration
    assert first is not None
    assert second is not None
    assert second.image_threshold > first.image_threshold
    assert "replacing the package's calibration" in caplog.text
    assert f"{first.image_threshold:.6g} -> {second.image_threshold:.6g}" in caplog.text
    assert "labelled" not in second.details  # plain folder of good images: no defects


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        ("few", [], "at least 5 are needed"),  # too few good images even for a rough threshold
        ("corrupt", [], "cannot decode"),  # an image of the wrong kind
        ("no_fp32", [], "no model.onnx in this package"),  # a package without FP32 model
        ("none", ["--min-images", "2"], "below the lowest accepted"),  # a minimum below the stated one
    ],
)
def test_calibrate_bad_input_is_a_clear_error(toy_fod_package, mvtec_root, tmp_path, capsys, setup, extra, message):
    normal = tmp_path / "good"
    shutil.copytree(mvtec_root / "test" / "good", normal)
    if setup == "few":
        for p in sorted(normal.iterdir())[3:]:
            p.unlink()
    elif setup == "corrupt":
        (normal / "zzz.png").write_text("not an image")
    elif setup == "no_fp32":
        manifest = _manifest(toy_fod_package)
        del manifest["files"]["model.onnx"]
        (toy_fod_package / "manifest.json").write_text(json.dumps(manifest))
    code = main(["calibrate", "--model", str(toy_fod_package), "--normal", str(normal), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_quantize_int8_writes_variant_with_report_and_hash(toy_fod_package, mvtec_root, capsys):
    assert main(["calibrate", "--model", str(toy_fod_package), "--normal", str(mvtec_root)]) == 0
    args = ["quantize", "--model", str(toy_fod_package), "--precision", "int8", "--calib", str(mvtec_root)]
    code = main([*args, "--bench-repeats", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy gate     : PASSED" in out
    assert "noise floor       : FP32 vs FP32 on +-1 grey level noise" in out
    assert "(batch 1, p50 of 2)" in out
    pkg = ModelPackage(toy_fod_package)  # verifies the new file's sha256
    entry = pkg.manifest.variants["int8"]
    assert entry["passed"] is True
    assert entry["gate"]["metrics"]["auroc_change"] == pytest.approx(0.0, abs=0.01)
    assert entry["gate"]["metrics"]["false_alarms_variant"] == 0
    assert entry["quantization"]["synthetic_defects"] is True
    assert entry["quantization"]["settings"]["scope"] == "transformer"
    assert entry["latency"]["speedup"] > 0
    assert pkg.onnx_path("int8").is_file()
    assert not list(toy_fod_package.glob("*.candidate.onnx"))


def test_quantize_fp16_with_plain_folders(toy_fod_package, mvtec_root):
    calib = mvtec_root / "train" / "good"
    args = ["quantize", "--model", str(toy_fod_package), "--precision", "fp16", "--calib", str(calib)]
    code = main([*args, "--val", str(mvtec_root), "--bench-repeats", "0"])
    assert code == 0
    entry = ModelPackage(toy_fod_package).manifest.variants["fp16"]
    assert entry["passed"] is True
    assert "latency" not in entry
    assert entry["gate"]["skipped"] == ["threshold checks: the package is not calibrated (run `fod calibrate` first)"]


def test_failing_gate_writes_nothing_unless_forced(toy_fod_package, mvtec_root, monkeypatch, capsys):
    monkeypatch.setattr(cli_quantize, "GateCriteria", lambda: GateCriteria(min_score_pearson=1.01))
    args = ["quantize", "--model", str(toy_fod_package), "--precision", "fp16", "--calib", str(mvtec_root)]
    args += ["--bench-repeats", "0"]
    assert main(args) == 2
    assert "failed the accuracy gate" in capsys.readouterr().err
    assert not (toy_fod_package / "model.fp16.onnx").exists()
    assert "fp16" not in _manifest(toy_fod_package)["variants"]
    assert main([*args, "--force"]) == 0
    entry = ModelPackage(toy_fod_package).manifest.variants["fp16"]
    assert entry["passed"] is False
    assert entry["forced"] is True


def test_quantize_refuses_a_too_small_calibration_set(toy_fod_package, mvtec_root, tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in sorted((mvtec_root / "train" / "good").iterdir())[:3]:
        shutil.copy(p, calib / p.name)
    code = main(["quantize", "--model", str(toy_fod_package), "--precision", "int8", "--calib", str(calib)])
    assert code == 2
    assert "at least 5 are needed" in capsys.readouterr().err


def test_calibrate_on_the_holdout_of_a_training_run(toy_fod_package, mvtec_root, tmp_path, caplog):
    # a small data set: the run kept 8 of its good images out of training; calibrate on exactly those
    train_good = mvtec_root / "train" / "good"
    held = sorted(p.name for p in train_good.iterdir())[:8]
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.json").write_text(json.dumps({"data": {"root": str(train_good)}, "holdout_files": held}))
    with caplog.at_level(logging.WARNING):
        code = main(["calibrate", "--model", str(toy_fod_package), "--normal", str(run), "--target-far", "0.01"])
    assert code == 0
    calibration = ModelPackage(toy_fod_package).manifest.calibration
    assert calibration is not None
    assert calibration.n_normal == 8
    assert "8 held-out good images: a small sample" in caplog.text
    assert "below 31 %" in caplog.text  # 1 - 0.05 ** (1 / 8): what 8 images without a false alarm can show


def test_calibrate_on_a_run_without_holdout_says_how_to_get_one(toy_fod_package, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.json").write_text(json.dumps({"data": {"root": str(tmp_path)}, "holdout_files": []}))
    assert main(["calibrate", "--model", str(toy_fod_package), "--normal", str(run)]) == 2
    assert "--holdout 0.3" in capsys.readouterr().err
