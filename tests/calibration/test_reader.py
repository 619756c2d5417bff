"""Which images a folder means, and the ONNX Runtime calibration data reader."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from calibration.errors import CalibrationDataError
from calibration.reader import (
    ImageCalibrationDataReader,
    add_synthetic_defects,
    resolve_calibration_images,
    resolve_defects,
    resolve_evaluation_set,
)
from tests.calibration.toy_fod import write_synthetic_images


def test_mvtec_root_uses_test_good_and_labelled_defects_with_masks(mvtec_root):
    images = resolve_evaluation_set(mvtec_root)
    assert images.layout == "mvtec"
    assert images.good_source == mvtec_root / "test" / "good"
    assert len(images.good) == 40
    assert len(images.defects) == 12
    assert set(images.defect_types) == {"blob"}
    assert all(d.mask_path is not None and d.mask_path.is_file() for d in images.defects)
    assert not any("train" in p.parts for p in images.good)  # never the training images


def test_test_folder_with_good_subfolder_is_understood(mvtec_root):
    images = resolve_evaluation_set(mvtec_root / "test")
    assert len(images.good) == 40
    assert len(images.defects) == 12
    assert images.defects[0].mask_path is not None  # ground_truth/ found beside test/


def test_plain_folder_is_all_good_and_anomalous_folder_is_all_defects(tmp_path):
    write_synthetic_images(tmp_path / "ok", 5, defect=False, seed=0)
    write_synthetic_images(tmp_path / "scratch", 3, defect=True, seed=1)
    images = resolve_evaluation_set(tmp_path / "ok", tmp_path / "scratch")
    assert images.layout == "folder"
    assert len(images.good) == 5
    assert images.defect_types == ["scratch"] * 3
    assert all(d.mask_path is None for d in images.defects)


def test_anomalous_folder_of_defect_type_folders(tmp_path):
    write_synthetic_images(tmp_path / "bad" / "hole", 2, defect=True, seed=0)
    write_synthetic_images(tmp_path / "bad" / "crack", 3, defect=True, seed=1)
    defects, _ = resolve_defects(tmp_path / "bad")
    assert sorted({d.defect_type for d in defects}) == ["crack", "hole"]
    assert len(defects) == 5


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_no_images_is_a_clear_error(tmp_path, make):
    folder = tmp_path / "x"
    if make == "empty":
        folder.mkdir()
    with pytest.raises(CalibrationDataError, match="x"):
        resolve_evaluation_set(folder)


def test_training_images_as_normal_set_are_warned_about(mvtec_root, caplog):
    with caplog.at_level(logging.WARNING):
        resolve_evaluation_set(mvtec_root / "train" / "good")
    assert "training images" in caplog.text


def test_calibration_images_come_from_train_good_and_are_evenly_thinned(mvtec_root, tmp_path):
    paths = resolve_calibration_images(mvtec_root, max_images=None)
    assert len(paths) == 24
    assert all(p.parent == mvtec_root / "train" / "good" for p in paths)
    thinned = resolve_calibration_images(mvtec_root, max_images=6)
    assert len(thinned) == 6
    assert thinned[0] == paths[0]
    assert thinned[-1] == paths[-1]
    shutil.copytree(mvtec_root / "train" / "good", tmp_path / "plain")
    assert len(resolve_calibration_images(tmp_path / "plain", max_images=None)) == 24


def test_data_reader_batches_rewinds_and_augments(mvtec_root):
    paths = resolve_calibration_images(mvtec_root, max_images=5)
    reader = ImageCalibrationDataReader(paths, (32, 48), batch_size=2)
    shapes = []
    while (batch := reader.get_next()) is not None:
        shapes.append(batch["image"].shape)
        assert batch["image"].dtype == np.uint8
    assert shapes == [(2, 32, 48, 3), (2, 32, 48, 3), (1, 32, 48, 3)]
    reader.rewind()
    first = reader.get_next()
    assert first is not None
    assert first["image"].shape[0] == 2
    augmented = ImageCalibrationDataReader(paths, (32, 48), batch_size=2, augment=True).get_next()
    assert augmented is not None
    originals, copies = np.split(augmented["image"], 2)
    np.testing.assert_array_equal(originals, first["image"])
    assert np.any(copies != originals)


def test_synthetic_defects_are_deterministic_and_leave_the_input_alone():
    images = np.full((3, 40, 40, 3), 128, np.uint8)
    a = add_synthetic_defects(images, seed=4)
    b = add_synthetic_defects(images, seed=4)
    np.testing.assert_array_equal(a, b)
    assert np.all(images == 128)
    assert all(np.any(img != 128) for img in a)
