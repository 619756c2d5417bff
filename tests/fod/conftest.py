"""Fixtures of the model tests: a tiny FOD run and its exported package, built once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def synthetic_good_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``[n, size, size, 3]`` uint8 BGR: a smooth striped texture with mild noise (good parts)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi)
        base = 128 + 40 * np.sin(xx / 3.0 + phase) + rng.normal(0, 4, (size, size))
        out[i] = np.clip(base, 0, 255).astype(np.uint8)[..., None]
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``fod train`` run folder: 64 px, narrow levels, 1 epoch on 8 synthetic images."""
    from fod.checkpoint import save_checkpoint
    from fod.model import FODConfig
    from fod.train import TrainSettings, train_model

    images = synthetic_good_images(8, 64)
    model, record = train_model(
        images,
        FODConfig(image_size=64, d_models=(32, 32)),
        TrainSettings(epochs=1, batch_size=4, lr=3e-4, progress=False, holdout=0.25),
    )
    record["data"] = {"count": 8, "sha256": "0" * 64, "root": "synthetic"}
    run = tmp_path_factory.mktemp("tiny_run")
    save_checkpoint(run, model, record)
    return run


@pytest.fixture(scope="session")
def tiny_fod_package(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported to a model package (parity checked by the export)."""
    from fod.export import export_package

    out = tmp_path_factory.mktemp("tiny_pkg")
    export_package(tiny_run, out)
    return out
