"""Bad input to `fod train` and `fod eval`: exit code 2 and one message that names the file and the fix.

Every case is built from synthetic images in tmp_path; none trains a model (data errors are raised
before any training, checkpoints are written from an untrained 64 px model).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fod.checkpoint import CHECKPOINT_NAME, save_checkpoint
from fod.cli import main
from fod.model import FODConfig, FODModel
from tests.fod.mvtec_synth import make_mvtec


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid checkpoint of an untrained 64 px model (random backbone: no weights download, fast)."""
    out = tmp_path_factory.mktemp("run")
    model = FODModel(FODConfig(image_size=64, d_models=(16, 16), layers=1), pretrained=False)
    save_checkpoint(out, model, {"note": "untrained, for tests"})
    return out


# ---- fod train: bad data folders (raised before the model is built) -------------------------------


def _empty(root: Path) -> str:
    root.mkdir()
    return str(root)


def _nested_too_deep(root: Path) -> str:
    _write(root / "images" / "cam1" / "000.png", np.zeros((16, 16), np.uint8))
    return str(root)


def _unreadable_train_image(root: Path) -> str:
    _write(root / "train" / "good" / "000.png", np.zeros((16, 16), np.uint8))
    (root / "train" / "good" / "001.png").write_bytes(b"\x89PNG truncated")
    return str(root / "train" / "good" / "001.png")


def _missing(root: Path) -> str:
    return str(root)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_missing, "no such folder"),  # a typo in --data
        (_empty, "neither train/good/ nor images found"),  # an empty folder
        (_nested_too_deep, "neither train/good/ nor images found"),  # wrong layout
        (_unreadable_train_image, "cannot decode the image"),  # a corrupt file among good ones
    ],
)
def test_train_bad_data_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], str], message: str
) -> None:
    named = make(tmp_path / "data")
    code, err = _run(capsys, "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"))
    assert code == 2
    assert err.startswith("fod train: error: ")
    assert named in err
    assert message in err
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()


# ---- fod eval: bad data folders -----------------------------------------------------------------


def _no_test_folder(root: Path) -> str:
    _write(root / "train" / "good" / "000.png", np.zeros((64, 64), np.uint8))
    return str(root)


def _flat_test_folder(root: Path) -> str:
    _write(root / "test" / "000.png", np.zeros((64, 64), np.uint8))
    return str(root / "test")


def _unreadable_test_image(root: Path) -> str:
    make_mvtec(root, with_train=False)
    bad = root / "test" / "good" / "002.png"
    bad.write_bytes(b"not an image")
    return str(bad)


def _mask_of_wrong_size(root: Path) -> str:
    make_mvtec(root, with_train=False)
    bad = root / "ground_truth" / "blob" / "001_mask.png"
    _write(bad, np.zeros((40, 64), np.uint8))
    return str(bad)


def _defect_without_mask(root: Path) -> str:
    make_mvtec(root, with_train=False)
    (root / "ground_truth" / "blob" / "002_mask.png").unlink()
    return str(root / "ground_truth" / "blob" / "002_mask.png")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_missing, "no test/ folder"),
        (_empty, "no test/ folder"),
        (_no_test_folder, "no test/ folder"),  # a training-only folder
        (_flat_test_folder, "no test images"),  # images not in test/<type>/
        (_unreadable_test_image, "cannot decode the image"),
        (_mask_of_wrong_size, "mask is 64x40 px but its image"),
        (_defect_without_mask, "defect image without a mask"),
    ],
)
def test_eval_bad_data_exits_2_naming_the_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    toy_package: Path,
    make: Callable[[Path], str],
    message: str,
) -> None:
    named = make(tmp_path / "data")
    out = tmp_path / "eval.json"
    code, err = _run(
        capsys, "eval", "--model", str(toy_package), "--data", str(tmp_path / "data"), "--json", str(out)
    )
    assert code == 2
    assert "fod eval: error: " in err
    assert named in err
    assert message in err
    assert not out.exists()


# ---- fod eval: bad models -----------------------------------------------------------------------


def test_eval_model_folder_that_is_neither_package_nor_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_mvtec(tmp_path / "data", with_train=False)
    (tmp_path / "model").mkdir()
    code, err = _run(capsys, "eval", "--model", str(tmp_path / "model"), "--data", str(data))
    assert code == 2
    assert f"{tmp_path / 'model'}: neither a model package" in err
    assert "fod train --out" in err


def test_eval_missing_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_mvtec(tmp_path / "data", with_train=False)
    code, err = _run(capsys, "eval", "--model", str(tmp_path / "nope"), "--data", str(data))
    assert code == 2
    assert f"{tmp_path / 'nope'}: no such folder" in err


def test_eval_package_with_edited_onnx(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toy_package: Path
) -> None:
    package = tmp_path / "pkg"
    shutil.copytree(toy_package, package)
    with open(package / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    data = make_mvtec(tmp_path / "data", with_train=False)
    code, err = _run(capsys, "eval", "--model", str(package), "--data", str(data))
    assert code == 2
    assert f"{package / 'model.onnx'}: sha256" in err
    assert "re-export" in err


def test_eval_package_without_the_requested_variant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toy_package: Path
) -> None:
    data = make_mvtec(tmp_path / "data", with_train=False)
    code, err = _run(capsys, "eval", "--model", str(toy_package), "--data", str(data), "--precision", "int8")
    assert code == 2
    assert "no model.int8.onnx in this package" in err


def test_eval_checkpoint_from_another_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], run_dir: Path
) -> None:
    old = tmp_path / "old_run"
    old.mkdir()
    payload = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
    payload["version"] = 0
    torch.save(payload, old / CHECKPOINT_NAME)
    data = make_mvtec(tmp_path / "data", with_train=False)
    code, err = _run(capsys, "eval", "--model", str(old), "--data", str(data))
    assert code == 2
    assert str(old / CHECKPOINT_NAME) in err
    assert "format version 0" in err
    assert "retrain" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", "cannot be read as a checkpoint"),  # a truncated copy
        (None, "not a FOD checkpoint"),  # some other torch file
    ],
)
def test_eval_corrupt_or_foreign_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if content is None:
        torch.save({"weights": torch.zeros(2)}, run / CHECKPOINT_NAME)
    else:
        (run / CHECKPOINT_NAME).write_bytes(content)
    data = make_mvtec(tmp_path / "data", with_train=False)
    code, err = _run(capsys, "eval", "--model", str(run), "--data", str(data))
    assert code == 2
    assert str(run / CHECKPOINT_NAME) in err
    assert message in err


def test_eval_run_dir_with_precision_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], run_dir: Path
) -> None:
    data = make_mvtec(tmp_path / "data", with_train=False)
    code, err = _run(capsys, "eval", "--model", str(run_dir), "--data", str(data), "--precision", "fp16")
    assert code == 2
    assert "applies to model packages only" in err


def test_eval_run_dir_works(tmp_path: Path, capsys: pytest.CaptureFixture[str], run_dir: Path) -> None:
    """The good path through PyTorch: an untrained model, so only the report's shape is checked."""
    data = make_mvtec(tmp_path / "data", with_train=False)
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(run_dir), "--data", str(data), "--json", str(out), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["runner"] == "pytorch"
    assert report["image_size"] == [64, 64]
    assert len(report["scores"]) == 7
    assert "overall" in capsys.readouterr().out


# ---- fod train: level configuration and hold-out (checked before anything is written) --------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--levels", "8,64"], r"--levels '8,64': stride\(s\) \[64\] are not backbone stages; "
                               r"choose from \[4, 8, 16, 32\]"),
        (["--levels", "16,32", "--image-size", "200"], r"--image-size: image size 200 px: must be a multiple of the "
                                                       r"coarsest stride 32"),
        (["--levels", "8,16", "--d-models", "64"], "--d-models: .* one width per level"),
        (["--holdout", "0.9"], r"--holdout 0\.9: give a share between 0 and 0\.5"),
        (["--jitter", "-1"], r"--jitter -1\.0: give a scale between 0 \(off\) and 100"),
        (["--reference", "nearest", "--bank-size", "0"], r"--bank-size 0: give at least 1 patch"),
        (["--holdout", "0.1"], r"--holdout 0\.1 of 3 good images holds out 0; the level statistics need at least 2"),
        (["--regional", "4"], r"--regional: regional 4: the regional window must be an odd number of grid cells >= 3"),
        (["--regional", "13", "--holdout", "0"], r"--regional 13 needs held-out good images.*--holdout > 0"),
        (["--regional", "13", "--regional-bank-size", "0"], r"--regional-bank-size 0: give at least 1 patch"),
        (["--regional", "half"], r"--regional half: give 'auto', 0 \(none\) or an odd window side >= 3 "
                                 r"\(default auto\)"),
        (["--regional-bank-size", "0"], r"--regional-bank-size 0: give at least 1 patch"),  # with the default auto
        (["--map-power", "0.5"], r"--map-power: map_power 0\.5: the peak-relative exponent must be from 1 \(off\) "
                                 r"to 8"),
        (["--map-power", "nan"], r"--map-power: map_power nan"),
        (["--epochs", "-1"], r"--epochs -1: give 0 \(memory-bank mode\) or more passes \(default 8\)"),
        (["--batch-size", "0"], r"--batch-size 0: give at least 1 image per step"),
        (["--image-size", "16", "--levels", "4"],
         r"--image-size: image size 16 px: the anomaly map's Gaussian smoothing \(sigma 4 px, radius 16 px\) needs "
         r"a larger frame; give at least 20"),
        (["--epochs", "0", "--no-anchor"], r"--epochs 0 \(memory-bank mode\) .* needs --anchor, --reference nearest "
                                           r"and --score rec \(the defaults\); got --no-anchor"),
        (["--epochs", "0", "--score", "rec*inter"],
         r"--epochs 0 .*got --anchor, --reference nearest, --score rec\*inter"),
    ],
)
def test_train_bad_level_options_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    for i in range(3):
        _write(tmp_path / "data" / f"{i:03d}.png", np.full((32, 32), 100 + i, np.uint8))
    code, err = _run(capsys, "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                     "--no-progress", "--epochs", "1", *options)
    assert code == 2
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_train_unknown_intensity_mode_exits_2_naming_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--intensity", "gamma"])
    assert exc.value.code == 2
    assert re.search(r"--intensity: invalid choice: 'gamma' \(choose from .*flat.*standardize.*none",
                     capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_train_cli_map_power_limit_is_the_models() -> None:
    from fod import train_cli
    from fod.model import MAP_POWER_MAX

    assert train_cli.MAP_POWER_MAX == MAP_POWER_MAX
    assert 1.0 < train_cli.DEFAULTS["map_power"] <= MAP_POWER_MAX


@pytest.mark.parametrize("grey", [0, 255])
def test_train_on_blank_frames_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], grey: int
) -> None:
    """Blank or saturated frames (a capped lens, a blown exposure) would train a model of nothing."""
    for i in range(4):
        _write(tmp_path / "data" / f"{i:03d}.png", np.full((48, 48), grey, np.uint8))
    code, err = _run(capsys, "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                     "--no-progress", "--image-size", "64", "--holdout", "0")
    assert code == 2
    assert re.search(r"the 4 good images have no contrast \(grey-level std 0\.00 < 1\).*check the camera", err), err
    assert not (tmp_path / "run").exists()


def test_memory_bank_mode_warns_of_training_options_it_ignores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    for i in range(4):
        _write(tmp_path / "data" / f"{i:03d}.png", rng.integers(0, 255, (64, 64), dtype=np.uint8))
    with caplog.at_level("WARNING", logger="fod.train"):
        code, _ = _run(capsys, "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                       "--no-progress", "--image-size", "64", "--holdout", "0", "--epochs", "0", "--jitter", "5",
                       "--lr", "0.001")
    assert code == 0
    assert "--epochs 0 (memory-bank mode) trains nothing: --jitter, --lr have no effect" in caplog.text
    assert json.loads((tmp_path / "run" / "train.json").read_text())["steps"] == 0
