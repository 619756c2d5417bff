"""Training: backbone features computed once (the backbone is frozen), then the FOD levels trained
on them with one Adam optimiser over a fixed schedule (no model selection on the test split), then
the level-fusion statistics measured on a held-out share of the good images.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fod.checkpoint import save_checkpoint
from fod.errors import DataError
from fod.intensity import intensity_statistics
from fod.losses import TERMS, fod_loss
from fod.model import FODConfig, FODModel

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Schedule of a training run.

    Attributes:
        epochs: passes over the training images. 0 trains nothing (memory-bank mode): with the anchored
            reconstruction (``config.anchor``, ``reference`` "nearest", ``score`` "rec") the correction head
            starts at zero, so each patch scores its squared distance to the nearest bank patch, and the
            fusion, regional and map statistics are measured on that. On magnetic-tile it scores as 8
            epochs do (docs/results.md, thirteenth round).
        batch_size: images per step (the loss is per image, so any size is valid). 1, the reference's
            schedule (fod-method.md section 3.3): on magnetic-tile at 128 px, 10 epochs at batch 1 and
            lr 1e-4 gave image AUROC 0.786 against 0.735 at batch 4 and lr 3e-4 (docs/results.md).
        lr: Adam learning rate (1e-4, the reference's).
        seed: RNG seed (3407 as in the reference).
        device: torch device; None picks CUDA when available.
        progress: show a tqdm progress bar with the loss terms.
        holdout: share of the good images kept out of training (and of the reference features) to
            measure each level's map statistics for the level fusion (:attr:`FODConfig.level_norm`);
            0 keeps every image for training and fuses by the plain average.
        compile: run the training step under ``torch.compile`` (about 2x the steps/s of eager on a
            2-core CPU, after a one-off compile of about 1-2 min). None: compile when a C compiler is
            present and the run has at least :data:`COMPILE_MIN_STEPS` steps.
        jitter: feature jitter scale (UniAD, You et al. NeurIPS 2022, section 3.4): during training each
            input token ``x_i`` (``C`` channels) gets Gaussian noise of std ``jitter * ||x_i|| / C`` and the
            level reconstructs the clean token, so it learns to map off-normal features back toward
            normal instead of copying them. 0 trains on clean tokens (the reference). Inference is unchanged.
        standardize: standardise each frame's intensity before the backbone
            (:func:`fod.intensity.standardize_intensity`), to the average mean and standard deviation of
            the training images (:func:`fod.intensity.intensity_statistics`), which are saved in the
            config (:attr:`FODConfig.intensity`). False keeps ``config.intensity`` as given.
        regional_auto: let the training images decide the regional level (:func:`auto_regional`): a window
            of about 4/5 of the first level's grid on surface textures, none on objects (aligned or moving). Needs
            ``config.regional`` 0; no regional level when ``holdout`` is 0 (no images for its statistics).
        regional_bank_size: memory-bank patches of a regional level chosen by ``regional_auto``.
        global_level: the global level (:class:`fod.model.GlobalLevel`): ``"on"``, ``"off"`` or ``"auto"``
            (on for surface textures, off for objects, by the same position share as ``regional_auto``).
            Needs ``holdout`` > 0 (its statistics are measured on the held-out images); ``"auto"`` with
            ``holdout`` 0 is off. The library default is ``"off"`` (as ``regional_auto`` is False); ``fod
            train``'s is ``"auto"``.
    """

    epochs: int = 8
    batch_size: int = 1
    lr: float = 1e-4
    seed: int = 3407
    device: str | None = None
    progress: bool = True
    holdout: float = 0.1
    compile: bool | None = None
    jitter: float = 0.0
    standardize: bool = False
    regional_auto: bool = False
    regional_bank_size: int = 4096
    global_level: str = "off"


GLOBAL_LEVEL_CHOICES = ("auto", "on", "off")
"""Values of :attr:`TrainSettings.global_level`."""
COMPILE_MIN_STEPS = 3000  # below this the one-off compile costs more than it saves
POSITION_SHARE_MAX = 0.5
"""``--regional auto``: an :func:`image_position_share` below this is a surface texture, this or more an
object. Measured on the training images (the larger of the frames as they are and centred): magnetic-tile 0.17 (a
texture; the regional level lifts pixel AUROC 0.849 -> 0.870, 0.904 with the peak-relative map), MVTec
hazelnut 0.88 (an object; it would cost PRO 0.817 -> 0.585 at K 13), the same hazelnuts shifted at random
by up to 20 % of the frame 0.88 (a regional level of K 13 there: image AUROC 1.000 -> 0.750, PRO 0.706 ->
0.587). docs/results.md, eleventh and thirteenth rounds."""


def split_holdout(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and held-out images: a seeded random ``round(share * n)`` held out.

    Returns:
        ``(train_idx, holdout_idx)`` int64 arrays, each sorted.

    Raises:
        DataError: ``share`` outside [0, 0.5], fewer than 2 images held out when ``share > 0``, or
            fewer than 2 left to train on (naming ``--holdout``).
    """
    if not 0.0 <= share <= 0.5:
        raise DataError(f"--holdout {share}: give a share of the good images between 0 and 0.5 (default 0.1)")
    k = round(share * n)
    if share > 0 and k < 2:
        needed = math.ceil(2 / n * 100) / 100
        fix = (f"raise it to {needed:.2f} or more" if needed <= 0.5 and n >= 4
               else f"add good images (a hold-out of 2 needs at least 4; {n} given)")
        raise DataError(
            f"--holdout {share} of {n} good images holds out {k}; the level statistics need at least 2: "
            f"{fix}, or pass --holdout 0 (plain level average)"
        )
    if n - k < 2:
        raise DataError(f"--holdout {share} leaves {n - k} of {n} good images to train on; need at least 2")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[k:]), np.sort(order[:k])


def _mean_std(maps: Any) -> tuple[float, float]:
    """Mean and std over all pixels of an iterable of ``[n, 1, H, W]`` maps (float64 sums); std floored
    at 1e-12 of the mean's magnitude (a constant map would otherwise divide by zero).
    """
    s1 = s2 = 0.0
    count = 0
    for m in maps:
        m64 = m.double()
        s1 += float(m64.sum())
        s2 += float(m64.square().sum())
        count += m.numel()
    mean = s1 / count
    std = math.sqrt(max(s2 / count - mean * mean, 0.0))
    return mean, max(std, 1e-12 * max(abs(mean), 1e-30))


@torch.no_grad()
def position_share(feature: torch.Tensor, batch: int = 64) -> float:
    """Share of the feature variance that the grid position explains (one-way ANOVA, adjusted R^2).

    ``(B - W / (N - 1)) / T`` with ``T = mean_{n,p} ||f[n, :, p] - mu||^2`` (total), ``B = mean_p ||m_p -
    mu||^2`` (between positions; ``m_p`` the mean feature at grid position p over the N images, ``mu`` the
    mean over images and positions) and ``W = T - B`` (within positions). The ``W / (N - 1)`` term removes
    the scatter that N samples put into the position means by chance (without it pure noise reads 0.5 at
    N = 2, 0.1 at N = 10). Near 0 for a stationary surface texture (every position looks alike), near 1 for
    an aligned object (each position has its own part of the object).

    Args:
        feature: ``[N, C, h, w]`` float32 (:func:`image_position_share` passes grey levels).
        batch: images per float64 accumulation step (bounds the memory).

    Returns:
        the share in [0, 1] (0 for a constant feature).

    Raises:
        ValueError: fewer than 2 images.
    """
    n = feature.shape[0]
    if n < 2:
        raise ValueError(f"position_share needs at least 2 images, got {n}")
    s1 = torch.zeros(feature.shape[1:], dtype=torch.float64)
    sq = 0.0
    for i in range(0, n, batch):
        f = feature[i : i + batch].double()
        s1 += f.sum(0)
        sq += float(f.square().sum())
    per_position = s1 / n  # [C, h, w]
    mu = per_position.mean((1, 2), keepdim=True)
    cells = feature.shape[2] * feature.shape[3]
    total = sq / (n * cells) - float(mu.square().sum())
    between = float((per_position - mu).square().sum(0).mean())
    if total <= 0:
        return 0.0
    return min(max((between - (total - between) / (n - 1)) / total, 0.0), 1.0)


def image_position_share(images: np.ndarray, side: int = 32, batch: int = 64) -> float:
    """:func:`position_share` of the grey levels (channel mean) averaged to ``side`` x ``side`` cells: the
    larger of the share of the frames as they are and of the frames each centred on its own content.

    Centring (:func:`centre_of_contrast` on the grey image averaged to ``4 * side`` px) makes a part that
    moves in the frame read as an object: hazelnuts shifted at random by up to 20 % of the frame read 0.35
    as they are and 0.88 centred (30 %: 0.12 and 0.79). The frames as they are keep an aligned part that
    fills most of the frame an object, where the centring goes astray (the contrast's median is then the
    part's own grey, so the background is what gets centred). A texture reads low both ways
    (magnetic-tile at 384 px: 0.17 and 0.07). docs/results.md, thirteenth round.

    Pixels, not backbone features: a CNN's zero padding gives its border cells a fixed signature that makes
    a very uniform texture look position-bound (the tests' synthetic stripes at 256 px: 0.93 on features,
    0.1 here). The raw frames, before ``--intensity`` conditioning: a fixed illumination gradient counts
    as position.

    Args:
        images: ``[N, S, S, 3]`` uint8 (the model inputs), N >= 2; S below ``side`` is upsampled.
        side: cells per side (32: fine enough to see an object's outline, coarse enough to average a
            texture's grain).
        batch: images per step (bounds the float32 copy).

    Returns:
        the share in [0, 1]: near 0 for a surface texture, near 1 for an object (aligned or not).

    Raises:
        ValueError: fewer than 2 images.
    """
    if len(images) < 2:
        raise ValueError(f"image_position_share needs at least 2 images, got {len(images)}")
    grey = [F.adaptive_avg_pool2d(torch.from_numpy(images[i : i + batch]).float().mean(-1)[:, None], 4 * side)
            for i in range(0, len(images), batch)]
    plain = torch.cat([F.adaptive_avg_pool2d(g, side) for g in grey])
    centred = torch.cat([F.adaptive_avg_pool2d(centre_of_contrast(g), side) for g in grey])
    return max(position_share(plain), position_share(centred))


def centre_of_contrast(grey: torch.Tensor) -> torch.Tensor:
    """Roll each frame so that the centroid of its squared contrast ``(g - median(g))^2`` lies at the
    frame's centre (to the pixel, the same pixel for the same content wherever it started).

    Args:
        grey: ``[N, 1, H, W]`` float32 grey levels.

    Returns:
        ``[N, 1, H, W]`` float32, each frame shifted by whole pixels with wrap-around (``torch.roll``);
        a constant frame is returned as it is.
    """
    n, _, h, w = grey.shape
    flat = grey.reshape(n, -1)
    weight = (flat - flat.median(1, keepdim=True).values).square().reshape(n, h, w)
    total = weight.sum((1, 2))
    ys = torch.arange(h, dtype=grey.dtype)
    xs = torch.arange(w, dtype=grey.dtype)
    out = grey.clone()
    for i in range(n):
        if float(total[i]) <= 0:
            continue
        cy = float((weight[i].sum(1) * ys).sum() / total[i])
        cx = float((weight[i].sum(0) * xs).sum() / total[i])
        # floor(x + 0.5), not round(): Python's round() sends halves to the even number, so on an even-sized
        # frame the same content would land one pixel apart depending on where it started
        shift = (math.floor((h - 1) / 2 - cy + 0.5), math.floor((w - 1) / 2 - cx + 0.5))
        out[i] = torch.roll(grey[i], shift, dims=(1, 2))
    return out


def auto_regional(share: float, grid: int) -> int:
    """``--regional auto``: the regional window K for a first-level grid of ``grid`` x ``grid`` cells.

    K is the odd number nearest 4/5 of the grid, the larger on a tie (24 -> 19, 16 -> 13, 20 -> 17,
    7 -> 5: with the peak-relative map the window that scored magnetic-tile's "uneven" regions best,
    docs/results.md twelfth round; without it the gain flattened out at half the grid, eleventh round)
    when the training images are a surface texture (``share`` < :data:`POSITION_SHARE_MAX`), else 0
    (none): on an object such a window spans the whole object and lifts its normal pixels.

    Args:
        share: :func:`image_position_share` of the training images.
        grid: side of the first level's grid in cells (image size / its stride).

    Returns:
        K (odd, >= 3, smaller than the grid) or 0 (also for a grid under 4 cells).
    """
    k = 2 * math.floor(0.4 * grid) + 1
    return k if share < POSITION_SHARE_MAX and 3 <= k < grid else 0


@torch.no_grad()
def level_statistics(
    model: FODModel, inputs: list[torch.Tensor], batch_size: int = 16
) -> tuple[tuple[float, float], ...]:
    """Per level ``(mean, std)`` of its upsampled patch-score map over all pixels of held-out images.

    Args:
        model: trained model (eval mode).
        inputs: level inputs of the held-out images (:meth:`FODModel.level_inputs`), ``[K, C_l, h_l, w_l]``.

    Returns:
        one ``(mean, std)`` float pair per level; std is floored at 1e-12 of the mean's magnitude
        (a constant map would otherwise divide by zero).
    """
    device = next(model.levels.parameters()).device  # type: ignore[attr-defined]
    per_level: list[list[torch.Tensor]] = [[] for _ in model.levels]
    for start in range(0, len(inputs[0]), batch_size):
        for li, m in enumerate(model.level_maps([f[start : start + batch_size].to(device) for f in inputs])):
            per_level[li].append(m.cpu())
    return tuple(_mean_std(maps) for maps in per_level)


@torch.no_grad()
def regional_statistics(model: FODModel, inputs: list[torch.Tensor], batch_size: int = 16) -> tuple[float, float]:
    """``(mean, std)`` of the regional level's upsampled map (:meth:`FODModel.regional_map`) over all pixels
    of held-out images (level inputs as for :func:`level_statistics`).

    Raises:
        RuntimeError: the model has no regional level.
    """
    device = next(model.levels.parameters()).device  # type: ignore[attr-defined]
    return _mean_std(model.regional_map([inputs[0][i : i + batch_size].to(device)])
                     for i in range(0, len(inputs[0]), batch_size))


@torch.no_grad()
def peak_floor_statistic(model: FODModel, inputs: list[torch.Tensor], batch_size: int = 16) -> float:
    """:attr:`FODConfig.peak_floor`: the largest peak of :meth:`FODModel.fused_map` (the map before the
    peak-relative step) over held-out good images (level inputs as for :func:`level_statistics`), in the
    map's units. Measure it after the level (and regional) statistics, which the fused map uses.

    Raises:
        ValueError: no images (``inputs`` of length 0).
    """
    if not len(inputs[0]):
        raise ValueError("the peak floor needs at least 1 held-out image, got 0")
    device = next(model.levels.parameters()).device  # type: ignore[attr-defined]
    return max(float(model.fused_map([f[i : i + batch_size].to(device) for f in inputs]).amax())
               for i in range(0, len(inputs[0]), batch_size))


GLOBAL_STD_FLOOR = 0.1
"""The global level's std is floored at this share of its held-out mean distance: with few held-out images
(2 is allowed) their spread can come out near 0 and every frame's lift huge. Magnetic-tile: std 1.87 at a
mean of 7.47, well above the floor."""


@torch.no_grad()
def global_statistics(model: FODModel, inputs: list[torch.Tensor], batch_size: int = 64) -> tuple[float, float]:
    """:attr:`FODConfig.global_norm`: ``(mean, std)`` of the global level's distance over held-out good images.

    Args:
        model: a model with a global level (its bank filled, :func:`fill_global_bank`).
        inputs: level inputs of the held-out images (:meth:`FODModel.level_inputs`), ``[K, C_l, h_l, w_l]``
            float32 each, on any device; only the first is read.
        batch_size: images per call.

    Returns:
        ``(mean, std)`` floats in the distance's units: the population std over the ``K`` images, floored at
        :data:`GLOBAL_STD_FLOOR` of the mean.

    Raises:
        RuntimeError: the model has no global level.
    """
    if model.global_level is None:
        raise RuntimeError("this FOD model has no global level (global_bank_size 0)")
    device = model.global_level.bank.device
    mean, std = _mean_std(model.global_level(inputs[0][i : i + batch_size].to(device))
                          for i in range(0, len(inputs[0]), batch_size))
    return mean, max(std, GLOBAL_STD_FLOOR * abs(mean), 1e-12)


@torch.no_grad()
def fill_global_bank(model: FODModel, feature: torch.Tensor, batch: int = 64) -> None:
    """Fill the global level's bank with the descriptors (:meth:`fod.model.GlobalLevel.describe`) of every
    training image: ``feature`` ``[n, C, h, w]`` float32 first-level input (CPU), ``n`` = the bank size. No
    coreset: the bank grows by ``2C`` floats per image (3.4 KB at the defaults' 432 channels).

    Raises:
        RuntimeError: the model has no global level.
    """
    level = model.global_level
    if level is None:
        raise RuntimeError("this FOD model has no global level (global_bank_size 0)")
    device = level.bank.device
    level.set_bank(torch.cat([level.describe(feature[i : i + batch].to(device))
                              for i in range(0, len(feature), batch)]))


@torch.no_grad()
def fill_regional_bank(model: FODModel, feature: torch.Tensor, seed: int, batch: int = 32) -> None:
    """Fill the regional level's bank with a k-center coreset of the training images' averaged patches.

    Args:
        model: a model with a regional level whose bank size is at most ``n * h * w``.
        feature: ``[n, C, h, w]`` float32 first-level input of the training images (CPU).
        seed: coreset seed.
    """
    regional = model.regional
    if regional is None:
        raise RuntimeError("this FOD model has no regional level (regional 0)")
    pooled = torch.cat([regional.pool(feature[i : i + batch]) for i in range(0, len(feature), batch)])
    flat = pooled.flatten(2).transpose(1, 2).reshape(-1, pooled.shape[1])
    regional.set_bank(flat[coreset_indices(flat, regional.bank.shape[1], seed)].to(regional.bank.device))


def coreset_indices(x: torch.Tensor, m: int, seed: int, dim: int = 64) -> torch.Tensor:
    """Greedy k-center coreset (PatchCore, Roth et al. CVPR 2022, section 3.2, Algorithm 1).

    Picks ``m`` rows of ``x`` so that every row lies close to a picked one: repeatedly the row
    farthest from all picked rows, searched over **every** row. As in PatchCore the distances are
    taken after a random projection to ``dim`` dimensions (Johnson-Lindenstrauss). Each pick costs
    one matrix-vector product, ``||z||^2 - 2 z.c + ||c||^2``, so the projected rows are read once per
    pick (about 3 ms for 257k rows of 64 floats on 2 cores: 1 min for a 16k bank).

    Args:
        x: ``[N, C]`` float32 patch features.
        m: rows to pick; all ``N`` rows (in order) when ``m >= N``.
        seed: RNG seed (projection, first row).
        dim: projection size; no projection when ``C <= dim``.

    Returns:
        ``[min(m, N)]`` int64 row indices into ``x``, in pick order.
    """
    n = x.shape[0]
    if m >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    z = x
    if z.shape[1] > dim:
        z = z @ (torch.randn(z.shape[1], dim, generator=g) / math.sqrt(dim))
    norm = z.square().sum(1)
    picked = torch.empty(m, dtype=torch.int64)
    last = int(torch.randint(n, (1,), generator=g))
    min_d = torch.full((n,), float("inf"))
    for i in range(m):
        picked[i] = last
        d = torch.addmv(norm, z, z[last], alpha=-2.0)
        d += norm[last]
        torch.minimum(min_d, d, out=min_d)
        last = int(min_d.argmax())
    return picked


@torch.no_grad()
def fill_bank(level: Any, tokens: torch.Tensor, seed: int, batch: int = 8, *,
              references: bool = True) -> torch.Tensor | None:
    """Fill a level's memory bank from the training tokens; return each token's reference index.

    The bank is a coreset (:func:`coreset_indices`) of all training patches. Each training token's
    reference is its nearest bank patch from *another* image: at test time a normal patch is not
    in the bank either, so training sees the distances it will meet (:attr:`FODConfig.reference`).

    Args:
        level: a :class:`~fod.model.FODLevel` with a memory bank of ``M`` patches.
        tokens: ``[n, L, C]`` float32 training tokens (CPU).
        seed: coreset seed.
        batch: images per distance block (``batch * L * M`` floats of memory).
        references: also search each training token's reference; False only fills the bank (no
            training follows: ``epochs`` 0).

    Returns:
        ``[n, L]`` int64 bank indices, or None without ``references``.
    """
    n, length, channels = tokens.shape
    flat = tokens.reshape(-1, channels)
    picked = coreset_indices(flat, level.bank.shape[1], seed)
    device = level.bank.device
    level.set_bank(flat[picked].to(device))
    if not references:
        return None
    owner = (picked // length).to(device)  # image of each bank patch
    out = torch.empty(n, length, dtype=torch.int64)
    for start in range(0, n, batch):
        images = torch.arange(start, min(start + batch, n), device=device)
        exclude = owner[None, :] == images[:, None]
        out[start : start + len(images)] = level.nearest(tokens[start : start + len(images)].to(device), exclude).cpu()
    return out


def _use_compile(settings: TrainSettings, steps: int, device: torch.device) -> bool:
    if settings.compile is not None:
        return settings.compile
    return device.type == "cuda" or (steps >= COMPILE_MIN_STEPS and shutil.which("cc") is not None)


@torch.no_grad()
def extract_features(model: FODModel, images: np.ndarray, batch_size: int = 16) -> list[torch.Tensor]:
    """Level inputs of all images: ``[N, H, W, 3]`` uint8 -> one ``[N, C_l, h_l, w_l]`` float32 per level."""
    device = next(model.backbone.buffers()).device
    outs: list[list[torch.Tensor]] = [[] for _ in model.levels]
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        for i, f in enumerate(model.level_inputs(model.backbone(batch))):
            outs[i].append(f.cpu())
    return [torch.cat(o) for o in outs]


def _step_loss(
    levels: list[Any],
    xs: list[torch.Tensor],
    lambda1: float,
    lambda2: float,
    jitter: float = 0.0,
    ref_indices: list[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over levels of :func:`fod.losses.fod_loss` and the stacked terms ``[levels, 7]`` (detached).

    ``xs``: one ``[N, L, C]`` float32 token batch per level. With ``jitter`` > 0 each level sees its
    tokens plus noise (:attr:`TrainSettings.jitter`) and is scored against the clean tokens.
    ``ref_indices``: per level the ``[N, L]`` int64 nearest-patch reference indices (None for a mean
    reference).
    """
    total = torch.zeros((), device=xs[0].device)
    terms = []
    for li, (level, x) in enumerate(zip(levels, xs)):
        x_in = x
        if jitter > 0:
            x_in = x + torch.randn_like(x) * (x.norm(dim=-1, keepdim=True) * (jitter / x.shape[-1]))
        x_hat, maps = level(x_in, training_maps=True, ref_index=None if ref_indices is None else ref_indices[li])
        loss, t = fod_loss(x, x_hat, maps, lambda1, lambda2)
        total = total + loss
        terms.append(t)
    return total, torch.stack(terms)


def train_model(
    images: np.ndarray,
    config: FODConfig,
    settings: TrainSettings,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[FODModel, dict[str, Any]]:
    """Train a FOD model on good images.

    Args:
        images: ``[N, S, S, 3]`` uint8 BGR, already through ``fod.preprocess.to_model_input``.
        config: model hyper-parameters (``image_size`` must equal S). Its ``level_norm`` is set in
            place to the measured fusion statistics (None when ``settings.holdout`` is 0); the returned
            model holds this same config.
        settings: schedule.
        on_epoch: called after each epoch with (epoch, mean loss terms).

    Returns:
        the trained model (eval mode, CPU) and a record (epochs, steps, seconds, losses per epoch).

    Raises:
        ValueError: images do not match ``config.image_size`` or fewer than 2 images.
        DataError: the images have no contrast (blank or saturated frames), or ``--holdout`` cannot be met.
    """
    if images.ndim != 4 or images.shape[1:] != (config.image_size, config.image_size, 3):
        raise ValueError(f"images must be [N, {config.image_size}, {config.image_size}, 3], got {images.shape}")
    if len(images) < 2:
        raise ValueError(f"need at least 2 good images to train, got {len(images)}")
    if settings.regional_auto and config.regional:
        raise ValueError(f"regional_auto needs config.regional 0, got {config.regional}")
    if settings.epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {settings.epochs}")
    if settings.epochs == 0 and not (config.anchor and config.reference == "nearest" and config.score == "rec"):
        raise ValueError("epochs 0 (memory-bank mode) needs anchor, reference 'nearest' and score 'rec'; got "
                         f"anchor {config.anchor}, reference {config.reference!r}, score {config.score!r}")
    if config.regional and settings.holdout <= 0:
        raise DataError(f"--regional {config.regional} needs held-out good images for its statistics: "
                        "pass --holdout > 0 (default 0.1) or --regional 0")
    if settings.global_level not in GLOBAL_LEVEL_CHOICES:
        raise ValueError(f"global_level {settings.global_level!r}: choose from {list(GLOBAL_LEVEL_CHOICES)}")
    if settings.global_level == "on" and settings.holdout <= 0:
        raise DataError("--global-level on needs held-out good images for its statistics: pass --holdout > 0 "
                        "(default 0.1) or --global-level off")
    train_idx, holdout_idx = split_holdout(len(images), settings.holdout, settings.seed)
    spread = float(images[:: max(1, len(images) // 64), ::4, ::4].std())  # a sample: the whole set is GBs as floats
    if spread < 1.0:
        raise DataError(f"the {len(images)} good images have no contrast (grey-level std {spread:.2f} < 1): blank or "
                        "saturated frames, from which no model can learn what a good part looks like; check the camera "
                        "and the image folder")
    n = len(train_idx)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config.level_norm = None
    config.regional_norm = None
    config.peak_floor = 0.0
    config.global_bank_size, config.global_norm = 0, None
    if settings.standardize:
        config.intensity = intensity_statistics(images[train_idx])
        log.info("intensity standardisation: each frame to mean %.1f, std %.1f grey levels (the training images' "
                 "average)", *config.intensity)
    if config.reference == "nearest":
        fewest = n * min((config.image_size // min(level)) ** 2 for level in config.levels)
        if config.bank_size > fewest:
            log.info("memory bank: %d patches asked, the %d training images give %d: using them all",
                     config.bank_size, n, fewest)
            config.bank_size = fewest
    share = (image_position_share(images[train_idx])
             if settings.holdout > 0 and (settings.regional_auto or settings.global_level == "auto") else None)
    auto = _choose_regional(share, config, settings) if settings.regional_auto else None
    global_choice = _choose_global(share, settings)
    if global_choice["on"]:
        config.global_bank_size = n
    if config.regional:
        fewest = n * (config.image_size // min(config.levels[0])) ** 2
        if config.regional_bank_size > fewest:
            log.info("regional bank: %d patches asked, the %d training images give %d: using them all",
                     config.regional_bank_size, n, fewest)
            config.regional_bank_size = fewest
    model = FODModel(config).to(device)
    start = time.perf_counter()
    features = extract_features(model, images)
    feature_s = time.perf_counter() - start
    tokens = [FODModel.tokens(f[torch.from_numpy(train_idx)]) for f in features]  # [n, L, C] on CPU
    ref_indices: list[torch.Tensor | None] = []
    for level, tok in zip(model.levels, tokens):
        level.reference.copy_(tok.mean(0, keepdim=True).to(device))  # fod-method.md 2.4
        ref_indices.append(None if level.bank is None
                           else fill_bank(level, tok, settings.seed, references=settings.epochs > 0))
    if model.regional is not None:
        fill_regional_bank(model, features[0][torch.from_numpy(train_idx)], settings.seed)
    if model.global_level is not None:
        fill_global_bank(model, features[0][torch.from_numpy(train_idx)])
    bank_s = time.perf_counter() - start - feature_s
    if settings.epochs == 0:
        log.info("memory-bank mode (--epochs 0): no correction trained; each patch scores its distance to the "
                 "nearest bank patch")
    # fused: one kernel for the whole update instead of a dozen small ops per tensor (about 6 % of a
    # demo step on one CPU thread, docs/benchmarks.md); the same arithmetic as the default loop
    optimizer = torch.optim.Adam(model.levels.parameters(), lr=settings.lr,  # type: ignore[attr-defined]
                                 fused=device.type in ("cpu", "cuda"))
    model.levels.train()  # type: ignore[attr-defined]
    history: list[dict[str, float]] = []
    steps_per_epoch = (n + settings.batch_size - 1) // settings.batch_size
    total_steps = settings.epochs * steps_per_epoch
    compiled = total_steps > 0 and _use_compile(settings, total_steps, device)
    step_loss = torch.compile(_step_loss) if compiled else _step_loss
    names = TERMS
    bar = None
    if settings.progress and total_steps > 0:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc="fod train", unit="step", dynamic_ncols=True)
    train_start = time.perf_counter()
    epoch_seconds: list[float] = []
    for epoch in range(settings.epochs):
        epoch_start = time.perf_counter()
        order = rng.permutation(n)
        loss_sum = torch.zeros((), dtype=torch.float64)
        term_sum = torch.zeros(len(model.levels), len(names), dtype=torch.float64)
        for step in range(steps_per_epoch):
            idx = torch.from_numpy(order[step * settings.batch_size : (step + 1) * settings.batch_size])
            refs = [None if r is None else r[idx].to(device) for r in ref_indices]
            total, terms = step_loss(list(model.levels), [tok[idx].to(device) for tok in tokens],
                                     config.lambda1, config.lambda2, settings.jitter, refs)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            loss_sum += total.detach().double().cpu()
            term_sum += terms.double().cpu()
            if bar is not None:
                bar.update(1)
                if step % 20 == 0 or step == steps_per_epoch - 1:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(total.detach()):.3f}",
                                    rec=",".join(f"{float(r):.3f}" for r in term_sum[:, -1] / (step + 1)))
        means = {f"l{li}_{k}": float(term_sum[li, ki]) / steps_per_epoch
                 for li in range(len(model.levels)) for ki, k in enumerate(names)}
        means["loss"] = float(loss_sum) / steps_per_epoch
        history.append(means)
        epoch_seconds.append(time.perf_counter() - epoch_start)
        left = (settings.epochs - epoch - 1) * (time.perf_counter() - train_start) / (epoch + 1)
        log.info("epoch %d/%d: %.1f s (%.2f steps/s), about %.0f s left; loss %.4f", epoch + 1, settings.epochs,
                 epoch_seconds[-1], steps_per_epoch / epoch_seconds[-1], left, means["loss"])
        if on_epoch is not None:
            on_epoch(epoch + 1, means)
    if bar is not None:
        bar.close()
    model.eval()
    if len(holdout_idx):
        config.level_norm = level_statistics(model, [f[torch.from_numpy(holdout_idx)] for f in features])
        log.info("level fusion statistics on %d held-out good images (mean, std per level): %s",
                 len(holdout_idx), [tuple(round(v, 6) for v in st) for st in config.level_norm])
        if model.regional is not None:
            config.regional_norm = regional_statistics(model, [f[torch.from_numpy(holdout_idx)] for f in features])
            log.info("regional level statistics on the held-out images (mean, std): %s",
                     tuple(round(v, 6) for v in config.regional_norm))
        if config.map_power != 1.0:
            config.peak_floor = peak_floor_statistic(model, [f[torch.from_numpy(holdout_idx)] for f in features])
            log.info("peak-relative map (power %g): floor %.4f, the largest peak of the %d held-out good images",
                     config.map_power, config.peak_floor, len(holdout_idx))
        if model.global_level is not None:
            config.global_norm = global_statistics(model, [f[torch.from_numpy(holdout_idx)] for f in features])
            log.info("global level statistics on the held-out images (mean, std of the distance): %s",
                     tuple(round(v, 6) for v in config.global_norm))
    model.eval().cpu()
    record = {
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "seed": settings.seed,
        "steps": total_steps,
        "train_images": n,
        "holdout": settings.holdout,
        "holdout_indices": [int(i) for i in holdout_idx],
        "level_norm": None if config.level_norm is None else [list(x) for x in config.level_norm],
        "regional_norm": None if config.regional_norm is None else list(config.regional_norm),
        "regional": config.regional,
        "regional_auto": auto,
        "map_power": config.map_power,
        "peak_floor": config.peak_floor,
        "global_level": global_choice,
        "global_norm": None if config.global_norm is None else list(config.global_norm),
        "compiled": compiled,
        "jitter": settings.jitter,
        "feature_seconds": round(feature_s, 2),
        "bank_seconds": round(bank_s, 2),
        "train_seconds": round(sum(epoch_seconds), 2),
        "epoch_seconds": [round(x, 2) for x in epoch_seconds],
        "steps_per_second": round(total_steps / max(sum(epoch_seconds), 1e-9), 3),
        "seconds": round(time.perf_counter() - start, 2),
        "device": str(device),
        "history": history,
    }
    return model, record


def _choose_regional(share: float | None, config: FODConfig, settings: TrainSettings) -> dict[str, Any]:
    """Apply ``--regional auto`` to ``config`` from the training images' :func:`image_position_share`
    (``share``; None with ``--holdout`` 0: no regional level is possible, so nothing was measured); returns
    what was measured and chosen, for the training record.
    """
    grid = config.image_size // min(config.levels[0])
    if share is None:  # no images for the regional statistics: nothing to measure the decision for
        log.info("regional level (--regional auto): none; no held-out images for its statistics (--holdout 0)")
        return {"position_share": None, "regional": 0,
                "why": "no held-out images for its statistics (--holdout 0)"}
    k = auto_regional(share, grid)
    why = (f"position share {share:.2f} {'<' if share < POSITION_SHARE_MAX else '>='} {POSITION_SHARE_MAX}: "
           + ("a surface texture" if k else "an object" if share >= POSITION_SHARE_MAX
              else f"a surface texture, but a {grid}-cell grid is too small for a window"))
    if k:
        config.regional, config.regional_bank_size = k, settings.regional_bank_size
        log.info("regional level (--regional auto): K %d of a %d-cell grid; %s", k, grid, why)
    else:
        log.info("regional level (--regional auto): none; %s", why)
    return {"position_share": round(share, 4), "regional": k, "why": why}


def _choose_global(share: float | None, settings: TrainSettings) -> dict[str, Any]:
    """Decide the global level from :attr:`TrainSettings.global_level` and, for ``"auto"``, the position share
    (``share``; None when not measured); returns ``{"on": bool, "why": str}`` for the training record.
    """
    if settings.global_level != "auto":
        return {"on": settings.global_level == "on", "why": f"--global-level {settings.global_level}"}
    if share is None:
        why = "no held-out images for its statistics (--holdout 0)"
        on = False
    else:
        on = share < POSITION_SHARE_MAX
        why = (f"position share {share:.2f} {'<' if on else '>='} {POSITION_SHARE_MAX}: "
               + ("a surface texture" if on else "an object"))
    log.info("global level (--global-level auto): %s; %s", "on" if on else "off", why)
    return {"on": on, "why": why}


def train_run(
    data: str | Path, out: str | Path, config: FODConfig, settings: TrainSettings
) -> tuple[Path, dict[str, Any]]:
    """Read the good images of ``data`` (a folder or an MVTec root), train, save ``out/checkpoint.pt``.

    Returns:
        the checkpoint path and the training record.

    Raises:
        fod.errors.DataError: the folder is empty, wrongly laid out, or holds an unreadable image.
    """
    from fod.data import fingerprint, list_images, load_images, train_folder

    folder = train_folder(data)
    paths = list_images(folder)
    images = load_images(paths, (config.image_size, config.image_size))
    log.info("read %d good images from %s", len(paths), folder)
    model, record = train_model(images, config, settings)
    record["data"] = fingerprint(paths, folder).model_dump()
    record["holdout_files"] = [paths[i].name for i in record["holdout_indices"]]
    path = save_checkpoint(out, model, record)
    return path, record
