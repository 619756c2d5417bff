"""Shared fixtures: data path, toy model package, free ports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fod_tools.demo.broker import free_port
from tests.toy_package import make_toy_package

__all__ = ["free_port"]  # the one free-port helper, re-exported for the tests

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """Real datasets (MVTec layout): ``$FOD_DATA_DIR``, else ``../shared/data`` beside the repo."""
    return Path(os.environ.get("FOD_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Root of the real datasets; skips the test when they are not present."""
    root = data_dir()
    if not (root / "magnetic-tile").is_dir():
        pytest.skip(f"real data not found at {root}; set FOD_DATA_DIR")
    return root


@pytest.fixture(scope="session")
def toy_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid model package (64x64) with the toy graph of tests/toy_package.py."""
    return make_toy_package(tmp_path_factory.mktemp("toy_pkg"))


@pytest.fixture(scope="session")
def mt_package(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibrated package trained by ``fod train`` on the real magnetic-tile images.

    ``$FOD_MT_PACKAGE`` names an existing calibrated package (e.g. the full-size model of the
    README); otherwise a small one is trained here through the CLI on 120 of the good training images
    (96 px, 2 epochs: about a minute on 2 idle cores), exported, and calibrated on ``test/good``.
    """
    import shutil

    from fod.cli import main
    from fod.package import ModelPackage

    if os.environ.get("FOD_MT_PACKAGE"):
        path = Path(os.environ["FOD_MT_PACKAGE"])
        if ModelPackage(path).manifest.calibration is None:
            pytest.fail(f"$FOD_MT_PACKAGE={path} is not calibrated; run `fod calibrate --model {path} --normal ...`")
        return path
    data = real_data / "magnetic-tile"
    work = tmp_path_factory.mktemp("mt_model")
    run, pkg, good = work / "run", work / "pkg", work / "good"
    good.mkdir()
    for src in sorted((data / "train" / "good").glob("*.jpg"))[::6]:  # 120 images
        shutil.copy(src, good / src.name)
    train = ["train", "--data", str(good), "--out", str(run), "--epochs", "2", "--image-size", "96", "--levels", "8,16",
             "--batch-size", "4", "--lr", "3e-4", "--no-progress"]
    assert main(train) == 0
    assert main(["export", "--model", str(run), "--out", str(pkg)]) == 0
    assert main(["calibrate", "--model", str(pkg), "--normal", str(data / "test" / "good")]) == 0
    return pkg
