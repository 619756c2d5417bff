"""Anomaly-detection metrics: image AUROC, pixel AUROC and PRO (per-region overlap).

All functions take ground truth first, as scikit-learn does, and return a float in [0, 1], or NaN
with a :class:`MetricWarning` when the metric is undefined (a split with a single class, no
ground-truth region). They are exact or nearly so and memory-sane for a few hundred 256x256 maps:

* :func:`image_auroc`: ``sklearn.metrics.roc_auc_score`` on image scores.
* :func:`pixel_auroc`: exact ROC AUC over every pixel (ties count one half), computed as the
  Mann-Whitney statistic with one sort of the negative pixels and a binary search of the positive
  ones. It equals ``roc_auc_score(masks.ravel(), maps.ravel())`` but needs about 10x less time and
  memory on 27 M pixels (sklearn: 24 s, 1.8 GB).
* :func:`pro_score`: normalised area under the per-region-overlap curve up to a false-positive
  rate of 0.3 (Bergmann et al., "Uninformed Students", CVPR 2020; the MVTec AD evaluation code).
  For a threshold t, a pixel is predicted anomalous when ``map >= t``; the PRO is the mean, over
  every ground-truth connected component (8-connectivity) of every image, of the fraction of the
  component predicted anomalous; the FPR is the fraction of all good pixels (mask 0, in good and
  defective images) predicted anomalous. The curve is evaluated at a fixed set of thresholds (data
  quantiles, see :func:`pro_curve`), integrated with the trapezoidal rule up to FPR 0.3 (linear
  interpolation at 0.3) and divided by 0.3, so a perfect map gives 1.0 and a random one about 0.15.
"""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

#: false-positive-rate limit of the PRO integral (the MVTec AD convention)
PRO_MAX_FPR = 0.3


class MetricWarning(UserWarning):
    """A metric is undefined on this split (single class, no region) and is reported as NaN."""


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level ROC AUC.

    Args:
        labels: ``[N]`` int or bool, 1 (or True) for a defective image.
        scores: ``[N]`` float image scores, higher means more anomalous.

    Returns:
        The AUROC in [0, 1]; NaN with a :class:`MetricWarning` when only one class is present.

    Raises:
        ValueError: the arrays differ in length, or a score is not finite.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    _check_pair(labels, scores, "labels", "scores")
    if labels.all() or not labels.any():
        return _undefined("image AUROC", "the split has only good or only defective images")
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level ROC AUC over every pixel of every image (exact, ties count one half).

    Args:
        masks: ``[N, H, W]`` bool (or 0/1, 0/255) ground truth; nonzero is anomalous (any shape,
            e.g. flat pixel samples as in :func:`calibration.thresholds.evaluate_pixels`).
        maps: ``[N, H, W]`` float anomaly maps (float16 or float32, compared as float32; float64
            kept as is), same shape.

    Returns:
        The AUROC in [0, 1]; NaN with a :class:`MetricWarning` when no pixel, or every pixel, is
        anomalous.

    Raises:
        ValueError: shapes differ, or a map value is not finite.
    """
    masks = np.asarray(masks).astype(bool, copy=False)
    maps = np.asarray(maps)
    _check_pair(masks, maps, "masks", "maps")
    dtype = np.float64 if maps.dtype == np.float64 else np.float32  # float64 values are not rounded
    positives = maps[masks].astype(dtype, copy=False)
    if positives.size == 0 or positives.size == masks.size:
        return _undefined("pixel AUROC", "the split has no anomalous pixel or no good pixel")
    negatives = maps[~masks].astype(dtype, copy=False)  # a copy (boolean indexing)
    negatives.sort()
    # Mann-Whitney U: for each positive, the negatives strictly below it plus half of the tied ones.
    below = np.searchsorted(negatives, positives, side="left").astype(np.float64)
    below_or_equal = np.searchsorted(negatives, positives, side="right").astype(np.float64)
    wins = float(np.sum(below + below_or_equal)) / 2.0
    return wins / (float(positives.size) * float(negatives.size))


def pro_curve(
    masks: np.ndarray, maps: np.ndarray, *, max_fpr: float = PRO_MAX_FPR, num_thresholds: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region-overlap curve evaluated at a fixed set of thresholds.

    The thresholds are actual map values: ``num_thresholds`` quantiles of the good pixels between
    FPR 0 and ``max_fpr`` (dense where the integral is taken), ``num_thresholds`` quantiles of the
    anomalous pixels (dense along the PRO axis) and the minimum (the point FPR 1, PRO 1). At each
    threshold FPR and PRO are exact (counted over all pixels, image by image: memory stays at a
    few copies of one image plus the quantile sample). When there are fewer distinct values than
    thresholds, the curve is the exact one.

    Args:
        masks: ``[N, H, W]`` bool ground truth (nonzero is anomalous).
        maps: ``[N, H, W]`` float anomaly maps.
        max_fpr: FPR up to which thresholds are placed densely.
        num_thresholds: quantiles taken from each of the good and the anomalous pixels.

    Returns:
        ``(fpr, pro, thresholds)``: ``[K + 1]`` float64 each, ordered by decreasing threshold
        (increasing FPR), starting at the point ``(0, 0)`` for threshold ``+inf``.

    Raises:
        ValueError: shapes differ, a value is not finite, or there is no ground-truth region or
            no good pixel (see :func:`pro_score` for the NaN convention).
    """
    masks = np.asarray(masks).astype(bool, copy=False)
    maps = np.asarray(maps)
    _check_pair(masks, maps, "masks", "maps")
    if masks.ndim != 3:
        raise ValueError(f"masks and maps must be [N, H, W], got {list(masks.shape)}")
    n_good = int(masks.size - np.count_nonzero(masks))
    if n_good == 0 or n_good == masks.size:
        raise ValueError("PRO needs both good pixels and ground-truth regions")
    thresholds = _pro_thresholds(masks, maps, max_fpr=max_fpr, num_thresholds=num_thresholds)
    ascending = thresholds[::-1].astype(np.float32)  # for searchsorted
    k = ascending.size
    good_hist = np.zeros(k + 1, dtype=np.int64)
    region_hists: list[np.ndarray] = []
    region_sizes: list[np.ndarray] = []
    for mask, amap in zip(masks, maps):
        values = amap.astype(np.float32, copy=False)
        # bin b = number of thresholds <= value: the pixel is flagged at the b lowest thresholds
        bins = np.searchsorted(ascending, values, side="right")
        good_hist += np.bincount(bins[~mask], minlength=k + 1)
        if not mask.any():
            continue
        n_labels, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        region = labels[mask] - 1  # 0 .. n_labels - 2
        flat = np.bincount(region * (k + 1) + bins[mask], minlength=(n_labels - 1) * (k + 1))
        hist = flat.reshape(n_labels - 1, k + 1)
        region_hists.append(hist)
        region_sizes.append(hist.sum(axis=1))
    hists = np.concatenate(region_hists)
    sizes = np.concatenate(region_sizes).astype(np.float64)
    # flagged at ascending threshold j <=> bin > j; counts for thresholds in decreasing order:
    good_flagged = np.cumsum(good_hist[::-1])[:-1]  # [k], threshold index from the highest
    region_flagged = np.cumsum(hists[:, ::-1], axis=1)[:, :-1]  # [R, k]
    fpr = good_flagged / float(n_good)
    pro = (region_flagged / sizes[:, None]).mean(axis=0)
    return (
        np.concatenate([[0.0], fpr]),
        np.concatenate([[0.0], pro]),
        np.concatenate([[np.inf], thresholds.astype(np.float64)]),
    )


def pro_score(
    masks: np.ndarray, maps: np.ndarray, *, max_fpr: float = PRO_MAX_FPR, num_thresholds: int = 200
) -> float:
    """Normalised area under the PRO curve up to ``max_fpr`` (MVTec AD "AU-PRO", 0.3 by default).

    Args:
        masks: ``[N, H, W]`` bool ground truth (nonzero is anomalous).
        maps: ``[N, H, W]`` float anomaly maps (float16 or float32).
        max_fpr: upper integration limit on the FPR axis, in (0, 1].
        num_thresholds: quantiles per pixel class that define the curve (see :func:`pro_curve`);
            200 puts the FPR points about 0.0015 apart below 0.3.

    Returns:
        The area divided by ``max_fpr``, in [0, 1]; NaN with a :class:`MetricWarning` when there
        is no ground-truth region or no good pixel.

    Raises:
        ValueError: shapes differ, a value is not finite, or ``max_fpr`` is outside (0, 1].
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    masks = np.asarray(masks).astype(bool, copy=False)
    n_anomalous = int(np.count_nonzero(masks))
    if n_anomalous == 0 or n_anomalous == masks.size:
        return _undefined("PRO", "the split has no ground-truth region or no good pixel")
    fpr, pro, _ = pro_curve(masks, maps, max_fpr=max_fpr, num_thresholds=num_thresholds)
    return _area_up_to(fpr, pro, max_fpr) / max_fpr


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under ``y(x)`` for x in [0, x_max]; x non-decreasing, vertical steps allowed."""
    inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs, ys = x[:inside], y[:inside]
    if inside < x.size:  # interpolate the curve at x_max between the last point inside and the next
        x0, y0, x1, y1 = x[inside - 1], y[inside - 1], x[inside], y[inside]
        y_end = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_max), np.append(ys, y_end)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def _pro_thresholds(
    masks: np.ndarray, maps: np.ndarray, *, max_fpr: float, num_thresholds: int
) -> np.ndarray:
    """Distinct map values in decreasing order: good-pixel and anomalous-pixel quantiles, and the minimum."""
    good = _sample(maps, ~masks)
    bad = _sample(maps, masks)
    levels_good = np.linspace(1.0 - max_fpr, 1.0, num_thresholds)
    levels_bad = np.linspace(0.0, 1.0, num_thresholds)
    candidates = np.concatenate(
        [
            np.quantile(good, levels_good, method="inverted_cdf"),
            np.quantile(bad, levels_bad, method="inverted_cdf"),
            [min(float(good.min()), float(bad.min()))],
        ]
    )
    return np.unique(candidates.astype(np.float32))[::-1]


def _sample(maps: np.ndarray, select: np.ndarray, limit: int = 2_000_000) -> np.ndarray:
    """Values of ``maps`` where ``select`` (float32), strided to about ``limit`` values plus the extremes."""
    values = maps[select].astype(np.float32, copy=False)
    if values.size <= limit:
        return values
    step = math.ceil(values.size / limit)
    return np.concatenate([values[::step], [values.min(), values.max()]])


def _check_pair(truth: np.ndarray, values: np.ndarray, truth_name: str, values_name: str) -> None:
    if truth.shape != values.shape:
        raise ValueError(
            f"{truth_name} {list(truth.shape)} and {values_name} {list(values.shape)} differ in shape"
        )
    if values.size and not np.isfinite(values).all():
        raise ValueError(f"{values_name} contain NaN or inf; the model output is broken (check the model)")


def _undefined(name: str, why: str) -> float:
    warnings.warn(f"{name} is undefined ({why}); reported as NaN", MetricWarning, stacklevel=3)
    return math.nan
