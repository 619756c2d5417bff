"""fod.evaluate and `fod eval` on synthetic MVTec folders with the toy package (real ONNX Runtime)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from fod.cli import main
from fod.errors import DataError, FodError
from fod.evaluate import EvalReport, evaluate, save_grid_png
from fod.package import ModelPackage
from fod.runner import OnnxRuntimeRunner, Runner
from tests.fod.mvtec_synth import make_mvtec


def _toy_runner(package: Path) -> OnnxRuntimeRunner:
    pkg = ModelPackage(package)
    return OnnxRuntimeRunner(pkg.onnx_path(), pkg.image_size, intra_op_threads=1)


class _FakeRunner(Runner):
    """Returns a fixed map per call (or NaN / a wrong shape) and counts calls."""

    name = "fake"

    def __init__(self, *, mode: str = "ok") -> None:
        super().__init__()
        self.image_size = (64, 64)
        self.mode = mode
        self.calls = 0

    def _activate_impl(self) -> None:
        pass

    def _deactivate_impl(self) -> None:
        pass

    def _infer_impl(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        n = len(images)
        maps = np.zeros((n, 1, 64, 64), np.float32)
        if self.mode == "nan":
            maps[-1, 0, 3, 3] = np.nan
        if self.mode == "shape":
            maps = maps[:, :, :32]
        return maps, maps.reshape(n, -1).max(axis=1)


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 good, 3 bright-blob defects (found), 2 flat "missed" defects (score 0, below every good image)."""
    return make_mvtec(
        tmp_path_factory.mktemp("mixed"),
        defects={"blob": ("blob", 3), "missed": ("missed", 2)},
        with_train=False,
    )


@pytest.fixture(scope="module")
def mixed_report(toy_package: Path, mixed_data: Path) -> EvalReport:
    return evaluate(_toy_runner(toy_package), mixed_data, batch_size=3, progress=False)


def test_per_type_metrics_compare_each_type_with_all_good_images(mixed_report: EvalReport) -> None:
    blob, missed = mixed_report.per_type["blob"], mixed_report.per_type["missed"]
    assert (blob.n_good, blob.n_defective, missed.n_good, missed.n_defective) == (4, 3, 4, 2)
    assert (blob.image_auroc, blob.pixel_auroc, blob.pro) == (1.0, 1.0, 1.0)
    assert missed.image_auroc == 0.0  # flat frames score 0, below every noisy good frame
    assert missed.pro < 0.05


def test_overall_metrics_pool_every_image(mixed_report: EvalReport) -> None:
    overall = mixed_report.overall
    assert (overall.n_good, overall.n_defective) == (4, 5)
    assert overall.image_auroc == pytest.approx(3 / 5)  # 3 of 5 defects rank above all good images
    assert 0.5 < overall.pixel_auroc < 1.0
    # 4 blob regions are found at FPR 0, the 3 regions of the flat frames only at FPR ~1: PRO = 4/7
    assert overall.pro == pytest.approx(4 / 7, abs=0.01)


def test_report_keeps_order_scores_and_maps(mixed_report: EvalReport, mixed_data: Path) -> None:
    paths = [Path(r.path) for r in mixed_report.images]
    assert paths == [s.path for s in mixed_report.samples]
    assert mixed_report.maps.shape == (9, 64, 64)
    assert mixed_report.maps.dtype == np.float32
    by_type = {r.path: r for r in mixed_report.images}
    blob0 = by_type[str(mixed_data / "test" / "blob" / "000.png")]
    assert blob0.score == pytest.approx(127 / 128)  # (255 - 128) / 128: the blob's toy-map value
    assert blob0.label == 1
    assert mixed_report.timing.n_images == 9
    assert mixed_report.timing.inference_s > 0


def test_batch_size_does_not_change_results(
    toy_package: Path, mixed_data: Path, mixed_report: EvalReport
) -> None:
    single = evaluate(_toy_runner(toy_package), mixed_data, batch_size=1, progress=False)
    assert [r.score for r in single.images] == [r.score for r in mixed_report.images]
    np.testing.assert_array_equal(single.maps, mixed_report.maps)
    assert single.overall == mixed_report.overall


def test_to_dict_has_top_level_metrics_and_per_type(mixed_report: EvalReport) -> None:
    d = json.loads(json.dumps(mixed_report.to_dict()))
    assert d["image_auroc"] == pytest.approx(0.6)
    assert set(d) >= {"image_auroc", "pixel_auroc", "pro", "per_type", "scores", "timing"}
    assert set(d["per_type"]) == {"blob", "missed"}
    assert d["per_type"]["blob"] == {
        "n_good": 4,
        "n_defective": 3,
        "image_auroc": 1.0,
        "pixel_auroc": 1.0,
        "pro": 1.0,
    }
    assert len(d["scores"]) == 9


def test_table_lists_types_and_overall(mixed_report: EvalReport) -> None:
    lines = mixed_report.table().splitlines()
    assert [line.split()[0] for line in lines if line.startswith(("blob", "missed", "overall"))] == [
        "blob",
        "missed",
        "overall",
    ]


def test_only_good_images_give_nan_not_a_crash(
    tmp_path: Path, toy_package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_mvtec(tmp_path / "good_only", defects={}, with_train=False)
    with caplog.at_level(logging.WARNING, logger="fod.evaluate"):
        report = evaluate(_toy_runner(toy_package), data, progress=False)
    assert math.isnan(report.image_auroc)
    assert math.isnan(report.pixel_auroc)
    assert math.isnan(report.pro)
    assert report.per_type == {}
    assert "image AUROC is undefined" in caplog.text
    d = report.to_dict()
    assert d["image_auroc"] is None
    assert d["pro"] is None
    assert "n/a" in report.table()


def test_runner_lifecycle_is_respected(mixed_data: Path) -> None:
    inactive = _FakeRunner()
    evaluate(inactive, mixed_data, progress=False)
    assert not inactive.is_active  # activated for the run, released after it
    active = _FakeRunner()
    active.activate()
    evaluate(active, mixed_data, batch_size=4, progress=False)
    assert active.is_active  # the caller's runner stays as it was
    assert active.calls == 3  # 9 images in batches of 4


@pytest.mark.parametrize(
    ("mode", "message"),
    [("nan", r"NaN or inf for .*\.png"), ("shape", r"returned anomaly_map \[3, 1, 32, 64\]")],
)
def test_broken_runner_output_is_a_clear_error(mixed_data: Path, mode: str, message: str) -> None:
    with pytest.raises(FodError, match=message):
        evaluate(_FakeRunner(mode=mode), mixed_data, batch_size=3, progress=False)


def test_mask_of_wrong_size_fails_before_any_inference(tmp_path: Path) -> None:
    data = make_mvtec(tmp_path / "bad_mask", with_train=False)
    bad = data / "ground_truth" / "blob" / "001_mask.png"
    cv2.imwrite(str(bad), np.zeros((32, 32), np.uint8))
    runner = _FakeRunner()
    with pytest.raises(DataError, match=r"001_mask\.png: mask is 32x32 px but its image"):
        evaluate(runner, data, progress=False)
    assert runner.calls == 0


def test_batch_size_must_be_positive(mixed_data: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(_FakeRunner(), mixed_data, batch_size=0)


def test_save_grid_png_writes_an_image(mixed_report: EvalReport, tmp_path: Path) -> None:
    out = save_grid_png(mixed_report, tmp_path / "sub" / "grid.png", per_type=2)
    image = cv2.imread(str(out))
    assert image is not None
    assert image.shape[1] > image.shape[0]  # 3 rows (good, blob, missed) x 6 panels: wider than tall
    assert image.std() > 10  # not blank


def test_fod_eval_cli_on_toy_package(
    toy_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_mvtec(tmp_path / "data", defects={"blob": ("blob", 4)}, with_train=False)
    out_json, out_grid = tmp_path / "out" / "eval.json", tmp_path / "out" / "grid.png"
    argv = ["eval", "--model", str(toy_package), "--data", str(data), "--json", str(out_json)]
    code = main([*argv, "--grid", str(out_grid), "--batch-size", "2", "--no-progress"])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert (report["image_auroc"], report["pixel_auroc"], report["pro"]) == (1.0, 1.0, 1.0)
    assert report["per_type"]["blob"]["image_auroc"] == 1.0
    assert report["runner"] == "onnxruntime"
    assert report["model"] == str(toy_package)
    assert cv2.imread(str(out_grid)) is not None
    stdout = capsys.readouterr().out
    assert "overall" in stdout
    assert "1.0000" in stdout
