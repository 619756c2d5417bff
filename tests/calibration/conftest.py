"""Fixtures of the calibration tests: a toy FOD package and a synthetic MVTec-layout dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.calibration.toy_fod import make_mvtec, make_toy_fod_package


@pytest.fixture(scope="session")
def toy_fod_package_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64x64 model package with the toy FOD graph (do not modify: copy it with ``toy_fod_package``)."""
    return make_toy_fod_package(tmp_path_factory.mktemp("toy_fod_pkg") / "pkg")


@pytest.fixture
def toy_fod_package(toy_fod_package_src: Path, tmp_path: Path) -> Path:
    """A private copy of the toy FOD package, free to modify."""
    return Path(shutil.copytree(toy_fod_package_src, tmp_path / "pkg"))


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic MVTec layout: 24 train/good, 40 test/good, 12 test/blob with masks."""
    return make_mvtec(tmp_path_factory.mktemp("mvtec") / "toy")
