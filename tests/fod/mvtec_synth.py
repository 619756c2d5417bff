"""Synthetic MVTec-layout datasets for fast tests: grey frames with noise, defects as blobs.

With the toy package's graph (map = |x - 128| / 128) a bright blob scores about 1, a good frame
at most ``noise / 128``, and a "missed" defect (a mask but a perfectly flat frame) scores 0.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

#: kinds of defect folders :func:`make_mvtec` can write
#: ``blob``: a bright 255 rectangle where the mask is; ``missed``: the mask, but a flat grey frame
DEFECT_KINDS = ("blob", "missed")


def grey_frame(rng: np.random.Generator, size: tuple[int, int], noise: int = 10) -> np.ndarray:
    """``[h, w, 3]`` uint8 BGR: 128 plus uniform integer noise in [-noise, noise] (pixel 0,0 off 128)."""
    frame = 128 + rng.integers(-noise, noise + 1, size=(*size, 3))
    frame[0, 0] = 128 + noise
    return frame.astype(np.uint8)


def make_mvtec(
    root: Path,
    *,
    defects: dict[str, tuple[str, int]] | None = None,
    n_good_test: int = 4,
    n_train: int = 3,
    size: tuple[int, int] = (64, 64),
    with_train: bool = True,
    seed: int = 0,
) -> Path:
    """Write an MVTec-layout dataset under ``root`` and return ``root``.

    Args:
        root: output folder (created).
        defects: defect folder name -> (kind from :data:`DEFECT_KINDS`, number of images);
            default ``{"blob": ("blob", 3)}``.
        n_good_test: images in ``test/good``.
        n_train: images in ``train/good`` (when ``with_train``).
        size: ``(height, width)`` of every image and mask in px.
        with_train: write ``train/good``.
        seed: RNG seed (noise and blob positions).
    """
    rng = np.random.default_rng(seed)
    defects = {"blob": ("blob", 3)} if defects is None else defects
    h, w = size
    if with_train:
        _write_many(root / "train" / "good", [grey_frame(rng, size) for _ in range(n_train)])
    _write_many(root / "test" / "good", [grey_frame(rng, size) for _ in range(n_good_test)])
    for name, (kind, count) in defects.items():
        if kind not in DEFECT_KINDS:
            raise ValueError(f"unknown defect kind {kind!r}; choose one of {DEFECT_KINDS}")
        for i in range(count):
            mask = np.zeros(size, np.uint8)
            y, x = int(rng.integers(2, h // 2)), int(rng.integers(2, w // 2))
            mask[y : y + h // 5, x : x + w // 5] = 255
            if i % 2:  # a second region in every other image (PRO averages over regions)
                mask[h - 6 : h - 3, w - 6 : w - 3] = 255
            if kind == "blob":
                frame = grey_frame(rng, size)
                frame[mask > 0] = 255
            else:
                frame = np.full((*size, 3), 128, np.uint8)
            _write(root / "test" / name / f"{i:03d}.png", frame)
            _write(root / "ground_truth" / name / f"{i:03d}_mask.png", mask)
    return root


def _write_many(folder: Path, frames: list[np.ndarray]) -> None:
    for i, frame in enumerate(frames):
        _write(folder / f"{i:03d}.png", frame)


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write {path}")
