"""benchmarks/baseline_knn.py: the nearest-neighbour yardstick on FOD's own bank images."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

from fod.data import list_images, train_folder
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
