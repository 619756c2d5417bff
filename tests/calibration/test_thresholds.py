"""Threshold statistics: FAR bounds, the two fitting rules, normalisation, labelled evaluation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from calibration.errors import CalibrationDataError
from calibration.thresholds import (
    evaluate_labelled,
    evaluate_pixels,
    far_upper_bound,
    fit_image_threshold,
    fit_pixel_threshold,
    images_needed,
    leave_one_out_far,
    min_demonstrable_far,
    normalization_anchors,
    robust_sigma,
)
from fod.normalization import normalize_score
from fod.package import Calibration


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (0, 100, 1 - 0.05 ** (1 / 100)),  # zero exceedances: closed form
        (0, 3000, 1 - 0.05 ** (1 / 3000)),  # ~ 3 / n (rule of three)
        (5, 1000, float(stats.beta.ppf(0.95, 6, 995))),  # Clopper-Pearson
        (10, 10, 1.0),  # every image above: no information
    ],
)
def test_far_upper_bound_table(k, n, expected):
    assert far_upper_bound(k, n) == pytest.approx(expected, rel=1e-9)


def test_far_upper_bound_grows_with_exceedances_and_rejects_bad_counts():
    bounds = [far_upper_bound(k, 500) for k in range(10)]
    assert all(a < b for a, b in itertools.pairwise(bounds))
    with pytest.raises(ValueError, match="exceedances"):
        far_upper_bound(11, 10)


def test_rule_of_three_and_images_needed():
    assert min_demonstrable_far(1000) == pytest.approx(3 / 1000, rel=0.01)
    assert images_needed(1e-3) == 2995
    # images_needed is the smallest n whose zero-exceedance bound reaches the target
    assert min_demonstrable_far(2995) <= 1e-3 < min_demonstrable_far(2994)


@pytest.mark.parametrize(
    ("n", "target", "rule", "supported"),
    [
        (200, 1e-3, "max_plus_margin", False),  # 3/200 = 0.015 > 1e-3: fallback
        (158, 0.01, "max_plus_margin", False),  # the magnetic-tile case at 1%: still not demonstrable
        (400, 0.01, "max_plus_margin", True),  # demonstrable, but only with zero exceedances
        (5000, 0.01, "order_statistic", True),  # enough images to leave some above
    ],
)
def test_fit_picks_the_rule_the_sample_supports(n, target, rule, supported):
    scores = np.random.default_rng(n).normal(1.0, 0.1, n)
    fit = fit_image_threshold(scores, target)
    assert fit.rule == rule
    assert fit.target_supported is supported
    assert fit.n == n
    assert fit.exceedances == int(np.count_nonzero(scores >= fit.threshold))
    assert fit.far_upper_95 == pytest.approx(far_upper_bound(fit.exceedances, n))
    if supported:
        assert fit.far_upper_95 <= target
    else:
        assert f"needs >= {images_needed(target)}" in fit.method


def test_fallback_is_max_plus_k_robust_sigma():
    scores = np.random.default_rng(1).normal(5.0, 0.5, 200)
    fit = fit_image_threshold(scores, 1e-3, margin_k=2.0)
    assert fit.threshold == pytest.approx(scores.max() + 2.0 * robust_sigma(scores))
    assert fit.exceedances == 0
    assert fit.far_upper_95 == pytest.approx(min_demonstrable_far(200))
    assert fit.expected_far == pytest.approx(1 / 201)


def test_order_statistic_threshold_meets_the_target_on_the_true_distribution():
    rng = np.random.default_rng(7)
    scores = rng.normal(0.0, 1.0, 20000)
    fit = fit_image_threshold(scores, 1e-3)
    assert fit.rule == "order_statistic"
    assert fit.exceedances >= 1
    true_far = float(stats.norm.sf(fit.threshold))
    assert true_far <= 1e-3  # the 95% bound holds here (fixed seed)
    s = np.sort(scores)
    assert s[-fit.exceedances - 1] < fit.threshold <= s[-fit.exceedances]


def test_equal_scores_still_give_a_threshold_above_all_of_them():
    fit = fit_image_threshold(np.full(50, 0.25), 1e-3)
    assert fit.threshold > 0.25
    assert fit.exceedances == 0


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        (np.ones(10), "only 10 good images"),  # below the minimum of 30
        (np.r_[np.ones(40), np.nan], "NaN or infinite"),  # a broken model output
    ],
)
def test_fit_refuses_bad_input(scores, match):
    with pytest.raises(CalibrationDataError, match=match):
        fit_image_threshold(scores, 1e-3)


def test_leave_one_out_far_catches_an_outlier_the_in_sample_far_hides():
    scores = np.r_[np.random.default_rng(3).normal(1.0, 0.01, 60), 3.0]
    fit = fit_image_threshold(scores, 1e-3)
    assert fit.exceedances == 0  # in-sample: no false alarm by construction
    assert leave_one_out_far(scores, 1e-3) >= 1 / 61  # held out, the outlier is one


def test_normalisation_anchors_put_the_threshold_at_one_half():
    good = np.array([0.1, 0.2, 0.3, 0.35])
    low, high = normalization_anchors(good, 0.4)
    assert (low, high) == pytest.approx((0.1, 0.7))
    cal = Calibration(
        image_threshold=0.4, pixel_threshold=0.3, norm_min=low, norm_max=high, method="t", target_far=1e-3, n_normal=4
    )
    assert normalize_score(0.4, cal) == 0.5
    assert normalize_score(0.1, cal) == 0.0
    assert normalize_score(0.7, cal) == pytest.approx(1.0)
    assert normalize_score(5.0, cal) == 1.0  # clipped
    assert normalize_score(0.2, cal) < normalize_score(0.3, cal) < 0.5


def test_pixel_threshold_is_the_quantile_of_good_pixels():
    pixels = np.arange(10000, dtype=np.float32).reshape(10, 1000)
    assert fit_pixel_threshold(pixels, 0.999) == pytest.approx(np.quantile(pixels, 0.999))
    with pytest.raises(ValueError, match="quantile"):
        fit_pixel_threshold(pixels, 1.0)


def test_evaluate_labelled_reports_recall_false_alarms_auroc_and_f1_threshold():
    good = np.array([0.1, 0.2, 0.3, 0.4])
    bad = np.array([0.35, 0.8, 0.9, 1.0])
    out = evaluate_labelled(good, bad, 0.5, ["a", "b", "a", "b"])
    assert out["recall"] == 0.75
    assert out["false_alarms"] == 0
    assert out["image_auroc"] == pytest.approx(15 / 16)
    assert out["recall_per_type"] == {"a": {"n": 2, "recall": 0.5}, "b": {"n": 2, "recall": 1.0}}
    f1o = out["f1_optimal"]
    # flagging everything from 0.35 up (one false alarm, no miss) has the best F1 = 8/9
    assert f1o["f1"] == pytest.approx(8 / 9)
    assert f1o["f1"] > out["f1"]
    assert 0.3 < f1o["threshold"] <= 0.35  # midway to the next lower score
    assert math.isclose(f1o["recall"], 1.0)
    assert math.isclose(f1o["far"], 0.25)


def test_evaluate_pixels_counts_against_masks():
    values = np.array([0.1, 0.9, 0.8, 0.2, 0.7])
    labels = np.array([False, True, True, False, False])
    out = evaluate_pixels(values, labels, 0.75)
    assert out["precision"] == 1.0
    assert out["recall"] == 1.0
    assert out["pixel_auroc"] == 1.0
