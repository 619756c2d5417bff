"""``fod quantize``: write ``model.int8.onnx`` (Q/DQ) or ``model.fp16.onnx`` behind an accuracy gate.

    fod quantize --model PKG_DIR --precision int8|fp16 --calib DIR [--val DIR] [--force]

``--calib``: good images for INT8 activation ranges: a folder, or an MVTec root (its ``train/good``).
``--val``: validation images for the gate: a folder of good images, or an MVTec root (``test/good`` and
``test/<defect>``, which enables the AUROC check). Without ``--val`` an MVTec ``--calib`` root
uses its ``test/`` split, a plain folder is reused (weaker: the quantizer saw those images).
A variant that fails the gate is not written unless ``--force``; the gate report, the settings
and the ORT CPU latency against FP32 go into ``manifest.variants[precision]``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
from pathlib import Path
from typing import Any

from calibration.errors import CalibrationDataError, GateFailedError
from calibration.gate import GateCriteria, run_gate
from calibration.quantize import Int8Settings, compare_latency, convert_fp16, quantize_int8
from calibration.reader import (
    DEFAULT_MAX_CALIB_IMAGES,
    MIN_IMAGES_QUANTIZE,
    SMALL_QUANTIZE_MIN,
    ImageCalibrationDataReader,
    ImageSet,
    resolve_calibration_images,
    resolve_evaluation_set,
)
from calibration.report import format_gate_report
from fod.package import VARIANT_FILES, ModelPackage
from fod.runner import OnnxRuntimeRunner

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fod quantize`` on the CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "quantize",
        help="write an INT8 (Q/DQ) or FP16 variant of the package's model, behind an accuracy gate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="model package folder (from `fod export`)")
    p.add_argument("--precision", required=True, choices=["int8", "fp16"], help="variant to write")
    p.add_argument(
        "--calib",
        required=True,
        type=Path,
        help="good images: a folder, or an MVTec root (INT8 ranges from train/good)",
    )
    p.add_argument(
        "--val",
        type=Path,
        default=None,
        help="gate images: a folder of good images or an MVTec root (test/good + test/<defect>)",
    )
    p.add_argument("--force", action="store_true", help="write the variant even if it fails the gate")
    p.add_argument(
        "--calib-images",
        type=int,
        default=DEFAULT_MAX_CALIB_IMAGES,
        help="use at most this many calibration images, evenly spaced (default %(default)s)",
    )
    p.add_argument(
        "--min-images",
        type=int,
        default=SMALL_QUANTIZE_MIN,
        help=(
            f"refuse fewer calibration / validation images (default and lowest {SMALL_QUANTIZE_MIN}); below "
            f"{MIN_IMAGES_QUANTIZE} a warning says the gate rests on a small sample"
        ),
    )
    p.add_argument(
        "--calibrate-method",
        choices=["minmax", "percentile", "entropy"],
        default="minmax",
        help="INT8 activation range method (default minmax: the others clip the activations of defects)",
    )
    p.add_argument(
        "--no-synthetic-defects",
        action="store_true",
        help="calibrate INT8 ranges on the good images only (default adds copies with synthetic defects)",
    )
    p.add_argument(
        "--target",
        choices=["tensorrt", "cpu"],
        default="tensorrt",
        help="tensorrt: symmetric INT8 activations (required by TensorRT); cpu: UINT8 activations (x86 ORT)",
    )
    p.add_argument(
        "--keep-last-matmul",
        action="store_true",
        help="keep each branch's reconstruction head MatMul in FP32",
    )
    p.add_argument(
        "--scope",
        choices=["transformer", "all", "backbone"],
        default="transformer",
        help="INT8 nodes: the FOD levels' MatMuls (default), also the backbone Convs (all), or only the Convs",
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per inference call (default 4)")
    p.add_argument(
        "--bench-repeats",
        type=int,
        default=10,
        help="timed ORT calls per model for the latency comparison (0 skips it; default %(default)s)",
    )
    p.add_argument("--bench-batch", type=int, default=1, help="batch size of the latency comparison (default 1)")
    p.set_defaults(run=run)
    return p


def _validation_set(args: argparse.Namespace, calib_paths: list[Path]) -> tuple[ImageSet, str]:
    if args.val is not None:
        val = resolve_evaluation_set(args.val)
        return val, f"--val {args.val}"
    if (args.calib / "test").is_dir():
        return resolve_evaluation_set(args.calib), f"{args.calib}/test (no --val given)"
    log.warning(
        "no --val: the gate runs on the calibration images, which the quantizer saw; pass --val for an honest check"
    )
    return ImageSet(calib_paths, [], args.calib, None, "folder"), "the calibration images (no --val given)"


def run(args: argparse.Namespace) -> int:
    """Write the variant if it passes the gate (or ``--force``); returns the exit code (0).

    Raises:
        CalibrationDataError: too few calibration or validation images.
        GateFailedError: the variant failed the gate and ``--force`` was not given.
        QuantizationError: the quantizer or converter failed.
        fod.errors.PackageError: not a package, corrupt, or no FP32 model.
    """
    if args.min_images < SMALL_QUANTIZE_MIN:
        raise CalibrationDataError(
            f"--min-images {args.min_images} is below the lowest accepted ({SMALL_QUANTIZE_MIN})"
        )
    pkg = ModelPackage(args.model)
    fp32_path = pkg.onnx_path("fp32")
    precision: str = args.precision
    calib_paths = resolve_calibration_images(args.calib, args.calib_images)
    if precision == "int8" and len(calib_paths) < args.min_images:
        raise CalibrationDataError(
            f"{args.calib}: {len(calib_paths)} calibration images, at least {args.min_images} are "
            f"needed for INT8 "
            "activation ranges (--min-images); add good images"
        )
    val, val_source = _validation_set(args, calib_paths)
    n_val = len(val.good) + len(val.defects)
    if n_val < args.min_images:
        raise CalibrationDataError(
            f"{val_source}: {n_val} validation images, at least {args.min_images} are needed for the accuracy gate"
        )
    if min(n_val, len(calib_paths)) < MIN_IMAGES_QUANTIZE:
        log.warning(
            "%d calibration and %d validation images: a small sample. The variant is gated on it, but a "
            "correlation or AUROC change measured on so few images is rough; check the variant on the line "
            "(or with `fod eval`) before you rely on it",
            len(calib_paths),
            n_val,
        )
    name = VARIANT_FILES[precision]
    candidate = pkg.root / f"model.{precision}.candidate.onnx"
    try:
        if precision == "int8":
            settings = Int8Settings(
                calibrate_method=args.calibrate_method,
                target=args.target,
                keep_last_matmul=args.keep_last_matmul,
                scope=args.scope,
            )
            reader = ImageCalibrationDataReader(
                calib_paths, pkg.image_size, batch_size=args.batch_size, augment=not args.no_synthetic_defects
            )
            log.info("calibrating INT8 ranges on %d images from %s", len(calib_paths), args.calib)
            quant_info = quantize_int8(fp32_path, candidate, reader, settings)
            quant_info["synthetic_defects"] = not args.no_synthetic_defects
        else:
            quant_info = convert_fp16(fp32_path, candidate)
        log.info("running the accuracy gate on %d images (%s)", n_val, val_source)
        report = run_gate(
            precision,
            OnnxRuntimeRunner(fp32_path, pkg.image_size),
            OnnxRuntimeRunner(candidate, pkg.image_size),
            val.good,
            [d.path for d in val.defects],
            calibration=pkg.manifest.calibration,
            criteria=GateCriteria(),
            batch_size=args.batch_size,
        )
        entry: dict[str, Any] = {
            "file": name,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "passed": report.passed,
            "forced": bool(args.force and not report.passed),
            "calib_source": str(args.calib),
            "calib_images": len(calib_paths) if precision == "int8" else 0,
            "val_source": val_source,
            "quantization": quant_info,
            "tools": _tool_versions(),
            "gate": report.to_dict(),
        }
        if args.bench_repeats > 0:
            lat = compare_latency(
                {"fp32": fp32_path, precision: candidate},
                pkg.image_size,
                args.bench_batch,
                args.bench_repeats,
            )
            lat["speedup"] = round(lat["fp32"]["p50_ms"] / max(lat[precision]["p50_ms"], 1e-9), 3)  # type: ignore[assignment]
            entry["latency"] = lat
        text = format_gate_report(precision, entry)
        print(text)
        if not report.passed and not args.force:
            raise GateFailedError(
                f"{precision} variant failed the accuracy gate ({'; '.join(report.failures)}); "
                f"{name} was not written (use --force to write it anyway)",
                entry,
            )
        if (pkg.root / name).exists():
            old = pkg.manifest.variants.get(precision, {})
            log.warning("replacing %s (previous one from %s)", pkg.root / name, old.get("created_utc", "?"))
        candidate.replace(pkg.root / name)
        if "latency" in entry:
            entry["latency"][precision]["onnx"] = str(pkg.root / name)
        pkg.manifest.variants[precision] = entry
        pkg.add_file(name)  # records the sha256 and saves the manifest
        log.info("wrote %s and its report into %s", pkg.root / name, pkg.root / "manifest.json")
        return 0
    finally:
        candidate.unlink(missing_ok=True)


def _tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}
