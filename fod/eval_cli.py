"""``fod eval``: image AUROC, pixel AUROC and PRO of a checkpoint or a model package on a test split.

Usage::

    fod eval --model RUN_DIR|PKG_DIR --data DIR [--json OUT.json] [--grid OUT.png] [--batch-size N]

A folder with ``manifest.json`` is a model package and runs through ONNX Runtime (exactly the
graph the agent runs); any other folder must be a training run dir (``fod train --out``) and runs
through PyTorch. ``DIR`` needs only ``test/`` and ``ground_truth/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fod.errors import CheckpointError, PackageError
from fod.package import MANIFEST_NAME, VARIANT_FILES, ModelPackage
from fod.runner import OnnxRuntimeRunner, Runner


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fod eval`` on an ``argparse`` subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "eval",
        help="image/pixel AUROC and PRO on a test split",
        description=(
            "Evaluate a training run dir (PyTorch) or a model package (ONNX Runtime) on the test split of an "
            "MVTec-layout folder (test/<type>/, ground_truth/<type>/<stem>_mask.png; train/ is not needed). "
            "Prints a table per defect type; pixel metrics use the smoothed map the model outputs."
        ),
    )
    p.add_argument(
        "--model", required=True, type=Path, help="RUN_DIR from `fod train` or PKG_DIR from `fod export`"
    )
    p.add_argument("--data", required=True, type=Path, help="dataset folder with test/ and ground_truth/")
    p.add_argument(
        "--json", type=Path, default=None, help="write the report (metrics, per type, scores) here"
    )
    p.add_argument("--grid", type=Path, default=None, help="write a PNG grid of images, truth and maps here")
    p.add_argument("--batch-size", type=int, default=8, help="images per inference call (default 8)")
    p.add_argument(
        "--precision",
        choices=sorted(VARIANT_FILES),
        default="fp32",
        help="package variant to run (packages only; default fp32)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def make_runner(model: Path, *, precision: str = "fp32") -> Runner:
    """The runner for ``model``: ONNX Runtime for a package, PyTorch for a training run dir.

    Args:
        model: a package folder (has ``manifest.json``) or a training run dir.
        precision: package variant (``fp32``, ``fp16``, ``int8``); must be ``fp32`` for a run dir.

    Returns:
        An inactive :class:`fod.runner.Runner`.

    Raises:
        PackageError: the package is invalid (missing file, hash mismatch, newer schema, no such variant).
        CheckpointError: the folder is neither a package nor a run dir, the checkpoint is unusable,
            or torch is not installed.
    """
    model = Path(model)
    if (model / MANIFEST_NAME).is_file():
        package = ModelPackage(model)
        return OnnxRuntimeRunner(package.onnx_path(precision), package.image_size)
    if not model.is_dir():
        raise CheckpointError(
            f"{model}: no such folder; pass a run dir from `fod train --out` or a package from `fod export`"
        )
    try:
        from fod.checkpoint import is_checkpoint_dir
        from fod.torch_runner import TorchRunner
    except ImportError as exc:
        raise CheckpointError(
            f"{model}: evaluating a training checkpoint needs torch ({exc}); pip install -e '.[train]' in the clone, "
            "or evaluate the exported package instead"
        ) from exc
    if not is_checkpoint_dir(model):
        raise CheckpointError(
            f"{model}: neither a model package ({MANIFEST_NAME} missing) "
            "nor a training run dir (no checkpoint); "
            "pass the folder given to `fod train --out` or to `fod export --out`"
        )
    if precision != "fp32":
        raise PackageError(f"--precision {precision} applies to model packages only; {model} is a run dir")
    return TorchRunner(model)


def run(args: argparse.Namespace) -> int:
    """Execute ``fod eval``; returns the exit code (errors propagate to :mod:`fod.cli`, exit 2)."""
    from fod.evaluate import evaluate, save_grid_png

    runner = make_runner(args.model, precision=args.precision)
    report = evaluate(runner, args.data, batch_size=args.batch_size, progress=not args.no_progress)
    print(report.table())
    if args.json is not None:
        out: dict[str, Any] = report.to_dict()
        out["model"] = str(args.model)
        out["precision"] = args.precision
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"report written to {args.json}", file=sys.stderr)
    if args.grid is not None:
        save_grid_png(report, args.grid)
        print(f"grid written to {args.grid}", file=sys.stderr)
    return 0
