"""Score-composition ablation of a trained run (docs/results.md): which test-time score separates best.

The graph scores each patch as ``rec * inter`` (fod-method.md section 4): reconstruction error times the
within-image softmax of the inter discrepancy. This script recomputes, from ``RUN/checkpoint.pt``, each
level's components on the test split and on the run's held-out good images (``train.json``
``holdout_files``) and evaluates, without retraining:

* the component: ``paper`` (rec x inter), ``rec``, ``inter``, ``disc`` (the raw inter discrepancy),
  ``rec*disc``, and ``refd`` (squared distance of the pooled feature to the reference mean map, or with
  ``reference = "nearest"`` to its nearest memory-bank patch, i.e. kNN on the coreset: no transformer at
  all, a floor);
* the levels: each alone and both fused;
* the normalisation before the fusion: ``global`` (one mean/std per level on the held-out maps, the
  product's rule), ``pos`` (mean/std per pixel position) and ``posmean`` (mean per position, global std).

Maps are upsampled (bilinear, align_corners) to the input size, fused as ``mean_l relu(z_l)``, smoothed
(Gaussian sigma 4) and scored by their max, as in the graph. Prints image and pixel AUROC per variant
(``--pro`` adds PRO for fused variants; slow). Usage::

    python benchmarks/score_variants.py RUN --data ../shared/data/magnetic-tile [--pro] \\
        [--kinds rec,paper,rec+refd] [--norms global] [--sigmas 2,4,8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fod.checkpoint import load_checkpoint
from fod.data import load_images, load_mask, load_test_split, train_folder
from fod.metrics import image_auroc, pixel_auroc, pro_score
from fod.model import FODModel, symmetric_kl
from fod.smoothing import GaussianSmoothing

KINDS = ("paper", "rec", "inter", "disc", "rec*disc", "refd")
NORMS = ("global", "pos", "posmean")


@torch.no_grad()
def components(model: FODModel, paths: list[Path], batch: int = 8) -> dict[str, np.ndarray]:
    """Per level ``l``: ``rec{l}``, ``disc{l}``, ``refd{l}``, each ``[N, h_l, w_l]`` float32."""
    size = model.config.image_size
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(paths), batch):
        images = torch.from_numpy(load_images(paths[start : start + batch], (size, size)))
        inputs = model.level_inputs(model.backbone(images))
        for li, (level, feature) in enumerate(zip(model.levels, inputs)):
            tokens = model.tokens(feature)
            recon, maps = level(tokens)
            rec = (tokens - recon).square().mean(-1) + 1.0 - F.cosine_similarity(tokens, recon, dim=-1, eps=1e-8)
            disc = torch.stack([symmetric_kl(m.inter_attn, m.inter_target) for m in maps]).mean(0)
            ref = level.reference if level.bank is None else level.bank_patches(level.nearest(tokens))
            refd = (tokens - ref).square().mean(-1)
            for key, value in (("rec", rec), ("disc", disc), ("refd", refd)):
                out.setdefault(f"{key}{li}", []).append(value.reshape(-1, *level.grid).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def inter_score(disc: np.ndarray) -> np.ndarray:
    """``max_k softmax(-d)_k - softmax(-d)_i`` over each image's patches (fod-method.md section 4 step 3)."""
    p = torch.softmax(-torch.from_numpy(disc).reshape(len(disc), -1), -1)
    return (p.amax(-1, keepdim=True) - p).reshape(disc.shape).numpy()


def component(c: dict[str, np.ndarray], level: int, kind: str) -> np.ndarray:
    """One score component of one level: ``[N, h, w]`` float32."""
    rec, disc = c[f"rec{level}"], c[f"disc{level}"]
    return {
        "paper": lambda: rec * inter_score(disc),
        "rec": lambda: rec,
        "inter": lambda: inter_score(disc),
        "disc": lambda: disc,
        "rec*disc": lambda: rec * disc,
        "refd": lambda: c[f"refd{level}"],
    }[kind]()


def fused_maps(
    test: dict[str, np.ndarray],
    held: dict[str, np.ndarray],
    kind: str,
    levels: tuple[int, ...],
    norm: str,
    size: int,
    sigma: float = 4.0,
) -> np.ndarray:
    """Smoothed fused anomaly maps of the test split: ``[N, size, size]`` float32."""
    def up(x: np.ndarray) -> torch.Tensor:
        return F.interpolate(torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear", align_corners=True)

    maps = []
    for level in levels:
        for part in kind.split("+"):  # a hybrid "a+b": each part normalised on its own, then averaged
            t, h = up(component(test, level, part)), up(component(held, level, part))
            if norm == "global":
                z = (t - h.mean()) / h.std()
            elif norm == "pos":
                z = (t - h.mean(0, keepdim=True)) / (h.std(0, keepdim=True) + 0.1 * h.std())
            else:
                z = (t - h.mean(0, keepdim=True)) / h.std()
            maps.append(torch.relu(z))
    with torch.no_grad():
        return GaussianSmoothing(sigma)(torch.stack(maps).mean(0))[:, 0].numpy()


def main() -> None:
    """Print one line per variant: image AUROC, pixel AUROC (and PRO with ``--pro``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="fod train run folder (trained with --holdout)")
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout root of the run's data")
    parser.add_argument("--pro", action="store_true", help="also PRO for the fused variants (slow)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"components to try (default {','.join(KINDS)})")
    parser.add_argument("--sigmas", default="4", help="Gaussian smoothing sigmas in px to try (default 4, the graph's)")
    parser.add_argument("--norms", default=",".join(NORMS), help=f"normalisations to try (default {','.join(NORMS)})")
    args = parser.parse_args()
    model, _ = load_checkpoint(args.run)
    model.eval()
    held_names = json.loads((args.run / "train.json").read_text())["holdout_files"]
    samples = load_test_split(args.data)
    size = model.config.image_size
    test = components(model, [s.path for s in samples])
    held = components(model, [train_folder(args.data) / n for n in held_names])
    masks = np.stack([load_mask(s, (size, size)) for s in samples])
    labels = np.array([s.label for s in samples])
    n_levels = len(model.levels)
    for kind in args.kinds.split(","):
        for levels in [(i,) for i in range(n_levels)] + ([tuple(range(n_levels))] if n_levels > 1 else []):
            for norm, sigma in [(n, float(g)) for n in args.norms.split(",") for g in args.sigmas.split(",")]:
                maps = fused_maps(test, held, kind, levels, norm, size, sigma)
                line = (f"{kind:9s} levels {','.join(map(str, levels)):4s} {norm:8s} sigma {sigma:g} "
                        f"image AUROC {image_auroc(labels, maps.reshape(len(maps), -1).max(1)):.3f} "
                        f"pixel AUROC {pixel_auroc(masks, maps):.3f}")
                if args.pro and len(levels) > 1:
                    line += f" PRO {pro_score(masks, maps):.3f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
