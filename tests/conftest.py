"""Shared fixtures: data path, toy model package, free ports."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.toy_package import make_toy_package

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


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
