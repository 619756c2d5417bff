"""``fod train``: train a FOD model on good images."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from fod.backbone_names import BACKBONE_NAMES  # torch-free, so that `fod --help` does not import torch

MAP_POWER_MAX = 8.0  # fod.model.MAP_POWER_MAX (not imported: fod.model imports torch)

# the defaults of `fod train`, chosen by the ablation in docs/results.md
DEFAULTS: dict[str, Any] = {"epochs": 8, "backbone": "efficientnet_lite1", "image_size": 384, "levels": "16+32",
                            "jitter": 0.0, "reference": "nearest", "bank_size": 16384, "score": "rec",
                            "intensity": "flat", "anchor": True, "regional": "auto", "regional_bank_size": 4096,
                            "map_power": 2.0, "global_level": "auto"}


def add_parser(sub: Any) -> None:
    """Register ``fod train``."""
    p = sub.add_parser("train", help="train a FOD model on good images", description=__doc__)
    p.add_argument("--data", required=True, help="folder of good images, or an MVTec root (uses train/good)")
    p.add_argument("--out", required=True, help="run folder to write checkpoint.pt and train.json into")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                   help=f"passes over the images (default {DEFAULTS['epochs']}); 0 = memory-bank mode: no "
                        "correction is trained, each patch scores its distance to the nearest bank patch through "
                        "the same fusion, regional level and map (needs --anchor, --reference nearest and --score rec, "
                        "the defaults; on "
                        "magnetic-tile as good as 8 epochs in a sixth of the time, docs/results.md thirteenth round)")
    p.add_argument("--backbone", default=DEFAULTS["backbone"], choices=BACKBONE_NAMES,
                   help=f"frozen ImageNet backbone (default {DEFAULTS['backbone']}; lite0 is faster per frame, "
                        "lite2 needs the backbones extra)")
    p.add_argument("--image-size", type=int, default=DEFAULTS["image_size"],
                   help=f"square model input in px, a multiple of the coarsest stride in --levels "
                        f"(default {DEFAULTS['image_size']}; 128 to 384 on a CPU)")
    p.add_argument("--levels", default=DEFAULTS["levels"], metavar="STRIDES",
                   help="backbone strides feeding the FOD levels, from 4, 8, 16, 32: ',' separates levels, "
                        "'+' joins strides into one level (upsampled to its finest grid and concatenated). "
                        f"E.g. 8,16 (the reference's pair), 16,32, 16+32. Default {DEFAULTS['levels']}")
    p.add_argument("--d-models", type=int, nargs="+", default=None, metavar="D",
                   help="transformer width of each level (default 128 for a level at stride <= 8, else 256)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="share of the good images held out of training and of the memory bank, to measure each "
                        "level's map statistics for the level fusion and to calibrate on (fod calibrate --normal RUN) "
                        "(default 0.1; 0 = every image in training and the bank, plain average of the levels)")
    p.add_argument("--jitter", type=float, default=DEFAULTS["jitter"],
                   help="feature jitter during training (UniAD): noise of std JITTER*|x|/C on each input token, "
                        f"the clean token as target; 0 = off (default {DEFAULTS['jitter']})")
    p.add_argument("--reference", choices=("mean", "nearest"), default=DEFAULTS["reference"],
                   help="what the inter branch compares each patch with: 'mean', the mean training feature at its "
                        "position (the paper's), or 'nearest', its nearest training patch from a memory bank "
                        f"(for parts that are not aligned). Default {DEFAULTS['reference']}")
    p.add_argument("--bank-size", type=int, default=DEFAULTS["bank_size"],
                   help="memory-bank patches per level for --reference nearest (a greedy coreset of the training "
                        f"patches; default {DEFAULTS['bank_size']})")
    p.add_argument("--score", choices=("rec*inter", "rec"), default=DEFAULTS["score"],
                   help="test-time patch score: 'rec*inter', the paper's reconstruction error times the within-image "
                        f"inter score, or 'rec', the reconstruction error alone. Default {DEFAULTS['score']}")
    p.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=DEFAULTS["anchor"],
                   help="reference-anchored reconstruction: each patch is reconstructed as its reference patch "
                        "(with --reference nearest, its nearest normal patch) plus the transformer's correction, "
                        "which starts at zero; the transformer learns which differences from the nearest normal "
                        "patch are normal. --no-anchor is the paper's plain reconstruction. "
                        f"Default {'--anchor' if DEFAULTS['anchor'] else '--no-anchor'}")
    p.add_argument("--intensity", choices=("flat", "standardize", "none"), default=DEFAULTS["intensity"],
                   help="per-frame conditioning before the backbone, in the exported graph, for parts whose lighting "
                        "varies: 'standardize' shifts and scales each frame to the training images' average "
                        "brightness and contrast; 'flat' first divides out slow illumination gradients (a Gaussian "
                        "of sigma image-size/12); 'none' feeds the raw frame (the paper's). "
                        f"Default {DEFAULTS['intensity']}")
    p.add_argument("--regional", default=DEFAULTS["regional"], metavar="K",
                   help="a regional level beside the first level: its input averaged over K x K grid cells (odd, "
                        ">= 3; 19 is about 4/5 of a 384 px frame at stride 16), scored by the distance to the nearest "
                        "averaged training patch and added to the map where the patches see nothing; for large "
                        "regions of odd texture; a K needs --holdout > 0. 0 = none; 'auto' = 4/5 of the grid on "
                        "surface textures, none on objects, aligned or moving (or with --holdout 0), decided from the "
                        "training images' grey levels, each centred on its centre of contrast "
                        f"(default {DEFAULTS['regional']})")
    p.add_argument("--regional-bank-size", type=int, default=DEFAULTS["regional_bank_size"],
                   help="memory-bank patches of the regional level (a greedy coreset; default "
                        f"{DEFAULTS['regional_bank_size']})")
    p.add_argument("--global-level", choices=("auto", "on", "off"), default=DEFAULTS["global_level"],
                   help="a global level: each frame described by the per-channel mean and spread of the first "
                        "level's input, scored by the distance to the nearest training frame's description, lifts "
                        "the frame's map at its peak (and in proportion below it), so a surface whose whole finish "
                        "differs scores higher; 'on' needs --holdout > 0. 'auto' = on for surface textures, off for "
                        "objects, by the same reading of the training images as --regional auto "
                        f"(default {DEFAULTS['global_level']})")
    p.add_argument("--map-power", type=float, default=DEFAULTS["map_power"], metavar="P",
                   help="peak-relative anomaly map, the graph's last step: each frame's map m becomes "
                        "D * (m / D) ** P, D the larger of its own peak and the largest peak of the held-out good "
                        "images, so pixels far below their frame's peak count less (a defective part's raised "
                        "background no longer outranks another part's defect) and the order of frames by score "
                        f"is kept; 1 = the fused map as before, up to {MAP_POWER_MAX:g} "
                        f"(default {DEFAULTS['map_power']:g})")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per step (default 1, the reference's; larger is faster per epoch but learns less)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4, the reference's)")
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the training step with torch.compile (about 2x faster steps after a 1-2 min "
                        "compile; default: on for runs of 3000+ steps when a C compiler is present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train and save; print where the checkpoint went."""
    from fod.errors import CheckpointError, OptionError
    from fod.model import FODConfig, parse_levels
    from fod.train import TrainSettings, train_run

    if args.epochs < 0:
        raise OptionError(f"--epochs {args.epochs}: give 0 (memory-bank mode) or more passes "
                          f"(default {DEFAULTS['epochs']})")
    if args.batch_size < 1:
        raise OptionError(f"--batch-size {args.batch_size}: give at least 1 image per step")
    if args.epochs == 0 and not (args.anchor and args.reference == "nearest" and args.score == "rec"):
        raise OptionError("--epochs 0 (memory-bank mode) scores each patch by its distance to the nearest bank patch: "
                          "it needs --anchor, --reference nearest and --score rec (the defaults); got "
                          f"{'--anchor' if args.anchor else '--no-anchor'}, --reference {args.reference}, "
                          f"--score {args.score}")
    try:
        levels = parse_levels(args.levels)
    except ValueError as exc:
        raise OptionError(f"--levels {exc}") from None
    d_models = tuple(args.d_models) if args.d_models else tuple(128 if min(lv) <= 8 else 256 for lv in levels)
    if args.bank_size < 1:
        raise OptionError(f"--bank-size {args.bank_size}: give at least 1 patch (default {DEFAULTS['bank_size']})")
    regional_auto = args.regional == "auto"
    try:
        regional = 0 if regional_auto else int(args.regional)
    except ValueError:
        raise OptionError(f"--regional {args.regional}: give 'auto', 0 (none) or an odd window side >= 3 "
                          f"(default {DEFAULTS['regional']})") from None
    if (regional or regional_auto) and args.regional_bank_size < 1:
        raise OptionError(f"--regional-bank-size {args.regional_bank_size}: give at least 1 patch "
                          f"(default {DEFAULTS['regional_bank_size']})")
    config = FODConfig(backbone=args.backbone, image_size=args.image_size, levels=levels, d_models=d_models,
                       reference=args.reference, bank_size=args.bank_size if args.reference == "nearest" else 0,
                       score=args.score, anchor=args.anchor,
                       flat_sigma=args.image_size / 12 if args.intensity == "flat" else 0.0,
                       regional=regional, regional_bank_size=args.regional_bank_size if regional else 0,
                       map_power=args.map_power)
    try:
        config.validate()
    except CheckpointError as exc:
        msg = str(exc)
        opt = ("--image-size" if "image size" in msg else "--d-models" if "d_models" in msg
               else "--regional" if msg.startswith("regional") else "--map-power" if msg.startswith("map_power")
               else "--levels")
        hint = " (or 'auto', the default)" if opt == "--regional" else ""
        raise OptionError(f"{opt}: {exc}{hint}") from None
    if not 0.0 <= args.holdout <= 0.5:
        raise OptionError(f"--holdout {args.holdout}: give a share between 0 and 0.5 (default 0.1)")
    if regional and args.holdout == 0:
        raise OptionError(f"--regional {regional} needs held-out good images for its statistics: pass "
                          "--holdout > 0 (default 0.1) or --regional 0")
    if args.global_level == "on" and args.holdout == 0:
        raise OptionError("--global-level on needs held-out good images for its statistics: pass --holdout > 0 "
                          "(default 0.1) or --global-level off")
    if not 0.0 <= args.jitter <= 100.0:
        raise OptionError(f"--jitter {args.jitter}: give a scale between 0 (off) and 100 (UniAD uses 20)")
    if args.epochs == 0:
        idle = [name for name, on in (("--jitter", args.jitter != DEFAULTS["jitter"]), ("--lr", args.lr != 1e-4),
                                      ("--batch-size", args.batch_size != 1), ("--compile", bool(args.compile)))
                if on]
        if idle:
            logging.getLogger("fod.train").warning(
                "--epochs 0 (memory-bank mode) trains nothing: %s %s no effect", ", ".join(idle),
                "has" if len(idle) == 1 else "have")
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             device=args.device, progress=not args.no_progress, holdout=args.holdout,
                             compile=args.compile, jitter=args.jitter,
                             standardize=args.intensity != "none", regional_auto=regional_auto,
                             regional_bank_size=args.regional_bank_size, global_level=args.global_level)
    path, record = train_run(args.data, args.out, config, settings)
    summary = {k: v for k, v in record.items() if k != "history"}
    (Path(args.out) / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"checkpoint: {path}")
    print(json.dumps(summary, indent=2))
    return 0
