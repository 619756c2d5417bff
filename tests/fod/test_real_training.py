"""Train on real MVTec images (hazelnut, reduced) and check the evaluation beats chance clearly.

Needs the real data under ``FOD_DATA_DIR`` (CI points it at ``../shared/data``); skipped without it.
Small schedule (128 px, 3 epochs on 50 images): well under a minute of training on 2 cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fod.cli import main


@pytest.fixture(scope="module")
def hazelnut_run(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data = real_data / "mvtec-ad-reduced" / "hazelnut"
    run = tmp_path_factory.mktemp("hazelnut_run")
    code = main(["train", "--data", str(data), "--out", str(run), "--epochs", "3", "--image-size", "128",
                 "--levels", "8,16", "--batch-size", "4", "--lr", "3e-4", "--no-progress",
                 # an object on a plain background: the default flat field is for surfaces that fill the
                 # frame; here it costs image AUROC 1.000 -> 0.875, pixel AUROC 0.982 -> 0.977 (with the
                 # default --anchor; docs/getting-started.md)
                 "--intensity", "none"])
    assert code == 0
    return data, run


def test_training_on_hazelnut_beats_chance(hazelnut_run: tuple[Path, Path], tmp_path: Path):
    data, run = hazelnut_run
    record = json.loads((run / "train.json").read_text())
    assert record["train_images"] == 45  # 50 good images, 10 % held out for the level statistics
    assert len(record["holdout_files"]) == 5
    # the default --regional auto sees an object (measured share 0.88) and adds no regional level
    assert record["regional_auto"]["position_share"] > 0.7
    assert record["regional"] == 0
    assert "an object" in record["regional_auto"]["why"]
    # the default --global-level auto reads the same share: no global level on an object
    assert record["global_level"]["on"] is False
    assert "an object" in record["global_level"]["why"]
    assert record["global_norm"] is None
    # the default peak-relative map, its floor measured on the 5 held-out nuts (3.34 when measured)
    assert record["map_power"] == 2.0
    assert record["peak_floor"] > 0
    losses = [epoch["loss"] for epoch in record["history"]]
    assert len(losses) == 3
    assert all(math.isfinite(v) for v in losses)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(run), "--data", str(data), "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    # 2 good vs 8 defective test images: image AUROC moves in steps of 1/16, so the pixel level
    # (10 x 128 x 128 pixels) is the robust check; chance is 0.5 for both. Measured with the defaults
    # (--anchor, --map-power 2): 1.000 / 0.988 / 0.844 (image / pixel AUROC / PRO); with --map-power 1
    # 1.000 / 0.982 / 0.817; --no-anchor (map power 1): 0.750 / 0.907 / 0.593
    assert report["pixel_auroc"] > 0.9
    assert report["image_auroc"] > 0.6
    assert report["pro"] > 0.6


def test_regional_auto_tells_the_tile_surface_from_the_hazelnut(real_data: Path):
    """The decision of ``--regional auto`` on both real data sets (docs/results.md, eleventh round)."""
    from fod.data import list_images, load_images, train_folder
    from fod.train import POSITION_SHARE_MAX, auto_regional, image_position_share

    shares = {}
    for name in ("magnetic-tile", "mvtec-ad-reduced/hazelnut"):
        paths = list_images(train_folder(real_data / name))[::4]
        shares[name] = image_position_share(load_images(paths, (64, 64)))
    # the same nuts moved at random by up to 20 % of the frame (reflect-padded), as parts on a belt would be
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    nuts = load_images(list_images(train_folder(real_data / "mvtec-ad-reduced/hazelnut")), (64, 64))
    moved = np.stack([cv2.warpAffine(img, np.float32([[1, 0, dx], [0, 1, dy]]), (64, 64),
                                     borderMode=cv2.BORDER_REFLECT)
                      for img, (dx, dy) in zip(nuts, rng.uniform(-0.2, 0.2, (len(nuts), 2)) * 64)])
    shares["moved hazelnut"] = image_position_share(moved)
    assert shares["magnetic-tile"] < 0.3 < POSITION_SHARE_MAX < 0.7 < shares["mvtec-ad-reduced/hazelnut"], shares
    assert shares["moved hazelnut"] > 0.7, shares  # 0.35 before frames were centred (thirteenth round)
    assert auto_regional(shares["magnetic-tile"], 384 // 16) == 19  # the defaults' 24-cell grid
    assert auto_regional(shares["mvtec-ad-reduced/hazelnut"], 384 // 16) == 0
