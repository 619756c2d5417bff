"""Image and pixel thresholds fitted on good-image scores, with an honest false-alarm statement.

The statistics, in one place (see ``docs/calibration.md`` for the why):

* A false alarm (FA) is a good part whose raw image score is ``>= threshold``. The false-alarm
  rate (FAR) is the probability of that for a random good part.
* With ``n`` good images scored and ``k`` of them at or above a threshold, the one-sided 95%
  Clopper-Pearson upper bound of the FAR is ``beta.ppf(0.95, k + 1, n - k)``. When the threshold
  sits between two order statistics of the *same* sample, this bound is also distribution-free
  (the FAR at the ``(n-k)``-th order statistic is ``Beta(k + 1, n - k)`` distributed for i.i.d.
  scores), so it stays valid although the threshold was chosen on those images.
* The smallest FAR that ``n`` images can demonstrate at 95% is the bound for ``k = 0``:
  ``1 - 0.05 ** (1 / n)``, about ``3 / n`` (the rule of three).
* If the target FAR is at least that, the threshold is placed between the two order statistics
  that leave the largest number ``k`` of good scores at or above it while the 95% upper bound of
  the FAR stays ``<= target`` (so the target holds with 95% confidence, not only on average).
* Otherwise (e.g. 200 images and a target of 1e-3) the target cannot be demonstrated: the
  threshold falls back to ``max(good) + k_margin * robust_sigma`` with ``robust_sigma = 1.4826 *
  MAD(good)`` (the median absolute deviation scaled to a normal sigma, insensitive to the few
  largest scores) and ``k_margin = 1`` by default; the report states the FAR bound this sample
  does support and how many good images the target would need.

No torch here; numpy, scipy and scikit-learn only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from calibration.errors import CalibrationDataError

#: good images below which ``fod calibrate`` warns that the sample shows little (the threshold still comes)
MIN_IMAGES_THRESHOLD = 30
#: smallest number of good images ``fod calibrate`` accepts at all: with fewer, even no false alarm
#: among them leaves a 95 % upper bound of the false-alarm rate above 45 %
SMALL_SAMPLE_MIN = 5
#: confidence level of every FAR bound reported
CONFIDENCE = 0.95
#: default margin of the fallback rule, in robust sigmas above the largest good score
DEFAULT_MARGIN_K = 1.0
#: default quantile of good-image anomaly-map pixels used as the pixel (mask) threshold
DEFAULT_PIXEL_QUANTILE = 0.999
#: above this many good images the leave-one-out FAR estimate uses this many folds instead
_LOO_MAX_N = 1000
_KFOLD = 20


def far_upper_bound(exceedances: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper confidence bound of a false-alarm rate.

    Args:
        exceedances: good images at or above the threshold (``0 <= exceedances <= n``).
        n: good images scored (``n >= 1``).
        confidence: confidence level in (0, 1).

    Returns:
        The bound in [0, 1].

    Raises:
        ValueError: ``n < 1`` or ``exceedances`` outside ``[0, n]``.
    """
    if n < 1 or not 0 <= exceedances <= n:
        raise ValueError(f"need 0 <= exceedances <= n and n >= 1, got exceedances={exceedances}, n={n}")
    if exceedances == n:
        return 1.0
    return float(stats.beta.ppf(confidence, exceedances + 1, n - exceedances))


def min_demonstrable_far(n: int, confidence: float = CONFIDENCE) -> float:
    """Smallest FAR that ``n`` good images with zero false alarms demonstrate: ``1 - (1 - c) ** (1 / n)``.

    About ``3 / n`` at 95% confidence (the rule of three).
    """
    return 1.0 - (1.0 - confidence) ** (1.0 / n)


def images_needed(target_far: float, confidence: float = CONFIDENCE) -> int:
    """Good images needed (with no false alarm among them) to demonstrate ``target_far``."""
    return math.ceil(math.log(1.0 - confidence) / math.log1p(-target_far))


def robust_sigma(scores: np.ndarray) -> float:
    """``1.4826 * MAD`` of ``scores`` (a normal sigma that ignores outliers); falls back to the std.

    Returns a strictly positive value: when both MAD and std are zero (all scores equal) it returns
    ``1e-6 * max(1, |median|)``, so that a margin above the maximum is never empty.
    """
    values = np.asarray(scores, dtype=np.float64)
    median = float(np.median(values))
    sigma = 1.4826 * float(np.median(np.abs(values - median)))
    if not sigma > 0:
        sigma = float(np.std(values))
    if not sigma > 0:
        sigma = 1e-6 * max(1.0, abs(median))
    return sigma


@dataclass(frozen=True)
class ThresholdFit:
    """An image-score threshold fitted on good images, with what the sample supports.

    Attributes:
        threshold: raw image score at or above which a part is NG.
        rule: ``order_statistic`` (target demonstrable) or ``max_plus_margin`` (fallback, or
            target demonstrable only with zero exceedances).
        method: the rule in words, with the numbers, for the manifest and the report.
        n: good images the threshold was fitted on.
        target_far: requested FAR per good part.
        target_supported: whether ``n`` images can demonstrate ``target_far`` at 95%.
        exceedances: good images at or above the threshold (false alarms on the fitting set).
        expected_far: ``(exceedances + 1) / (n + 1)``, the mean FAR of the order statistic just
            below the threshold (an estimate from above).
        far_upper_95: 95% Clopper-Pearson upper bound of the FAR at the threshold.
        min_demonstrable_far: smallest FAR the sample can demonstrate at 95% (about ``3 / n``).
        images_needed: good images (none above threshold) needed to demonstrate ``target_far``.
        margin: the margin added to the largest good score (``max_plus_margin`` only).
        margin_k: the margin in robust sigmas.
        robust_sigma: ``1.4826 * MAD`` of the good scores.
        good_stats: min, median, max, mean, std of the good scores.
    """

    threshold: float
    rule: str
    method: str
    n: int
    target_far: float
    target_supported: bool
    exceedances: int
    expected_far: float
    far_upper_95: float
    min_demonstrable_far: float
    images_needed: int
    margin: float | None
    margin_k: float
    robust_sigma: float
    good_stats: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return asdict(self)


def _check_scores(scores: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size and not np.all(np.isfinite(values)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise CalibrationDataError(
            f"{bad} of {values.size} {what} scores are NaN or infinite; the model output is broken "
            "(check the package with `fod eval`, or re-export it)"
        )
    return values


def fit_image_threshold(
    good_scores: np.ndarray,
    target_far: float,
    *,
    margin_k: float = DEFAULT_MARGIN_K,
    min_images: int = MIN_IMAGES_THRESHOLD,
    confidence: float = CONFIDENCE,
) -> ThresholdFit:
    """Fit the image threshold on good-image scores (rule in the module docstring).

    Args:
        good_scores: ``[n]`` raw image scores of held-out good images (not training images).
        target_far: requested false-alarm rate per good part, in (0, 1).
        margin_k: fallback margin above the largest good score, in robust sigmas (``>= 0``).
        min_images: refuse fewer good images than this.
        confidence: confidence level of the FAR bounds.

    Returns:
        :class:`ThresholdFit`.

    Raises:
        CalibrationDataError: fewer than ``min_images`` scores, or NaN / infinite scores.
        ValueError: ``target_far`` outside (0, 1) or negative ``margin_k``.
    """
    if not 0.0 < target_far < 1.0:
        raise ValueError(f"target_far must be in (0, 1), got {target_far}")
    if margin_k < 0:
        raise ValueError(f"margin_k must be >= 0, got {margin_k}")
    s = np.sort(_check_scores(good_scores, "good-image"))
    n = int(s.size)
    if n < max(1, min_images):
        raise CalibrationDataError(
            f"only {n} good images to fit the threshold on; at least {min_images} are needed "
            f"(a FAR below {min_demonstrable_far(max(n, 1)):.2g} cannot be shown with {n}): "
            "add held-out good images"
        )
    p_min = min_demonstrable_far(n, confidence)
    needed = images_needed(target_far, confidence)
    sigma = robust_sigma(s)
    good_stats = {
        "min": float(s[0]),
        "median": float(np.median(s)),
        "max": float(s[-1]),
        "mean": float(np.mean(s)),
        "std": float(np.std(s)),
    }
    supported = target_far >= p_min
    # largest k with upper bound <= target: the upper bound grows with k, so scan up from 0
    k_best = -1
    if supported:
        k = 0
        while k < n and far_upper_bound(k, n, confidence) <= target_far:
            k_best = k
            k += 1
    margin: float | None = None
    if k_best >= 1:
        below, above = float(s[n - k_best - 1]), float(s[n - k_best])
        threshold = 0.5 * (below + above) if above > below else float(np.nextafter(below, np.inf))
        rule = "order_statistic"
    else:
        margin = margin_k * sigma
        threshold = float(s[-1]) + margin
        if not threshold > s[-1]:
            threshold = float(np.nextafter(s[-1], np.inf))
        rule = "max_plus_margin"
    exceed = int(np.count_nonzero(s >= threshold))
    upper = far_upper_bound(exceed, n, confidence)
    expected = (exceed + 1) / (n + 1)
    pct = f"{confidence:.0%}"
    if rule == "order_statistic":
        method = (
            f"order statistic: {exceed} of {n} good scores at or above the threshold, placed so that "
            f"the {pct} "
            f"upper bound of the FAR ({upper:.3g}) is <= the target {target_far:g}"
        )
    elif supported:
        method = (
            f"max good score + {margin_k:g} x robust sigma (1.4826 x MAD = {sigma:.4g}): "
            f"the target {target_far:g} "
            f"is only demonstrable with zero of {n} good images above the threshold"
        )
    else:
        method = (
            f"fallback: max good score + {margin_k:g} x robust sigma (1.4826 x MAD = {sigma:.4g}); "
            f"{n} good images can "
            f"demonstrate a FAR of at best {p_min:.3g} at {pct}, the target {target_far:g} needs >= {needed} "
            f"good images with none above the threshold"
        )
    return ThresholdFit(
        threshold=float(threshold),
        rule=rule,
        method=method,
        n=n,
        target_far=float(target_far),
        target_supported=bool(supported),
        exceedances=exceed,
        expected_far=float(expected),
        far_upper_95=float(upper),
        min_demonstrable_far=float(p_min),
        images_needed=int(needed),
        margin=margin,
        margin_k=float(margin_k),
        robust_sigma=float(sigma),
        good_stats=good_stats,
    )


def leave_one_out_far(
    good_scores: np.ndarray,
    target_far: float,
    *,
    margin_k: float = DEFAULT_MARGIN_K,
    confidence: float = CONFIDENCE,
) -> float:
    """Cross-validated FAR of the fitting rule: refit without each image and test it on that image.

    The FAR on the fitting images is biased low by construction (with the fallback rule it is 0);
    this estimate is not. Leave-one-out up to 1000 images, 20-fold (deterministic) above.

    Args:
        good_scores: ``[n]`` raw good-image scores, ``n >= 2``.
        target_far: as for :func:`fit_image_threshold`.
        margin_k: as for :func:`fit_image_threshold`.
        confidence: as for :func:`fit_image_threshold`.

    Returns:
        Fraction of held-out good images at or above the threshold fitted without them.
    """
    s = _check_scores(good_scores, "good-image")
    n = int(s.size)
    if n < 2:
        return float("nan")
    folds = n if n <= _LOO_MAX_N else _KFOLD
    fold_of = np.arange(n) % folds
    alarms = 0
    for f in range(folds):
        held = fold_of == f
        fit = fit_image_threshold(s[~held], target_far, margin_k=margin_k, min_images=1, confidence=confidence)
        alarms += int(np.count_nonzero(s[held] >= fit.threshold))
    return alarms / n


def normalization_anchors(good_scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """``(norm_min, norm_max)`` for :func:`fod.normalization.normalize_score`.

    ``norm_min`` is the lowest good score (mapped to 0) and ``norm_max = threshold + (threshold -
    norm_min)`` (mapped to 1), so the normalised score has the same slope on both sides of 0.5 and
    does not depend on which defects happened to be in the calibration set.

    Returns:
        ``(norm_min, norm_max)`` with ``norm_min < threshold < norm_max``.
    """
    low = float(np.min(good_scores))
    if not low < threshold:
        low = threshold - max(0.5 * abs(threshold), 1e-6)
    return low, threshold + (threshold - low)


def fit_pixel_threshold(good_pixels: np.ndarray, quantile: float = DEFAULT_PIXEL_QUANTILE) -> float:
    """Pixel (mask) threshold: the ``quantile`` of anomaly-map values over good images.

    Args:
        good_pixels: anomaly-map values of good images (any shape, float).
        quantile: in (0, 1); 0.999 flags 0.1% of good pixels.

    Returns:
        The raw anomaly-map value at or above which a pixel belongs to the mask.

    Raises:
        CalibrationDataError: no pixels or non-finite values.
        ValueError: ``quantile`` outside (0, 1).
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"pixel quantile must be in (0, 1), got {quantile}")
    values = _check_scores(good_pixels, "good-image anomaly-map")
    if values.size == 0:
        raise CalibrationDataError("no good-image anomaly-map pixels to fit the pixel threshold on")
    return float(np.quantile(values, quantile))


def evaluate_labelled(
    good_scores: np.ndarray,
    defect_scores: np.ndarray,
    threshold: float,
    defect_types: list[str] | None = None,
) -> dict[str, Any]:
    """Recall, false alarms, AUROC and the F1-optimal threshold with labelled defects.

    Args:
        good_scores: ``[n_good]`` raw scores of good images.
        defect_scores: ``[n_defect]`` raw scores of defective images (``n_defect >= 1``).
        threshold: the chosen image threshold.
        defect_types: optional ``[n_defect]`` defect type per image, for recall per type.

    Returns:
        dict with ``n_good``, ``n_defect``, ``recall``, ``false_alarms``, ``far``, ``precision``,
        ``f1`` (at ``threshold``), ``image_auroc``, ``f1_optimal`` (threshold, f1, recall, far)
        and ``recall_per_type``.
    """
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    good = _check_scores(good_scores, "good-image")
    bad = _check_scores(defect_scores, "defect-image")
    tp = int(np.count_nonzero(bad >= threshold))
    fp = int(np.count_nonzero(good >= threshold))
    recall = tp / bad.size if bad.size else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + (bad.size - tp)) if bad.size else float("nan")
    out: dict[str, Any] = {
        "n_good": int(good.size),
        "n_defect": int(bad.size),
        "threshold": float(threshold),
        "recall": float(recall),
        "false_alarms": fp,
        "far": fp / good.size if good.size else float("nan"),
        "precision": float(precision),
        "f1": float(f1),
    }
    if good.size and bad.size:
        y = np.concatenate([np.zeros(good.size), np.ones(bad.size)])
        s = np.concatenate([good, bad])
        out["image_auroc"] = float(roc_auc_score(y, s))
        prec, rec, thr = precision_recall_curve(y, s)
        f1s = np.where(prec[:-1] + rec[:-1] > 0, 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12), 0)
        best = int(np.argmax(f1s))
        lower = s[s < thr[best]]
        # midway to the next lower score: the same F1 on this set, less sensitive to a small shift
        t_best = float(0.5 * (thr[best] + lower.max())) if lower.size else float(thr[best])
        out["f1_optimal"] = {
            "threshold": t_best,
            "f1": float(f1s[best]),
            "recall": float(np.mean(bad >= t_best)),
            "far": float(np.mean(good >= t_best)),
        }
    if defect_types is not None and bad.size:
        per: dict[str, dict[str, float]] = {}
        types = np.asarray(defect_types)
        for name in sorted(set(defect_types)):
            sel = bad[types == name]
            per[name] = {"n": int(sel.size), "recall": float(np.mean(sel >= threshold))}
        out["recall_per_type"] = per
    return out


def evaluate_pixels(values: np.ndarray, labels: np.ndarray, pixel_threshold: float) -> dict[str, Any]:
    """Pixel precision, recall and F1 of the mask threshold against ground-truth masks.

    Args:
        values: anomaly-map values (flat float array, a subsample is fine).
        labels: same-size bool array, True inside a ground-truth defect mask.
        pixel_threshold: the mask threshold.

    Returns:
        dict with ``n_pixels``, ``precision``, ``recall``, ``f1`` at ``pixel_threshold``,
        ``pixel_auroc`` and ``f1_optimal`` (threshold, f1).
    """
    from sklearn.metrics import precision_recall_curve

    from fod.metrics import pixel_auroc

    v = np.asarray(values, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    pred = v >= pixel_threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    out: dict[str, Any] = {
        "n_pixels": int(v.size),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
    }
    if y.any() and (~y).any():
        out["pixel_auroc"] = pixel_auroc(y, v)  # the one pixel AUROC (fod.metrics)
        prec, rec, thr = precision_recall_curve(y, v)
        f1s = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
        best = int(np.argmax(f1s))
        out["f1_optimal"] = {"threshold": float(thr[best]), "f1": float(f1s[best])}
    return out
