"""benchmarks/baseline_knn.py: the nearest-neighbour yardstick on FOD's own bank images."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from fod.backbone import FeatureExtractor
from fod.data import list_images, load_images, train_folder
from fod.train import TrainSettings, split_holdout
from tests.fod.mvtec_synth import make_mvtec

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "baseline_knn.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_knn", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_holdout_and_coreset_build_the_bank_fod_train_would(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "data", n_train=8, n_good_test=2, defects={"blob": ("blob", 2)})
    out = tmp_path / "knn.json"
    rc = _load().main(["--data", str(root), "--json", str(out), "--image-size", "64", "--strides", "16+32",
                       "--holdout", "0.25", "--coreset", "10", "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())["baseline"]
    keep, held = split_holdout(8, 0.25, TrainSettings().seed)
    assert report["n_train_images"] == len(keep) == 6  # the 2 images fod train --holdout 0.25 keeps out
    assert len(held) == 2
    assert report["bank_size"] == 10  # of 6 x 4 x 4 = 96 patches
    assert report["feature_dim"] == 112 + 320  # Lite0's stride-16 and stride-32 channels
    assert "coreset" in report["method"]
    assert report["holdout"] == 0.25


def test_default_bank_is_every_patch_of_every_training_image(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "data", n_train=5, n_good_test=2, defects={"blob": ("blob", 2)})
    out = tmp_path / "knn.json"
    assert _load().main(["--data", str(root), "--json", str(out), "--image-size", "64", "--strides", "16+32",
                         "--no-progress"]) == 0
    report = json.loads(out.read_text())["baseline"]
    assert report["n_train_images"] == len(list_images(train_folder(root))) == 5
    assert report["bank_size"] == 5 * 4 * 4


def test_context_averages_each_patch_over_its_grid_neighbours(tmp_path: Path) -> None:

    module = _load()
    root = make_mvtec(tmp_path / "data", n_train=2, n_good_test=1, defects={"blob": ("blob", 1)})
    images = load_images(list_images(train_folder(root)), (64, 64))
    extractor = FeatureExtractor("efficientnet_lite0", 64, strides=(16, 32))
    plain = module.KnnRunner.embed(extractor, images)  # [2, 432, 4, 4]
    local = module.KnnRunner.embed(extractor, images, 3)
    # a corner patch averages its 2 x 2 in-grid neighbours (padding not counted), an inner one 3 x 3
    assert torch.allclose(local[:, :, 0, 0], plain[:, :, :2, :2].mean((2, 3)), atol=1e-5)
    assert torch.allclose(local[:, :, 1, 1], plain[:, :, :3, :3].mean((2, 3)), atol=1e-5)
    assert not torch.allclose(local, plain)
    # 2 x 4 - 1 = 7 cells: every patch is its image's mean feature
    whole = module.KnnRunner.embed(extractor, images, 7)
    expected = plain.mean((2, 3), keepdim=True).expand_as(plain)
    assert torch.allclose(whole, expected, atol=1e-5)
    assert not np.allclose(whole[0, :, 0, 0].numpy(), whole[1, :, 0, 0].numpy())
    with pytest.raises(ValueError, match="--context 4"):
        module.KnnRunner.embed(extractor, images, 4)


def test_an_even_context_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "knn.json"
    with pytest.raises(SystemExit) as exit_info:
        _load().main(["--data", str(tmp_path / "missing"), "--json", str(out), "--context", "4", "--no-progress"])
    assert exit_info.value.code == 2
    assert "--context 4: use an odd number" in capsys.readouterr().err
    assert not out.exists()


def test_context_is_recorded_in_the_report(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "data", n_train=3, n_good_test=2, defects={"blob": ("blob", 2)})
    out = tmp_path / "knn.json"
    assert _load().main(["--data", str(root), "--json", str(out), "--image-size", "64", "--strides", "16+32",
                         "--context", "3", "--no-progress"]) == 0
    report = json.loads(out.read_text())["baseline"]
    assert report["context"] == 3
    assert report["bank_size"] == 3 * 4 * 4
