"""fod.data on synthetic folders: layouts, grayscale and variable-size images, masks, fingerprints, errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from fod.data import (
    fingerprint,
    list_images,
    load_images,
    load_mask,
    load_test_split,
    train_folder,
)
from fod.errors import DataError
from tests.fod.mvtec_synth import make_mvtec


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


# ---- list_images / train_folder ------------------------------------------------------------------


def test_list_images_sorted_and_filtered_by_extension(tmp_path: Path) -> None:
    for name in ["b.png", "a.JPG", "c.bmp", "d.tif", "notes.txt", "e.png.bak"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()  # a folder with an image-like name is not an image
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "c.bmp", "d.tif"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such folder"),  # the folder does not exist
        ("empty", "no images"),  # the folder exists but holds no image
        ("only_text", "no images"),  # only non-image files
    ],
)
def test_list_images_errors_name_the_folder(tmp_path: Path, setup: str, message: str) -> None:
    folder = tmp_path / "imgs"
    if setup != "missing":
        folder.mkdir()
    if setup == "only_text":
        (folder / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=message) as info:
        list_images(folder)
    assert str(folder) in str(info.value)
    assert "train/good" in str(info.value)  # the message says which layout is expected


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("train/good", "train/good"),  # MVTec
        ("train/ok", "train/ok"),  # BTAD
        ("plain", "."),  # a plain folder of good images
    ],
)
def test_train_folder_layouts(tmp_path: Path, layout: str, expected: str) -> None:
    target = tmp_path if layout == "plain" else tmp_path / layout
    _write(target / "000.png", np.full((8, 8, 3), 128, np.uint8))
    assert train_folder(tmp_path) == (tmp_path / expected if expected != "." else tmp_path)


def test_train_folder_prefers_train_good_over_loose_images(tmp_path: Path) -> None:
    _write(tmp_path / "loose.png", np.zeros((8, 8), np.uint8))
    _write(tmp_path / "train" / "good" / "000.png", np.zeros((8, 8), np.uint8))
    assert train_folder(tmp_path) == tmp_path / "train" / "good"


@pytest.mark.parametrize("setup", ["missing", "wrong_layout"])
def test_train_folder_errors(tmp_path: Path, setup: str) -> None:
    root = tmp_path / "data"
    if setup == "wrong_layout":  # images one level too deep, no train/good
        _write(root / "images" / "a" / "000.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"train/good") as info:
        train_folder(root)
    assert str(root) in str(info.value)


# ---- load_images ---------------------------------------------------------------------------------


def test_load_images_handles_grayscale_color_and_any_size(tmp_path: Path) -> None:
    gray = _write(tmp_path / "gray.png", np.full((30, 50), 200, np.uint8))
    color = _write(tmp_path / "color.jpg", np.full((100, 40, 3), (10, 20, 30), np.uint8))
    batch = load_images([gray, color], (32, 48))
    assert batch.shape == (2, 32, 48, 3)
    assert batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], 200)  # grayscale copied to 3 channels
    assert abs(int(batch[1, 10, 10, 0]) - 10) <= 2  # BGR order kept (JPEG may shift by a level or two)
    assert abs(int(batch[1, 10, 10, 2]) - 30) <= 2


@pytest.mark.parametrize("content", [b"", b"not a png at all"], ids=["empty-file", "garbage"])
def test_load_images_unreadable_file_is_named(tmp_path: Path, content: bytes) -> None:
    good = _write(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    bad = tmp_path / "broken.png"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=r"broken\.png") as info:
        load_images([good, bad], (8, 8))
    assert "replace or remove it" in str(info.value)


def test_load_images_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gone\.png: file not found"):
        load_images([tmp_path / "gone.png"], (8, 8))


# ---- load_test_split / load_mask -----------------------------------------------------------------


def test_load_test_split_labels_types_and_masks(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, defects={"blob": ("blob", 2), "missed": ("missed", 1)}, n_good_test=3)
    samples = load_test_split(root)
    assert [(s.defect_type, s.label) for s in samples] == [
        ("blob", 1),
        ("blob", 1),
        ("good", 0),
        ("good", 0),
        ("good", 0),
        ("missed", 1),
    ]
    blob0 = samples[0]
    assert blob0.mask_path == root / "ground_truth" / "blob" / "000_mask.png"
    assert all(s.mask_path is None for s in samples if s.label == 0)


def test_load_test_split_needs_no_train_folder(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, with_train=False)
    assert not (root / "train").exists()
    assert len(load_test_split(root)) == 4 + 3


def test_btad_layout_ok_ko_and_plain_mask_names(tmp_path: Path) -> None:
    _write(tmp_path / "test" / "ok" / "0000.bmp", np.zeros((16, 16, 3), np.uint8))
    _write(tmp_path / "test" / "ko" / "0001.bmp", np.zeros((16, 16, 3), np.uint8))
    _write(tmp_path / "ground_truth" / "ko" / "0001.png", np.zeros((16, 16), np.uint8))
    samples = load_test_split(tmp_path)
    assert [(s.defect_type, s.label) for s in samples] == [("ko", 1), ("ok", 0)]
    assert samples[0].mask_path == tmp_path / "ground_truth" / "ko" / "0001.png"


def test_defect_without_mask_names_the_expected_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path)
    (root / "ground_truth" / "blob" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"001\.png: defect image without a mask") as info:
        load_test_split(root)
    assert str(root / "ground_truth" / "blob" / "001_mask.png") in str(info.value)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("no_test", "no test/ folder"),  # only train/good: not an evaluation folder
        ("flat_test", "no test images"),  # images directly in test/, no <type>/ sub-folders
        ("empty_type", "no images"),  # test/good exists but is empty
    ],
)
def test_load_test_split_layout_errors(tmp_path: Path, setup: str, message: str) -> None:
    if setup == "no_test":
        _write(tmp_path / "train" / "good" / "000.png", np.zeros((8, 8), np.uint8))
    elif setup == "flat_test":
        _write(tmp_path / "test" / "000.png", np.zeros((8, 8), np.uint8))
    else:
        (tmp_path / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=message):
        load_test_split(tmp_path)


def test_load_mask_resizes_nearest_to_bool(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, size=(64, 64))
    sample = next(s for s in load_test_split(root) if s.label == 1)
    raw_u8 = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE)
    assert raw_u8 is not None
    raw: np.ndarray = raw_u8 > 0
    mask = load_mask(sample, (32, 32))
    assert mask.dtype == bool
    assert mask.shape == (32, 32)
    assert 0 < mask.sum() <= raw.sum() / 4 + 8  # about a quarter of the pixels, still a region
    np.testing.assert_array_equal(load_mask(sample, (64, 64)), raw)


def test_load_mask_of_good_image_is_empty(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path)
    good = next(s for s in load_test_split(root) if s.label == 0)
    mask = load_mask(good, (16, 24))
    assert mask.shape == (16, 24)
    assert not mask.any()


def test_load_mask_size_mismatch_names_both_files(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, size=(64, 64))
    sample = next(s for s in load_test_split(root) if s.label == 1)
    assert sample.mask_path is not None
    _write(sample.mask_path, np.zeros((64, 60), np.uint8))
    with pytest.raises(DataError, match=r"mask is 60x64 px but its image .* is 64x64 px") as info:
        load_mask(sample, (32, 32))
    assert str(sample.mask_path) in str(info.value)
    assert str(sample.path) in str(info.value)


def test_load_mask_unreadable_is_named(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path)
    sample = next(s for s in load_test_split(root) if s.label == 1)
    assert sample.mask_path is not None
    sample.mask_path.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"_mask\.png: cannot decode"):
        load_mask(sample, (32, 32))


# ---- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_is_order_independent_and_content_sensitive(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, n_train=3)
    paths = list_images(train_folder(root))
    first = fingerprint(paths, root)
    assert first.count == 3
    assert fingerprint(list(reversed(paths)), root) == first
    _write(paths[1], np.zeros((64, 64, 3), np.uint8))
    assert fingerprint(paths, root).sha256 != first.sha256
    assert fingerprint(paths[:2], root).count == 2


def test_fingerprint_uses_relative_paths(tmp_path: Path) -> None:
    a = make_mvtec(tmp_path / "a", n_train=2, seed=3)
    b = tmp_path / "b"
    b.mkdir()
    for p in list_images(a / "train" / "good"):
        target = b / "train" / "good" / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    # the same files in another place give the same identity (only `root` is recorded differently)
    fa = fingerprint(list_images(a / "train" / "good"), a)
    fb = fingerprint(list_images(b / "train" / "good"), b)
    assert fa.sha256 == fb.sha256
    assert fa.root != fb.root
