"""Nearest-neighbour baseline (PatchCore-like) on the same backbone features as FOD.

What it does, so that the numbers say what FOD adds over plain feature matching:

* Features: :class:`fod.backbone.FeatureExtractor` (EfficientNet-Lite0 by default, the same frozen
  ImageNet weights and the same 3x3 average pooling as FOD). As PatchCore does, the maps of the
  chosen strides (``--strides``, default ``8+16``) are upsampled (bilinear) to the finest one's grid
  and concatenated: one feature per patch of the finest stride (152 dims for Lite0 at 8+16, 432 at
  16+32). ``--strides`` takes FOD's ``--levels`` syntax with ``+`` so both read the same features.
* Conditioning: ``--intensity`` (default ``none``) applies ``fod train --intensity``'s per-frame
  flat field and standardisation (:mod:`fod.intensity`) in the feature extractor, with the target
  measured on the training images, so the yardstick sees the frames FOD sees.
* Memory bank: by default the patch features of **every** training image (``train/good``): an
  exact nearest neighbour over all of them, the upper bound that PatchCore's greedy coreset
  approximates (183 k patches for magnetic-tile at 128 px; about 4 minutes on 2 cores).
  ``--bank-size N`` keeps a seeded random subsample of N patches instead, for large sizes
  (a random subsample is weaker than a coreset: 16384 patches at 128 px cost 0.05 image AUROC on
  magnetic-tile, docs/results.md); ``--coreset N`` keeps ``fod train``'s greedy k-center coreset
  of N patches (:func:`fod.train.coreset_indices`). ``--holdout SHARE`` leaves out the images that
  ``fod train --holdout SHARE`` keeps out of its bank (same seeded split), so the yardstick sees the
  same good images as FOD's memory bank.
* Context: ``--context K`` (default 1, off) averages each patch feature over its K x K neighbours on
  the feature grid (stride 1, zero padding not counted) before matching: a regional texture
  descriptor of K x finest-stride px. K of at least twice the grid side minus one (47 for the 24 x 24
  grid of 384 px at stride 16) makes every patch the whole image's mean feature, a descriptor blind to
  where anything is (docs/results.md, ninth round, measures both).
* Score: Euclidean distance of each test patch to its nearest bank patch (exact, matmul in
  chunks), upsampled bilinearly (align_corners=True) to the input size, smoothed with the very
  Gaussian FOD's graph uses (:class:`fod.smoothing.GaussianSmoothing`, sigma 4, 33 taps, mirror
  padding); image score = max of the smoothed map.
* Evaluation: wrapped as a :class:`fod.runner.Runner` and scored by :func:`fod.evaluate.evaluate`,
  so image AUROC, pixel AUROC and PRO are computed exactly as for ``fod eval``.

Usage::

    python benchmarks/baseline_knn.py --data ../shared/data/magnetic-tile --json knn.json [--grid knn.png]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fod.backbone import FeatureExtractor
from fod.data import list_images, load_images, train_folder
from fod.errors import FodError
from fod.evaluate import evaluate, save_grid_png
from fod.intensity import intensity_statistics
from fod.runner import Runner
from fod.smoothing import GaussianSmoothing
from fod.train import TrainSettings, coreset_indices, split_holdout

logger = logging.getLogger("baseline_knn")


def check_context(context: int) -> None:
    """Refuse a ``--context`` window that is not centred on its patch.

    Raises:
        ValueError: ``context`` < 1 or even (the message names the option and an allowed value).
    """
    if context < 1 or context % 2 == 0:
        raise ValueError(f"--context {context}: use an odd number of grid cells >= 1 (1 = off), e.g. 13")


class KnnRunner(Runner):
    """Nearest-neighbour patch scoring over a fixed memory bank, with the graph's I/O contract.

    Args:
        extractor: frozen backbone.
        bank: ``[M, D]`` float32 memory bank of training patch features.
        image_size: square input size in px.
        sigma: Gaussian smoothing of the map in px (4, as FOD).
        query_chunk: test patches per distance block.
        bank_chunk: bank patches per distance block (a block is ``query_chunk x bank_chunk`` float32).
        context: side K of the K x K feature average (:meth:`embed`); 1 is off.
    """

    name = "knn-baseline"

    def __init__(
        self,
        extractor: FeatureExtractor,
        bank: torch.Tensor,
        *,
        image_size: int,
        sigma: float = 4.0,
        query_chunk: int = 2048,
        bank_chunk: int = 8192,
        context: int = 1,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.bank = bank.contiguous()
        self.bank_sq = (self.bank * self.bank).sum(1)
        self.image_size = (image_size, image_size)
        self.smoothing = GaussianSmoothing(sigma)
        self.query_chunk = query_chunk
        self.bank_chunk = bank_chunk
        self.context = context

    @staticmethod
    def embed(extractor: FeatureExtractor, images: np.ndarray, context: int = 1) -> torch.Tensor:
        """``[N, H, W, 3]`` uint8 BGR -> ``[N, sum C_s, H/s0, W/s0]`` float32 patch features (s0 the finest stride).

        ``context`` K > 1 replaces each patch feature by the mean over its K x K grid neighbours
        (stride 1; positions outside the grid are not counted, so border patches average fewer).

        Raises:
            ValueError: ``context`` < 1 or even (the window must be centred on its patch).
        """
        check_context(context)
        with torch.inference_mode():
            maps = extractor(torch.from_numpy(images))
            grid = maps[0].shape[-2:]
            feats = torch.cat(
                [maps[0]] + [F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps[1:]], dim=1
            )
            if context > 1:
                feats = F.avg_pool2d(feats, context, stride=1, padding=context // 2, count_include_pad=False)
            return feats

    @classmethod
    def fit(
        cls,
        train_paths: list[Path],
        *,
        backbone: str = "efficientnet_lite0",
        image_size: int = 256,
        strides: tuple[int, ...] = (8, 16),
        bank_size: int = 0,
        seed: int = 0,
        batch_size: int = 16,
        progress: bool = True,
        intensity: str = "none",
        coreset: int = 0,
        context: int = 1,
    ) -> KnnRunner:
        """Build the memory bank from good training images: every patch, a random subsample or a coreset.

        Args:
            train_paths: good images.
            backbone: one of :data:`fod.backbone.BACKBONES`.
            image_size: square input size in px (multiple of the coarsest stride).
            strides: backbone strides concatenated into one patch feature.
            bank_size: patches kept; 0 (default) keeps all of them.
            seed: seed of the random subsample.
            batch_size: images per backbone call.
            progress: tqdm bar on stderr.
            intensity: ``fod train --intensity``'s conditioning of each frame (``none``, ``standardize``,
                ``flat``), the target measured on all of ``train_paths`` as ``fod train`` does.
            coreset: when > 0, keep a greedy k-center coreset of this many patches
                (:func:`fod.train.coreset_indices`, seeded with ``seed``) instead of all of them.
            context: K x K feature average of :meth:`embed` (odd; 1, the default, is off).

        Returns:
            An inactive runner.

        Raises:
            DataError: an unreadable image (named).
            CheckpointError: unknown backbone or missing weights package.
            ValueError: ``context`` < 1 or even.
        """
        from tqdm import tqdm

        check_context(context)
        target = None
        if intensity != "none":
            target = intensity_statistics(load_images(train_paths, (image_size, image_size)))
        extractor = FeatureExtractor(backbone, image_size, strides=strides, intensity=target,
                                     flat_sigma=image_size / 12 if intensity == "flat" else 0.0)
        n_patches = len(train_paths) * (image_size // min(strides)) ** 2
        keep_p = min(1.0, bank_size / n_patches) if bank_size > 0 else 1.0
        generator = torch.Generator().manual_seed(seed)
        parts = []
        batches = range(0, len(train_paths), batch_size)
        for lo in tqdm(batches, desc="bank", unit="batch", disable=not progress, leave=False):
            images = load_images(train_paths[lo : lo + batch_size], (image_size, image_size))
            feats = cls.embed(extractor, images, context)
            flat = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
            # Bernoulli keep with a slight surplus, trimmed below: memory stays at the bank size
            keep = torch.rand(flat.shape[0], generator=generator) < min(1.0, keep_p * 1.05)
            parts.append(flat[keep].clone())
        bank = torch.cat(parts)
        if 0 < bank_size < bank.shape[0]:
            bank = bank[torch.randperm(bank.shape[0], generator=generator)[:bank_size]]
        if coreset > 0:
            bank = bank[coreset_indices(bank, coreset, seed)]
        logger.info("memory bank: %d of %d patches, %d dims", bank.shape[0], n_patches, bank.shape[1])
        return cls(extractor, bank, image_size=image_size, context=context)

    def nearest_distance(self, queries: torch.Tensor) -> torch.Tensor:
        """``[Q, D]`` -> ``[Q]`` Euclidean distance to the nearest bank patch (exact)."""
        out = torch.empty(queries.shape[0])
        for q0 in range(0, queries.shape[0], self.query_chunk):
            q = queries[q0 : q0 + self.query_chunk]
            q_sq = (q * q).sum(1)
            best = torch.full((q.shape[0],), float("inf"))
            for b0 in range(0, self.bank.shape[0], self.bank_chunk):
                bank = self.bank[b0 : b0 + self.bank_chunk]
                # ||q - b||^2 = ||q||^2 + ||b||^2 - 2 q.b, minimised over b
                d = torch.addmm(self.bank_sq[b0 : b0 + self.bank_chunk][None], q, bank.T, alpha=-2.0)
                best = torch.minimum(best, d.amin(1))
            out[q0 : q0 + q.shape[0]] = (best + q_sq).clamp_min(0).sqrt()
        return out

    def _activate_impl(self) -> None:
        pass

    def _deactivate_impl(self) -> None:
        pass

    def _infer_impl(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats = self.embed(self.extractor, images, self.context)
        n, d, h, w = feats.shape
        with torch.inference_mode():
            dist = self.nearest_distance(feats.permute(0, 2, 3, 1).reshape(-1, d)).reshape(n, 1, h, w)
            up = F.interpolate(dist, size=self.image_size, mode="bilinear", align_corners=True)
            anomaly_map = self.smoothing(up)
            score = anomaly_map.amax(dim=(1, 2, 3))
        return anomaly_map.numpy(), score.numpy()


def main(argv: list[str] | None = None) -> int:
    """Fit the bank on ``DATA/train/good``, evaluate on ``DATA/test``, print and save the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="MVTec-layout folder (train/good, test/)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--grid", type=Path, default=None, help="write a PNG grid here")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--strides", default="8+16", help="backbone strides joined by '+' (default 8+16; e.g. 16+32)")
    parser.add_argument(
        "--bank-size", type=int, default=0, help="random patches kept (default 0: all, exact nearest neighbour)"
    )
    parser.add_argument("--coreset", type=int, default=0,
                        help="keep a greedy k-center coreset of this many patches, fod train's algorithm seeded with "
                             "--seed (fod train's default seed is 3407) (default 0: no coreset)")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="leave out the good images fod train --holdout SHARE keeps out of its bank, the split "
                             "of fod train's default --seed 3407 (default 0: every training image)")
    parser.add_argument("--intensity", choices=("none", "standardize", "flat"), default="none",
                        help="per-frame conditioning as fod train --intensity (default none, the raw frame)")
    parser.add_argument("--context", type=int, default=1,
                        help="average each patch feature over its K x K grid neighbours before matching, K odd "
                             "(default 1: off; 2 x grid side - 1 or more: the whole image's mean feature)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_context(args.context)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        start = time.perf_counter()
        paths = list_images(train_folder(args.data))
        if args.holdout > 0:
            keep, _ = split_holdout(len(paths), args.holdout, TrainSettings().seed)
            paths = [paths[i] for i in keep]
        runner = KnnRunner.fit(
            paths,
            backbone=args.backbone,
            image_size=args.image_size,
            strides=tuple(int(s) for s in args.strides.split("+")),
            bank_size=args.bank_size,
            seed=args.seed,
            progress=not args.no_progress,
            intensity=args.intensity,
            coreset=args.coreset,
            context=args.context,
        )
        fit_s = time.perf_counter() - start
        report = evaluate(runner, args.data, batch_size=args.batch_size, progress=not args.no_progress)
        wall_s = time.perf_counter() - start
    except FodError as exc:
        print(f"baseline_knn: error: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    kind = "coreset" if args.coreset > 0 else "all patches" if args.bank_size <= 0 else "random"
    print(
        f"baseline: {len(paths)} training images, bank {runner.bank.shape[0]} x {runner.bank.shape[1]} "
        f"({kind}), fit {fit_s:.0f} s, total {wall_s:.0f} s "
        f"on {torch.get_num_threads()} threads"
    )
    if args.json is not None:
        out: dict[str, Any] = report.to_dict()
        out["baseline"] = {
            "method": "exact nearest neighbour over "
            + ("a greedy k-center coreset" if args.coreset > 0
               else "all training patches" if args.bank_size <= 0 else "a random patch subsample")
            + " (PatchCore-like)",
            "holdout": args.holdout,
            "backbone": args.backbone,
            "image_size": args.image_size,
            "strides": args.strides,
            "intensity": args.intensity,
            "context": args.context,
            "n_train_images": len(paths),
            "bank_size": int(runner.bank.shape[0]),
            "feature_dim": int(runner.bank.shape[1]),
            "seed": args.seed,
            "fit_s": fit_s,
            "wall_s": wall_s,
            "threads": torch.get_num_threads(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.grid is not None:
        save_grid_png(report, args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
