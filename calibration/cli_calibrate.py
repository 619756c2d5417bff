"""``fod calibrate``: fit the image threshold, normalisation and pixel threshold of a model package.

    fod calibrate --model PKG_DIR --normal DIR [--anomalous DIR] [--target-far 0.001] [--min-images 5]

``--normal`` is a folder of held-out good images, or an MVTec-layout root (then ``test/good`` is the
good set and ``test/<defect>`` the labelled defects; ``train/good`` is never used: the model was fitted
on it). It may also be a ``fod train`` run folder: then the good images are those the run kept out
of training (``holdout_files`` in its ``train.json``), the path for small data sets. The FP32 graph
is run with ONNX Runtime; the result replaces ``manifest.calibration`` (the old values are logged),
a report is printed and saved with a score histogram beside the manifest.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from calibration.errors import CalibrationDataError
from calibration.reader import resolve_evaluation_set
from calibration.report import format_calibration_report, save_score_histogram
from calibration.scoring import load_mask_samples, map_stride, score_images
from calibration.thresholds import (
    DEFAULT_MARGIN_K,
    DEFAULT_PIXEL_QUANTILE,
    MIN_IMAGES_THRESHOLD,
    SMALL_SAMPLE_MIN,
    evaluate_labelled,
    evaluate_pixels,
    fit_image_threshold,
    fit_pixel_threshold,
    images_needed,
    leave_one_out_far,
    min_demonstrable_far,
    normalization_anchors,
)
from fod.package import Calibration, ModelPackage
from fod.runner import OnnxRuntimeRunner

log = logging.getLogger(__name__)

HISTOGRAM_NAME = "calibration_scores.png"
REPORT_NAME = "calibration_report.txt"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fod calibrate`` on the CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "calibrate",
        help="fit thresholds and score normalisation on held-out good images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="model package folder (from `fod export`)")
    p.add_argument(
        "--normal",
        required=True,
        type=Path,
        help=(
            "held-out good images: a folder of images, an MVTec root (uses test/good and test/<defect>), or "
            "the run folder of `fod train` (uses the good images its --holdout kept out of training)"
        ),
    )
    p.add_argument(
        "--anomalous",
        type=Path,
        default=None,
        help="labelled defects: folder of images or of defect-type folders, or MVTec root (test/<defect>)",
    )
    p.add_argument("--target-far", type=float, default=0.001, help="false alarms per good part (default 0.001)")
    p.add_argument(
        "--min-images",
        type=int,
        default=SMALL_SAMPLE_MIN,
        help=(
            f"refuse fewer good images (default and lowest accepted {SMALL_SAMPLE_MIN}); below "
            f"{MIN_IMAGES_THRESHOLD} the report says how little the sample can show"
        ),
    )
    p.add_argument(
        "--margin-k",
        type=float,
        default=DEFAULT_MARGIN_K,
        help="fallback rule: threshold = max good score + K x 1.4826 x MAD (default %(default)s)",
    )
    p.add_argument(
        "--pixel-quantile",
        type=float,
        default=DEFAULT_PIXEL_QUANTILE,
        help="pixel threshold = this quantile of good-image anomaly-map values (default %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per inference call (default 4)")
    p.set_defaults(run=run)
    return p


def run_holdout_images(folder: Path) -> tuple[Path, list[Path]] | None:
    """The good images a ``fod train`` run kept out of training, when ``folder`` is such a run folder.

    Reads ``train.json``: ``data.root`` (the training image folder) and ``holdout_files`` (names in it).

    Returns:
        ``(training image folder, held-out image files)``, or None when ``folder`` has no ``train.json``.

    Raises:
        CalibrationDataError: ``train.json`` lists no held-out images (trained with ``--holdout 0``),
            or a listed file is missing.
    """
    record_path = Path(folder) / "train.json"
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    names = record.get("holdout_files") or []
    root = Path(str((record.get("data") or {}).get("root", "")))
    if not names:
        raise CalibrationDataError(
            f"{record_path}: the run kept no good images out of training; train again with --holdout 0.3 "
            "(or pass a folder of other good images to --normal)"
        )
    files = [root / name for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CalibrationDataError(
            f"{record_path}: held-out images {missing[:3]} are not there any more (data.root {root}); "
            "pass the folder of good images to --normal instead"
        )
    return root, sorted(files)


def run(args: argparse.Namespace) -> int:
    """Calibrate the package; returns the exit code (0).

    Raises:
        CalibrationDataError: too few good images, or a bad option value.
        fod.errors.PackageError: not a package, corrupt, or no FP32 model.
        fod.errors.DataError: an unreadable image.
    """
    if args.min_images < SMALL_SAMPLE_MIN:
        raise CalibrationDataError(
            f"--min-images {args.min_images} is below the lowest accepted ({SMALL_SAMPLE_MIN}): with fewer "
            "good images no false-alarm rate below ~45% can be shown"
        )
    if not 0.0 < args.target_far < 1.0:
        raise CalibrationDataError(f"--target-far {args.target_far} must be in (0, 1), e.g. 0.001")
    if not 0.0 < args.pixel_quantile < 1.0:
        raise CalibrationDataError(f"--pixel-quantile {args.pixel_quantile} must be in (0, 1), e.g. 0.999")
    pkg = ModelPackage(args.model)
    onnx_path = pkg.onnx_path("fp32")
    holdout = run_holdout_images(args.normal)
    if holdout is not None:
        images = resolve_evaluation_set(holdout[0], args.anomalous)
        images = dataclasses.replace(images, good=holdout[1], good_source=args.normal / "train.json")
    else:
        images = resolve_evaluation_set(args.normal, args.anomalous)
    if len(images.good) < args.min_images:
        raise CalibrationDataError(
            f"{images.good_source}: {len(images.good)} good images, at least {args.min_images} are needed "
            "(--min-images); add held-out good images, or train with a larger --holdout and pass the run folder"
        )
    if len(images.good) < MIN_IMAGES_THRESHOLD:
        log.warning(
            "%d held-out good images: a small sample. The threshold is fitted, but with no false alarm among "
            "%d images the false-alarm rate can only be shown to be below %.0f %% (95 %% bound); a rate of "
            "%g needs %d images. Expect to adjust the threshold on the line (MQTT set_threshold).",
            len(images.good),
            len(images.good),
            100 * min_demonstrable_far(len(images.good)),
            args.target_far,
            images_needed(args.target_far),
        )
    if not images.defects:
        log.warning("no labelled defects: recall and AUROC will not be reported (pass --anomalous DIR)")
    calibration = calibrate(
        pkg,
        onnx_path,
        images.good,
        [d.path for d in images.defects],
        defect_types=images.defect_types,
        defect_masks=[d.mask_path for d in images.defects],
        target_far=args.target_far,
        margin_k=args.margin_k,
        pixel_quantile=args.pixel_quantile,
        batch_size=args.batch_size,
        min_images=args.min_images,
        sources={"normal_source": str(images.good_source), "defect_source": images.defect_source},
    )
    previous = pkg.manifest.calibration
    if previous is not None:
        log.warning(
            "replacing the package's calibration: image threshold %.6g -> %.6g, pixel threshold %.6g -> %.6g",
            previous.image_threshold,
            calibration.image_threshold,
            previous.pixel_threshold,
            calibration.pixel_threshold,
        )
    pkg.manifest.calibration = calibration
    pkg.save()
    if pkg.manifest.variants:
        log.warning(
            "variants %s were gated against the previous threshold; re-run `fod quantize` to re-check them",
            sorted(pkg.manifest.variants),
        )
    text = format_calibration_report(calibration, previous)
    (pkg.root / REPORT_NAME).write_text(text + "\n")
    print(text)
    return 0


def calibrate(
    pkg: ModelPackage,
    onnx_path: Path,
    good: list[Path],
    defects: list[Path],
    *,
    defect_types: list[str] | None = None,
    defect_masks: list[Path | None] | None = None,
    target_far: float = 0.001,
    margin_k: float = DEFAULT_MARGIN_K,
    pixel_quantile: float = DEFAULT_PIXEL_QUANTILE,
    batch_size: int = 4,
    min_images: int = MIN_IMAGES_THRESHOLD,
    sources: dict[str, Any] | None = None,
) -> Calibration:
    """Score the images with ``onnx_path`` and build the package's :class:`~fod.package.Calibration`.

    Also writes the score histogram beside the manifest. Does not change the manifest.

    Args:
        pkg: the model package (for ``image_size`` and the output folder).
        onnx_path: the graph to score with (the FP32 model).
        good: held-out good images.
        defects: labelled defective images (may be empty).
        defect_types: defect type per defect image.
        defect_masks: mask file (or None) per defect image.
        target_far: requested false-alarm rate.
        margin_k: fallback margin in robust sigmas.
        pixel_quantile: quantile of good map values used as the pixel threshold.
        batch_size: images per inference call.
        min_images: fewest good images accepted.
        sources: extra entries for ``details`` (where the images came from).

    Returns:
        The new calibration (``details`` holds the fit, the evaluation and the sources).

    Raises:
        CalibrationDataError: too few good images or non-finite scores.
    """
    runner = OnnxRuntimeRunner(onnx_path, pkg.image_size)
    stride = map_stride(len(good) + len(defects), pkg.image_size)
    with runner:
        scored_good = score_images(runner, good, batch_size=batch_size, stride=stride, what="good images")
        scored_bad = (
            score_images(runner, defects, batch_size=batch_size, stride=stride, what="defect images")
            if defects
            else None
        )
    fit = fit_image_threshold(scored_good.scores, target_far, margin_k=margin_k, min_images=min_images)
    loo = leave_one_out_far(scored_good.scores, target_far, margin_k=margin_k)
    norm_min, norm_max = normalization_anchors(scored_good.scores, fit.threshold)
    pixel_threshold = fit_pixel_threshold(scored_good.map_samples, pixel_quantile)
    details: dict[str, Any] = {
        "fit": fit.to_dict(),
        "far_leave_one_out": loo,
        "pixel_rule": f"{pixel_quantile:g} quantile of good-image anomaly-map values",
        "n_defect": len(defects),
        "onnx": onnx_path.name,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(scored_good.seconds + (scored_bad.seconds if scored_bad else 0.0), 1),
        **(sources or {}),
    }
    f1_thr: float | None = None
    if scored_bad is not None and scored_bad.scores.size:
        labelled = evaluate_labelled(scored_good.scores, scored_bad.scores, fit.threshold, defect_types)
        details["labelled"] = labelled
        f1_thr = labelled.get("f1_optimal", {}).get("threshold")
        masks = defect_masks or []
        if masks and any(m is not None for m in masks):
            with_mask = [i for i, m in enumerate(masks) if m is not None]
            gt_bad = load_mask_samples([masks[i] for i in with_mask], pkg.image_size, scored_good.stride)
            values = np.concatenate(
                [scored_good.map_samples.reshape(-1), scored_bad.map_samples[with_mask].reshape(-1)]
            )
            labels = np.concatenate([np.zeros(scored_good.map_samples.size, bool), gt_bad.reshape(-1)])
            details["pixels"] = evaluate_pixels(values, labels, pixel_threshold)
    hist = save_score_histogram(
        scored_good.scores,
        scored_bad.scores if scored_bad is not None else None,
        fit.threshold,
        pkg.root / HISTOGRAM_NAME,
        f1_threshold=f1_thr,
        title=f"{pkg.manifest.model_name}: raw image scores",
    )
    details["histogram"] = hist.name
    details["score_quantiles_good"] = {
        q: float(np.quantile(scored_good.scores, float(q))) for q in ("0.5", "0.9", "0.99")
    }
    return Calibration(
        image_threshold=fit.threshold,
        pixel_threshold=pixel_threshold,
        norm_min=norm_min,
        norm_max=norm_max,
        method=fit.method,
        target_far=target_far,
        n_normal=fit.n,
        expected_far=fit.expected_far,
        far_upper_95=fit.far_upper_95,
        details=_json_safe(details),
    )


def _json_safe(value: Any) -> Any:
    """NaN / inf -> None, numpy scalars -> Python, recursively (the manifest is strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
