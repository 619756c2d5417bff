"""``fod export``: checkpoint -> model package (``model.onnx`` + ``manifest.json``), parity checked."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``fod export``."""
    p = sub.add_parser("export", help="export a trained model to a model package (ONNX + manifest)",
                       description=__doc__)
    p.add_argument("--model", required=True, help="run folder of `fod train`")
    p.add_argument("--out", required=True, help="package folder to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--data", default=None, help="images for the parity check (default: the training folder)")
    p.add_argument("--force", action="store_true", help="write the package even if parity fails")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export, print ops, size and parity."""
    from fod.export import export_package

    package, report = export_package(args.model, args.out, opset=args.opset, data=args.data, force=args.force)
    print(f"package: {package.root}  ({report['size_mb']} MB)")
    print("ops:", ", ".join(f"{k} x{v}" for k, v in report["ops"].items()))
    print("parity:", json.dumps(report["parity"], indent=2))
    return 0
