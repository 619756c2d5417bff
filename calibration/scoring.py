"""Run a model package over image files and collect what calibration needs: scores and map samples.

Everything goes through a :class:`fod.runner.Runner` (ONNX Runtime here), one batch at a time, so
memory stays bounded: the anomaly maps are kept only as a strided subsample.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from calibration.reader import iter_batches
from fod.preprocess import read_image
from fod.runner import Runner

log = logging.getLogger(__name__)

#: at most this many anomaly-map values are kept per scored set (strided subsample)
MAX_KEPT_PIXELS = 8_000_000


@dataclass(frozen=True)
class ScoredImages:
    """Scores of a list of images and a subsample of their anomaly maps.

    Attributes:
        paths: the images, in order.
        scores: ``[N]`` float32 raw image scores.
        map_samples: ``[N, h', w']`` float32, every ``stride``-th map pixel in each axis.
        stride: subsampling stride of ``map_samples`` (1 = full maps).
        seconds: wall time of the whole pass in s.
    """

    paths: list[Path]
    scores: np.ndarray
    map_samples: np.ndarray
    stride: int
    seconds: float


def map_stride(n_images: int, image_size: tuple[int, int], max_pixels: int = MAX_KEPT_PIXELS) -> int:
    """Smallest stride (per axis) that keeps at most ``max_pixels`` map values for ``n_images``."""
    total = max(1, n_images) * image_size[0] * image_size[1]
    stride = 1
    while total / (stride * stride) > max_pixels:
        stride += 1
    return stride


def score_images(
    runner: Runner, paths: list[Path], *, batch_size: int = 4, stride: int | None = None, what: str = "images"
) -> ScoredImages:
    """Score image files with an active (or activatable) runner.

    Args:
        runner: the backend; activated here when it is not.
        paths: image files (any size; resized by the package's preprocessing).
        batch_size: images per inference call.
        stride: map subsampling stride; None picks :func:`map_stride`.
        what: name of the set for the progress log.

    Returns:
        :class:`ScoredImages`.

    Raises:
        fod.errors.DataError: an unreadable image (named).
    """
    runner.activate()
    size = runner.image_size
    stride = stride or map_stride(len(paths), size)
    scores: list[np.ndarray] = []
    samples: list[np.ndarray] = []
    start = time.perf_counter()
    done = 0
    last_log = start
    for chunk, images in iter_batches(paths, size, batch_size):
        out = runner.infer(images)
        scores.append(np.asarray(out.score, dtype=np.float32).reshape(-1))
        samples.append(np.asarray(out.anomaly_map[:, 0, ::stride, ::stride], dtype=np.float32))
        done += len(chunk)
        now = time.perf_counter()
        if now - last_log > 10.0:
            log.info("scored %d/%d %s (%.1f s)", done, len(paths), what, now - start)
            last_log = now
    h, w = -(-size[0] // stride), -(-size[1] // stride)
    return ScoredImages(
        list(paths),
        np.concatenate(scores) if scores else np.zeros(0, np.float32),
        np.concatenate(samples) if samples else np.zeros((0, h, w), np.float32),
        stride,
        time.perf_counter() - start,
    )


def load_mask_samples(mask_paths: list[Path | None], image_size: tuple[int, int], stride: int) -> np.ndarray:
    """Ground-truth masks at model resolution, subsampled like :attr:`ScoredImages.map_samples`.

    Args:
        mask_paths: one mask file per image, None where the image has no mask (all False).
        image_size: ``(height, width)`` of the model input in px.
        stride: the subsampling stride.

    Returns:
        ``[N, h', w']`` bool.

    Raises:
        fod.errors.InputError: an unreadable mask file (named).
    """
    h, w = image_size
    out = []
    for mask_path in mask_paths:
        if mask_path is None:
            mask = np.zeros((h, w), dtype=bool)
        else:
            raw = read_image(str(mask_path), flags=cv2.IMREAD_GRAYSCALE)
            mask = cv2.resize(raw, (w, h), interpolation=cv2.INTER_NEAREST) > 0
        out.append(mask[::stride, ::stride])
    return np.stack(out) if out else np.zeros((0, -(-h // stride), -(-w // stride)), dtype=bool)
