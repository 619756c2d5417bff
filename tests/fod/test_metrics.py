"""Metrics on known inputs: perfect, inverted, hand-computed PRO, single-class splits, sklearn parity."""

from __future__ import annotations

import itertools
import math

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fod.metrics import MetricWarning, image_auroc, pixel_auroc, pro_curve, pro_score


def _blob_masks(n: int = 6, size: int = 32, seed: int = 0) -> np.ndarray:
    """[n, size, size] bool: even images good, odd images with one or two rectangles."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n, 2):
        for _ in range(1 + i % 2 + (i // 2) % 2):
            y, x = rng.integers(0, size - 6, size=2)
            h, w = rng.integers(2, 6, size=2)
            masks[i, y : y + h, x : x + w] = True
    return masks


def _brute_force_pro(masks: np.ndarray, maps: np.ndarray, max_fpr: float) -> float:
    """PRO from every distinct value as a threshold, written plainly (loops), as a reference."""
    regions = []
    for image, mask in enumerate(masks):
        n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions += [(image, labels == r) for r in range(1, n)]
    good = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        fpr = flagged[good].mean()
        pros = []
        for image, region in regions:
            pros.append(flagged[image][region].mean())
        points.append((fpr, float(np.mean(pros))))
    # integrate to max_fpr with interpolation at the boundary
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


# ---- image AUROC -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),  # perfect ranking
        ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 0.0),  # inverted ranking
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),  # all tied: chance
        ([0, 0, 1], [0.1, 0.3, 0.2], 0.5),  # the defect beats one of two good images
    ],
)
def test_image_auroc_known_values(labels: list[int], scores: list[float], expected: float) -> None:
    assert image_auroc(np.array(labels), np.array(scores)) == pytest.approx(expected)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]], ids=["only-good", "only-defective"])
def test_image_auroc_single_class_is_nan_with_warning(labels: list[int]) -> None:
    with pytest.warns(MetricWarning, match="image AUROC is undefined"):
        value = image_auroc(np.array(labels), np.array([0.1, 0.2, 0.3]))
    assert math.isnan(value)


def test_image_auroc_rejects_non_finite_scores() -> None:
    with pytest.raises(ValueError, match="NaN or inf"):
        image_auroc(np.array([0, 1]), np.array([0.1, np.nan]))


# ---- pixel AUROC -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pixel_auroc_perfect_and_inverted(dtype: type) -> None:
    masks = _blob_masks()
    perfect: np.ndarray = masks.astype(dtype)
    assert pixel_auroc(masks, perfect) == pytest.approx(1.0)
    assert pixel_auroc(masks, 1 - perfect) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_auroc_equals_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(seed=seed)
    # coarse values (many ties) shifted up inside the masks
    maps = (rng.integers(0, 8, size=masks.shape) + 3 * masks * rng.integers(0, 2, size=masks.shape)).astype(
        np.float32
    )
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_accepts_0_255_masks() -> None:
    masks = _blob_masks()
    assert pixel_auroc(masks.astype(np.uint8) * 255, masks.astype(np.float32)) == pytest.approx(1.0)


@pytest.mark.parametrize("fill", [False, True], ids=["no-anomalous-pixel", "all-anomalous"])
def test_pixel_auroc_single_class_is_nan_with_warning(fill: bool) -> None:
    masks = np.full((2, 8, 8), fill)
    with pytest.warns(MetricWarning, match="pixel AUROC is undefined"):
        assert math.isnan(pixel_auroc(masks, np.zeros((2, 8, 8), np.float32)))


def test_pixel_auroc_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_auroc(np.zeros((2, 8, 8), bool), np.zeros((2, 8, 9), np.float32))


# ---- PRO ---------------------------------------------------------------------------------------


def test_pro_perfect_map_is_one_and_inverted_is_zero() -> None:
    masks = _blob_masks()
    assert pro_score(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert pro_score(masks, 1.0 - masks.astype(np.float32)) == pytest.approx(0.0)


def test_pro_hand_computed_case() -> None:
    # One 4x4 image, two 2-pixel regions (8-connected: diagonal pixels join), 12 good pixels.
    #   region A = (0,0),(1,1) -> values 0.9, 0.9;   region B = (3,2),(3,3) -> values 0.9, 0.1
    #   good pixels: one at 0.5, eleven at 0.0
    # thresholds (>=):  0.9 -> FPR 0,    PRO (1 + 1/2)/2 = 0.75
    #                   0.5 -> FPR 1/12, PRO 0.75
    #                   0.1 -> FPR 1/12, PRO 1
    #                   0.0 -> FPR 1,    PRO 1
    # area to 0.3 = 0.75 * 1/12 + 1 * (0.3 - 1/12) = 0.2791667; / 0.3 = 0.9305556
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[1, 1] = mask[3, 2] = mask[3, 3] = True
    amap = np.zeros((4, 4), np.float32)
    amap[0, 0] = amap[1, 1] = amap[3, 2] = 0.9
    amap[3, 3] = 0.1
    amap[0, 3] = 0.5
    fpr, pro, thresholds = pro_curve(mask[None], amap[None])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 12, 1 / 12, 1])
    np.testing.assert_allclose(pro, [0, 0.75, 0.75, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.5, 0.1, 0.0], rtol=1e-6)
    assert pro_score(mask[None], amap[None]) == pytest.approx((0.75 / 12 + (0.3 - 1 / 12)) / 0.3)
    # 4-connectivity would make three regions and a different number: 8-connectivity is used
    assert pro_score(mask[None], amap[None]) == pytest.approx(0.9305556, abs=1e-6)


def test_pro_counts_regions_equally_not_pixels() -> None:
    # a large region found entirely and a small one missed: PRO = 1/2 at low FPR, pixel recall would be ~0.97
    mask = np.zeros((1, 40, 40), bool)
    mask[0, 0:12, 0:12] = True  # 144 px, found
    mask[0, 30:32, 30:32] = True  # 4 px, missed
    amap = np.zeros((1, 40, 40), np.float32)
    amap[0, 0:12, 0:12] = 1.0
    fpr, pro, _ = pro_curve(mask, amap)
    assert pro[1] == pytest.approx(0.5)
    assert fpr[1] == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_pro_matches_brute_force_when_thresholds_cover_every_value(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(n=4, size=16, seed=seed)
    maps = (rng.random(masks.shape) + 0.7 * masks).astype(np.float32)
    expected = _brute_force_pro(masks, maps, 0.3)
    assert pro_score(masks, maps, num_thresholds=5000) == pytest.approx(expected, abs=1e-9)
    # the default 200 quantiles per class approximate it closely
    assert pro_score(masks, maps) == pytest.approx(expected, abs=0.01)


def test_pro_max_fpr_one_equals_full_area() -> None:
    masks = _blob_masks()
    maps = masks.astype(np.float32) * 0.5 + 0.25
    assert pro_score(masks, maps, max_fpr=1.0) == pytest.approx(1.0)


def test_pro_only_good_images_is_nan_with_warning() -> None:
    with pytest.warns(MetricWarning, match="PRO is undefined"):
        assert math.isnan(pro_score(np.zeros((3, 8, 8), bool), np.zeros((3, 8, 8), np.float32)))


def test_pro_rejects_bad_max_fpr() -> None:
    with pytest.raises(ValueError, match="max_fpr"):
        pro_score(np.ones((1, 2, 2), bool), np.ones((1, 2, 2), np.float32), max_fpr=0.0)
