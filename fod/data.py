"""Datasets: a plain folder of good images, and the MVTec layout for training and evaluation.

MVTec layout (also BTAD's ``ok``/``ko``)::

    ROOT/train/good/*.png                      training (good parts only)
    ROOT/test/<good|defect type>/*.png         evaluation
    ROOT/ground_truth/<defect type>/<stem>_mask.png   pixel masks (``<stem>.png`` also accepted)

Images may be grayscale or of any size: every image goes through :func:`fod.preprocess.to_model_input`.
No torch here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fod.errors import DataError, InputError
from fod.package import DataFingerprint, sha256_file
from fod.preprocess import IMAGE_SUFFIXES, read_image, to_model_input

IMAGE_EXTENSIONS = IMAGE_SUFFIXES
GOOD_NAMES = frozenset({"good", "ok"})

_LAYOUT_HELP = (
    "expected either a folder of good images, or an MVTec-layout folder with train/good/ "
    "(training) and test/<type>/ + ground_truth/<type>/<stem>_mask.png (evaluation)"
)


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files (png, jpg, bmp, tif, webp) directly inside ``folder``.

    Raises:
        DataError: the folder does not exist or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; {_LAYOUT_HELP}")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"{folder}: no images (png, jpg, bmp, tif) in this folder; {_LAYOUT_HELP}")
    return paths


def train_folder(data: str | Path) -> Path:
    """The folder of good training images for ``data`` (``data/train/good``, or ``data`` itself).

    Raises:
        DataError: neither layout applies.
    """
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"{data}: no such folder; {_LAYOUT_HELP}")
    for candidate in (data / "train" / "good", data / "train" / "ok"):
        if candidate.is_dir():
            return candidate
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in data.iterdir() if p.is_file()):
        return data
    raise DataError(f"{data}: neither train/good/ nor images found; {_LAYOUT_HELP}")


def load_images(paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    """Read and preprocess images into one batch.

    Args:
        paths: image files.
        size: ``(height, width)`` model input size in px.

    Returns:
        ``[N, height, width, 3]`` uint8 BGR.

    Raises:
        DataError: a file cannot be read or decoded (the file is named).
    """
    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            out[i] = to_model_input(read_image(str(path)), size, source=str(path))
        except InputError as exc:
            raise DataError(str(exc)) from exc
    return out


@dataclass(frozen=True)
class TestSample:
    """One image of a test split.

    Attributes:
        path: image file.
        label: 0 good, 1 defective.
        defect_type: folder name under ``test/`` (``good`` for good images).
        mask_path: ground-truth mask file, None for good images.
    """

    __test__ = False  # not a pytest class

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None


def load_test_split(root: str | Path) -> list[TestSample]:
    """List the test split of an MVTec-layout folder (``train/`` is not needed).

    Raises:
        DataError: no ``test/`` folder, no images, or a defect image without its mask.
    """
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        raise DataError(f"{root}: no test/ folder; {_LAYOUT_HELP}")
    samples: list[TestSample] = []
    for type_dir in sorted(p for p in test.iterdir() if p.is_dir()):
        defect_type = type_dir.name
        is_good = defect_type in GOOD_NAMES
        for path in list_images(type_dir):
            mask = None if is_good else _find_mask(root, defect_type, path)
            samples.append(TestSample(path, 0 if is_good else 1, defect_type, mask))
    if not samples:
        raise DataError(f"{test}: no test images; {_LAYOUT_HELP}")
    return samples


def _find_mask(root: Path, defect_type: str, image: Path) -> Path:
    folder = root / "ground_truth" / defect_type
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png", f"{image.stem}.bmp"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"{image}: defect image without a mask; expected {folder / (image.stem + '_mask.png')} "
        "(add the mask, or move the image out of test/)"
    )


def load_mask(sample: TestSample, size: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask of a sample at model resolution (all False for good images).

    Args:
        sample: a test sample.
        size: ``(height, width)`` in px.

    Returns:
        ``[height, width]`` bool.

    Raises:
        DataError: unreadable mask, or mask size differs from its image's size.
    """
    if sample.mask_path is None:
        return np.zeros(size, dtype=bool)
    try:
        mask = read_image(str(sample.mask_path), flags=cv2.IMREAD_GRAYSCALE)
    except InputError as exc:
        raise DataError(str(exc)) from exc
    try:
        header: np.ndarray | None = read_image(str(sample.path))  # oriented like the mask and the image
    except InputError:
        header = None
    if header is not None and header.shape[:2] != mask.shape[:2]:
        raise DataError(
            f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image {sample.path} is "
            f"{header.shape[1]}x{header.shape[0]} px; masks must have the size of their image"
        )
    resized = cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return np.asarray(resized > 0)


def fingerprint(paths: list[Path], root: str | Path) -> DataFingerprint:
    """Identity of a set of images: count and sha256 over sorted (relative path, file sha256)."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(paths):
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        digest.update(f"{rel.as_posix()}\0{sha256_file(path)}\n".encode())
    return DataFingerprint(count=len(paths), sha256=digest.hexdigest(), root=str(root))
