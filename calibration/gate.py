"""Accuracy gate: does a reduced-precision variant still behave like the FP32 graph?

Both graphs score the same validation images, batch by batch; the gate compares:

* image scores: Pearson and Spearman correlation with FP32;
* scores and anomaly maps: the errors of :mod:`fod.compare` (the one comparator, shared with the
  export and engine parity checks): max and mean map error relative to the largest FP32 map value
  over the set, NaN or infinite outputs counted;
* detection: AUROC change against FP32, when labelled defects are given;
* the calibrated threshold: verdict agreement (NG/OK) with FP32 at the FP32 threshold, and the
  variant's false alarms on the good images at that threshold (must not exceed FP32's).

For scale, the report also gives the *noise floor*: the same comparisons between FP32 on the images
and FP32 on the images with +-1 grey level of uniform noise (less than any camera's noise). A variant
that tracks FP32 about as well as that is as good as the model's own input sensitivity allows.

A failing variant is not written unless the user forces it (``fod quantize --force``); the report
goes into ``manifest.variants[precision]`` either way it is written.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.reader import iter_batches
from fod.compare import OutputComparator
from fod.package import Calibration
from fod.runner import Runner


@dataclass(frozen=True)
class GateCriteria:
    """Pass limits of the accuracy gate (defaults documented in ``docs/calibration.md``).

    Attributes:
        min_score_pearson: lowest Pearson correlation of image scores with FP32.
        min_score_spearman: lowest Spearman (rank) correlation of image scores with FP32.
        max_map_error: highest ``map_max_rel_err`` of :mod:`fod.compare` (max |map - map_fp32| / max |map_fp32|).
        max_mean_map_error: highest ``map_mean_rel_err`` (mean |map - map_fp32| / max |map_fp32|).
        max_auroc_drop: highest AUROC(FP32) - AUROC(variant), labelled defects only.
        min_verdict_agreement: lowest fraction of images with the same verdict at the FP32 threshold.
        max_extra_false_alarms: good images the variant may flag beyond those FP32 flags.
    """

    min_score_pearson: float = 0.99
    min_score_spearman: float = 0.95
    max_map_error: float = 0.10
    max_mean_map_error: float = 0.01
    max_auroc_drop: float = 0.01
    min_verdict_agreement: float = 0.98
    max_extra_false_alarms: int = 0


@dataclass
class GateReport:
    """Result of the gate for one variant.

    Attributes:
        precision: ``fp16`` or ``int8``.
        passed: every applicable check passed.
        failures: one line per failed check, with the value and the limit.
        skipped: checks that could not run and why (no defects, not calibrated).
        metrics: every measured number.
        criteria: the limits used.
    """

    precision: str
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    criteria: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes None)."""
        return _clean(asdict(self))


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _correlations(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    if a.size < 3:
        return float("nan"), float("nan")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        same = float(np.allclose(a, b, rtol=1e-3, atol=1e-6))
        return same, same
    return float(stats.pearsonr(a, b)[0]), float(stats.spearmanr(a, b)[0])


def run_gate(
    precision: str,
    fp32: Runner,
    variant: Runner,
    good: list[Path],
    defects: list[Path] | None = None,
    *,
    calibration: Calibration | None = None,
    criteria: GateCriteria | None = None,
    batch_size: int = 4,
    noise_floor: bool = True,
) -> GateReport:
    """Score the validation images with both runners and check the criteria.

    Args:
        precision: name of the variant (``fp16``, ``int8``), for the report.
        fp32: runner of the FP32 graph.
        variant: runner of the variant graph (same ``image_size``).
        good: good validation images.
        defects: labelled defective validation images (enables the AUROC check).
        calibration: the package's calibration (enables the threshold checks); None skips them.
        criteria: pass limits; None uses :class:`GateCriteria` defaults.
        batch_size: images per inference call.
        noise_floor: also score the images with +-1 grey level of noise in FP32 (one more pass).

    Returns:
        :class:`GateReport`.

    Raises:
        fod.errors.DataError: an unreadable image (named).
    """
    criteria = criteria or GateCriteria()
    defects = defects or []
    paths = list(good) + list(defects)
    labels = np.array([0] * len(good) + [1] * len(defects))
    fp32.activate()
    variant.activate()
    s32: list[np.ndarray] = []
    svar: list[np.ndarray] = []
    comparator = OutputComparator()
    noise = OutputComparator()
    rng = np.random.default_rng(0)
    s_noise: list[np.ndarray] = []
    for _, images in iter_batches(paths, fp32.image_size, batch_size):
        a = fp32.infer(images)
        b = variant.infer(images)
        if noise_floor:
            noisy = np.clip(images.astype(np.int16) + rng.integers(-1, 2, images.shape), 0, 255).astype(np.uint8)
            c = fp32.infer(noisy)
            s_noise.append(np.asarray(c.score, np.float64).reshape(-1))
            noise.add(a.score, a.anomaly_map, c.score, c.anomaly_map)
        comparator.add(a.score, a.anomaly_map, b.score, b.anomaly_map)
        s32.append(np.asarray(a.score, np.float64).reshape(-1))
        svar.append(np.asarray(b.score, np.float64).reshape(-1))
    errors = comparator.result()
    nonfinite = errors.nonfinite_map_values
    a32 = np.concatenate(s32)
    av_raw = np.concatenate(svar)
    bad_scores = errors.nonfinite_scores
    # a NaN / inf score can never be trusted: rank it below every real score (never NG)
    floor = float(np.min(av_raw[np.isfinite(av_raw)])) - 1.0 if bad_scores < av_raw.size else -1.0
    av = np.where(np.isfinite(av_raw), av_raw, floor)
    pearson, spearman = _correlations(a32, av)
    report = GateReport(precision=precision, criteria=asdict(criteria))
    m = report.metrics
    m.update(
        {
            "n_images": len(paths),
            "n_good": len(good),
            "n_defect": len(defects),
            "score_pearson": pearson,
            "score_spearman": spearman,
            **{k: v for k, v in errors.to_dict().items() if k not in ("n_images", "worst_image")},
        }
    )
    an = np.concatenate(s_noise) if s_noise else a32
    if noise_floor and s_noise:
        n_pearson, n_spearman = _correlations(a32, an)
        m["fp32_noise_floor"] = {
            "score_pearson": n_pearson,
            "score_spearman": n_spearman,
            "map_mean_rel_err": noise.result().map_mean_rel_err,
        }

    def check(ok: bool, line: str) -> None:
        if not ok:
            report.failures.append(line)

    check(nonfinite == 0, f"{nonfinite} NaN/inf anomaly-map values")
    check(bad_scores == 0, f"{bad_scores} NaN/inf image scores")
    check(pearson >= criteria.min_score_pearson, f"score Pearson {pearson:.4f} < {criteria.min_score_pearson}")
    check(
        spearman >= criteria.min_score_spearman,
        f"score Spearman {spearman:.4f} < {criteria.min_score_spearman}",
    )
    check(
        m["map_max_rel_err"] <= criteria.max_map_error,
        f"max map error {m['map_max_rel_err']:.4f} of the largest FP32 map value > {criteria.max_map_error}",
    )
    check(
        m["map_mean_rel_err"] <= criteria.max_mean_map_error,
        f"mean map error {m['map_mean_rel_err']:.5f} of the largest FP32 map value > {criteria.max_mean_map_error}",
    )
    if good and defects:
        from sklearn.metrics import roc_auc_score

        auc32 = float(roc_auc_score(labels, a32))
        aucv = float(roc_auc_score(labels, av))
        m.update({"auroc_fp32": auc32, "auroc_variant": aucv, "auroc_change": aucv - auc32})
        if "fp32_noise_floor" in m:
            m["fp32_noise_floor"]["auroc_change"] = float(roc_auc_score(labels, an)) - auc32
        check(
            auc32 - aucv <= criteria.max_auroc_drop,
            f"AUROC {aucv:.4f} vs FP32 {auc32:.4f}: drop {auc32 - aucv:.4f} > {criteria.max_auroc_drop}",
        )
    else:
        report.skipped.append("AUROC change: no labelled defects in the validation set (pass --val ROOT)")
    if calibration is not None:
        thr = calibration.image_threshold
        v32 = a32 >= thr
        vv = av >= thr
        agreement = float(np.mean(v32 == vv)) if a32.size else float("nan")
        is_good = labels == 0
        fa32 = int(np.count_nonzero(v32 & is_good))
        fav = int(np.count_nonzero(vv & is_good))
        m.update(
            {
                "threshold": thr,
                "verdict_agreement": agreement,
                "false_alarms_fp32": fa32,
                "false_alarms_variant": fav,
                "good_score_max_fp32": float(a32[is_good].max()) if is_good.any() else float("nan"),
                "good_score_max_variant": float(av[is_good].max()) if is_good.any() else float("nan"),
            }
        )
        if defects:
            m["recall_fp32"] = float(np.mean(v32[~is_good]))
            m["recall_variant"] = float(np.mean(vv[~is_good]))
        check(
            agreement >= criteria.min_verdict_agreement,
            f"verdict agreement {agreement:.4f} at the FP32 threshold < {criteria.min_verdict_agreement}",
        )
        check(
            fav - fa32 <= criteria.max_extra_false_alarms,
            f"{fav} false alarms on {int(is_good.sum())} good images at the FP32 threshold {thr:.6g} "
            f"(FP32: {fa32}): the calibrated threshold does not hold for this variant; keep FP32",
        )
    else:
        report.skipped.append("threshold checks: the package is not calibrated (run `fod calibrate` first)")
    report.passed = not report.failures
    return report
