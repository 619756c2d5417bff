"""``fod train``: train a FOD model on good images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# names of fod.backbone.BACKBONES, listed here so that `fod --help` does not import torch
BACKBONE_NAMES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]



def add_parser(sub: Any) -> None:
    """Register ``fod train``."""
    p = sub.add_parser("train", help="train a FOD model on good images", description=__doc__)
    p.add_argument("--data", required=True, help="folder of good images, or an MVTec root (uses train/good)")
    p.add_argument("--out", required=True, help="run folder to write checkpoint.pt and train.json into")
    p.add_argument("--epochs", type=int, default=10, help="passes over the images (default 10)")
    p.add_argument("--backbone", default="efficientnet_lite0", choices=BACKBONE_NAMES)
    p.add_argument("--image-size", type=int, default=128, help="square model input in px, multiple of 16 (default 128)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per step (default 1, the reference's; larger is faster per epoch but learns less)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4, the reference's)")
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--d-models", type=int, nargs=2, default=(128, 256), metavar=("D8", "D16"),
                   help="transformer width of the stride-8 and stride-16 levels (default 128 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train and save; print where the checkpoint went."""
    from fod.model import FODConfig
    from fod.train import TrainSettings, train_run

    if args.epochs < 1 or args.batch_size < 1:
        raise SystemExit("fod train: --epochs and --batch-size must be >= 1")
    config = FODConfig(backbone=args.backbone, image_size=args.image_size, d_models=tuple(args.d_models))
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             device=args.device, progress=not args.no_progress)
    path, record = train_run(args.data, args.out, config, settings)
    summary = {k: v for k, v in record.items() if k != "history"}
    (Path(args.out) / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"checkpoint: {path}")
    print(json.dumps(summary, indent=2))
    return 0
