"""The FOD model: one transformer per feature level, test-time scoring, and the full frame-to-map graph.

Follows the reference behaviour described in ``docs`` fod-method.md (Yao et al., "Focus the
Discrepancy", ICCV 2023, arXiv 2308.02983) with the project's fixes: any batch size, reference
features as buffers, the RBF target in softmax form, attention as matmul, no einsum or Tile.

Shapes: ``N`` batch, ``L = h*w`` tokens of a level, ``C`` backbone channels, ``d`` model width,
``H`` heads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fod.backbone import STRIDES, FeatureExtractor
from fod.errors import CheckpointError
from fod.smoothing import GaussianSmoothing

EPS_KL = 1e-4  # fod-method.md section 3.1
REFERENCES = ("mean", "nearest")
"""Values of :attr:`FODConfig.reference`."""
SCORES = ("rec*inter", "rec")
"""Values of :attr:`FODConfig.score`."""
MAP_POWER_MAX = 8.0
"""Largest :attr:`FODConfig.map_power`: above it the map is little more than its peak pixel."""
REGIONAL_TAU = 2.0
"""Gate of the regional level in units of the local map's held-out spread: the regional map counts fully
where the local map is 0 and by ``exp(-1)`` where it is 2 (:meth:`FODModel.maps_from_features`)."""


@dataclass
class FODConfig:
    """Hyper-parameters of a FOD model (saved in the checkpoint; loading needs nothing else).

    Attributes:
        backbone: feature extractor name (``fod.backbone.BACKBONES``).
        image_size: square input size in px (a multiple of the coarsest stride in ``levels``).
        levels: backbone strides that feed each FOD level. ``((8,), (16,))`` is the reference's two
            levels (WRN50 ``layer2`` / ``layer3``, fod-method.md section 1); a level with several strides,
            e.g. ``((16, 32),)``, reads their maps concatenated on the grid of its finest stride (the
            coarser maps bilinearly upsampled, as PatchCore combines layers).
        d_models: transformer width per level (one per entry of ``levels``).
        heads: attention heads (8 in the reference).
        layers: encoder layers per level (3 in the reference).
        ffn_mult: FFN hidden size = ffn_mult * d.
        lambda1, lambda2: loss weights of the KL and entropy terms (0.5, 0.5 in the reference).
        smooth_sigma: Gaussian sigma of the anomaly map in px (4 in the reference).
        level_norm: per level ``(mean, std)`` of its upsampled patch-score map on held-out good
            images, or None. When set, the levels are fused as ``mean_l relu((m_l - mean_l) / std_l)``
            (each level on the scale of its own good-image spread, so no level dominates because its
            values are larger); when None, as the reference's plain average. Folded into the exported
            graph as constants.
        reference: what each token's inter branch attends to (fod-method.md section 2.4).
            ``"mean"``: the reference's mean training feature map, one per level (position by
            position). ``"nearest"``: for every token its nearest training patch from a memory bank
            (``bank_size`` patches per level, PatchCore's retrieval; Roth et al., CVPR 2022, section
            3.2), laid out on the token's own position, so parts that are not aligned still meet a
            matching normal patch at the same place and the inter target keeps its meaning.
        bank_size: memory-bank patches per level for ``reference = "nearest"`` (0 with ``"mean"``).
            Saved in the checkpoint and folded into the exported graph as a constant.
        score: the test-time patch score (:meth:`FODLevel.patch_scores`). ``"rec*inter"``: the
            reference's reconstruction error times the within-image inter score (fod-method.md
            section 4, steps 1-4). ``"rec"``: the reconstruction error alone (step 1); with the
            nearest-patch reference it separates better on magnetic-tile (docs/results.md, third round).
        anchor: reference-anchored reconstruction. When True each level reconstructs a token as its
            reference patch plus the transformer's correction, ``x_hat_i = r_i + head(z_i)``, with the
            head initialised to zero, so training starts from the plain distance to the reference
            (with ``reference = "nearest"``: the nearest-neighbour distance) and learns from the
            image's context which differences from the nearest normal patch are normal. False: the
            reference's ``x_hat_i = head(z_i)`` (fod-method.md section 2.2).
        intensity: per-frame intensity standardisation before the backbone, ``(mean, std)`` in grey
            levels (:func:`fod.intensity.standardize_intensity`; ``fod train`` measures them on its
            training images), or None (off, the reference's input). Folded into the exported graph.
        flat_sigma: with ``intensity`` (ignored without), the sigma in px of the flat-field correction
            before the standardisation (:class:`fod.intensity.IntensityNorm`; 0: none). ``fod train --intensity flat``
            sets it to ``image_size / 12``.
        regional: side K (odd, >= 3) of the regional level's window on the first level's grid, or 0 (none).
            The regional level (:class:`RegionalLevel`) averages the first level's input over K x K grid
            cells and scores each position by its distance to the nearest of ``regional_bank_size``
            averaged training patches: it sees a region of a different texture as a whole where a patch
            sees too little of it. It adds to the map only where the local map is flat
            (:meth:`FODModel.maps_from_features`). Needs ``level_norm`` (``--holdout`` > 0).
        regional_bank_size: memory-bank patches of the regional level (0 without it).
        regional_norm: ``(mean, std)`` of the regional level's upsampled map on the held-out good images,
            or None (not measured yet: the regional level does not take part).
        map_power: exponent p of the peak-relative map, the last step of the graph
            (:func:`peak_relative`): each frame's map ``m`` becomes ``D * (m / D) ** p`` with ``D`` the larger
            of its own peak and ``peak_floor``, so a pixel counts by how close it comes to the frame's worst
            place, and the frames that look normal share one scale. 1: the map as fused (every checkpoint
            made before). ``fod train`` uses 2 (docs/results.md, twelfth round).
        peak_floor: the largest peak of the fused map (before the peak-relative step) among the held-out
            good images, in the map's units; 0: none (``--holdout 0``, or checkpoints made before).
        global_bank_size: descriptors in the global level's memory bank (one per training image), or 0 (no
            global level). The global level (:class:`GlobalLevel`) describes the whole frame by the per-channel
            mean and standard deviation of the first level's input and scores its distance to the nearest
            training frame's descriptor: a surface whose whole finish differs is seen as a whole.
        global_norm: ``(mean, std)`` of that distance over the held-out good images, or None (not measured:
            the global level does not take part). The frame's map is lifted by ``relu((d - mean) / std)`` at
            its peak and in proportion below it (:meth:`FODModel.maps_from_features`). ``fod train`` floors
            the std at a tenth of the mean (:func:`fod.train.global_statistics`).
    """

    backbone: str = "efficientnet_lite0"
    image_size: int = 128
    levels: tuple[tuple[int, ...], ...] = ((8,), (16,))
    d_models: tuple[int, ...] = (128, 256)
    heads: int = 8
    layers: int = 3
    ffn_mult: int = 4
    lambda1: float = 0.5
    lambda2: float = 0.5
    smooth_sigma: float = 4.0
    level_norm: tuple[tuple[float, float], ...] | None = None
    reference: str = "mean"
    bank_size: int = 0
    score: str = "rec*inter"
    anchor: bool = False
    intensity: tuple[float, float] | None = None
    flat_sigma: float = 0.0
    regional: int = 0
    regional_bank_size: int = 0
    regional_norm: tuple[float, float] | None = None
    map_power: float = 1.0
    peak_floor: float = 0.0
    global_bank_size: int = 0
    global_norm: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        d = asdict(self)
        d["d_models"] = list(self.d_models)
        d["levels"] = [list(level) for level in self.levels]
        d["level_norm"] = None if self.level_norm is None else [list(n) for n in self.level_norm]
        d["intensity"] = None if self.intensity is None else list(self.intensity)
        d["regional_norm"] = None if self.regional_norm is None else list(self.regional_norm)
        d["global_norm"] = None if self.global_norm is None else list(self.global_norm)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FODConfig:
        """Inverse of :meth:`to_dict` (unknown keys raise TypeError). Configs saved before ``levels``
        and ``level_norm`` existed load as the reference's stride-8/16 pair with a plain average, and
        configs without ``intensity`` with the reference's input (no standardisation).
        """
        d = dict(d)
        d["d_models"] = tuple(d["d_models"])
        if "levels" in d:
            d["levels"] = tuple(tuple(int(s) for s in level) for level in d["levels"])
        if d.get("level_norm") is not None:
            d["level_norm"] = tuple((float(a), float(b)) for a, b in d["level_norm"])
        if d.get("intensity") is not None:
            mean, std = d["intensity"]
            d["intensity"] = (float(mean), float(std))
        if d.get("regional_norm") is not None:
            mean, std = d["regional_norm"]
            d["regional_norm"] = (float(mean), float(std))
        if d.get("global_norm") is not None:
            mean, std = d["global_norm"]
            d["global_norm"] = (float(mean), float(std))
        return cls(**d)

    @property
    def strides(self) -> tuple[int, ...]:
        """Backbone strides read by any level, ascending."""
        return tuple(sorted({s for level in self.levels for s in level}))

    def validate(self) -> None:
        """Check ``levels``, ``d_models``, ``image_size`` and ``level_norm`` against each other.

        Raises:
            CheckpointError: naming the option and the allowed values.
        """
        if not self.levels or any(not level for level in self.levels):
            raise CheckpointError(f"levels {self.levels}: give at least one level of strides, e.g. 8,16 or 16+32")
        bad = sorted({s for level in self.levels for s in level if s not in STRIDES})
        if bad:
            raise CheckpointError(f"levels: stride(s) {bad} are not backbone stages; choose from {list(STRIDES)}")
        if len(self.d_models) != len(self.levels):
            raise CheckpointError(
                f"d_models {list(self.d_models)}: give one width per level ({len(self.levels)} levels)"
            )
        coarsest = max(self.strides)
        if self.image_size < 2 * coarsest or self.image_size % coarsest:
            raise CheckpointError(
                f"image size {self.image_size} px: must be a multiple of the coarsest stride {coarsest} "
                f"(and at least {2 * coarsest}), e.g. {max(2 * coarsest, round(self.image_size / coarsest) * coarsest)}"
            )
        radius = int(4.0 * self.smooth_sigma + 0.5)  # fod.smoothing: the mirror padding needs a larger map
        if self.image_size <= radius:
            smallest = (radius // coarsest + 1) * coarsest
            raise CheckpointError(
                f"image size {self.image_size} px: the anomaly map's Gaussian smoothing (sigma {self.smooth_sigma:g} "
                f"px, radius {radius} px) needs a larger frame; give at least {smallest}"
            )
        if any(d % self.heads or d % 4 for d in self.d_models):
            raise CheckpointError(
                f"d_models {list(self.d_models)}: each must be a multiple of heads ({self.heads}) and of 4"
            )
        if self.reference not in REFERENCES:
            raise CheckpointError(f"reference {self.reference!r}: choose from {list(REFERENCES)}")
        if self.score not in SCORES:
            raise CheckpointError(f"score {self.score!r}: choose from {list(SCORES)}")
        if (self.reference == "nearest") != (self.bank_size > 0):
            raise CheckpointError(
                f"bank_size {self.bank_size} with reference {self.reference!r}: the nearest-patch reference needs a "
                "memory bank of at least 1 patch per level (e.g. 16384), the mean reference none (0)"
            )
        if self.level_norm is not None:
            if len(self.level_norm) != len(self.levels) or any(
                not (math.isfinite(m) and math.isfinite(sd) and sd > 0) for m, sd in self.level_norm
            ):
                raise CheckpointError(f"level_norm {self.level_norm}: need one finite (mean, std > 0) per level")
        if self.intensity is not None:
            mean, std = self.intensity
            if not (0.0 <= mean <= 255.0 and 0.0 < std <= 255.0):
                raise CheckpointError(
                    f"intensity {self.intensity}: need a target (mean, std) in grey levels, 0 <= mean <= 255 and "
                    "0 < std <= 255, or None"
                )
        if self.flat_sigma < 0 or int(self.flat_sigma + 0.5) >= self.image_size // 4:
            raise CheckpointError(
                f"flat_sigma {self.flat_sigma}: the flat-field sigma must be from 0 (off) to "
                f"{self.image_size // 4 - 1} px at image size {self.image_size}"
            )
        if not (math.isfinite(self.map_power) and 1.0 <= self.map_power <= MAP_POWER_MAX):
            raise CheckpointError(
                f"map_power {self.map_power}: the peak-relative exponent must be from 1 (off) to {MAP_POWER_MAX:g} "
                "(e.g. 2)"
            )
        if not (math.isfinite(self.peak_floor) and self.peak_floor >= 0):
            raise CheckpointError(f"peak_floor {self.peak_floor}: need a finite value >= 0 (0: none)")
        if self.regional:
            if self.regional < 3 or self.regional % 2 == 0:
                raise CheckpointError(
                    f"regional {self.regional}: the regional window must be an odd number of grid cells >= 3 "
                    "(e.g. 13), or 0 for none"
                )
            if self.regional_bank_size < 1:
                raise CheckpointError(
                    f"regional_bank_size {self.regional_bank_size}: the regional level needs a memory bank of at "
                    "least 1 patch (e.g. 4096)"
                )
            if self.regional_norm is not None:
                mean, std = self.regional_norm
                if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                    raise CheckpointError(f"regional_norm {self.regional_norm}: need a finite (mean, std > 0)")
                if self.level_norm is None:
                    raise CheckpointError(
                        "regional_norm without level_norm: the regional level's gate needs the levels' held-out "
                        "statistics (train with --holdout > 0)"
                    )
        elif self.regional_bank_size or self.regional_norm is not None:
            raise CheckpointError(
                f"regional {self.regional} with regional_bank_size {self.regional_bank_size} and regional_norm "
                f"{self.regional_norm}: without a regional level (0) both must be unset (0, None)"
            )
        if self.global_bank_size < 0:
            raise CheckpointError(f"global_bank_size {self.global_bank_size}: need >= 1 descriptor, or 0 (none)")
        if self.global_norm is not None:
            mean, std = self.global_norm
            if not self.global_bank_size or not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise CheckpointError(
                    f"global_norm {self.global_norm} with global_bank_size {self.global_bank_size}: need a finite "
                    "(mean, std > 0) and a global level (global_bank_size >= 1), or None"
                )


def parse_levels(text: str) -> tuple[tuple[int, ...], ...]:
    """Parse the CLI form of :attr:`FODConfig.levels`: ``"8,16"`` (two levels) or ``"16+32"`` (one
    level reading both strides) or ``"8,16+32"``.

    Raises:
        ValueError: not of that form (the message lists the allowed strides).
    """
    try:
        levels = tuple(tuple(sorted({int(s) for s in part.split("+")})) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r}: write levels as strides from {list(STRIDES)} joined by ',' (separate "
                         "levels) or '+' (one level), e.g. 8,16 or 16,32 or 16+32") from None
    bad = sorted({s for level in levels for s in level if s not in STRIDES})
    if bad:
        raise ValueError(f"{text!r}: stride(s) {bad} are not backbone stages; choose from {list(STRIDES)}")
    return levels


def peak_relative(anomaly_map: torch.Tensor, power: float, floor: float = 0.0) -> torch.Tensor:
    """Peak-relative anomaly map: ``D * (relu(m) / D) ** power`` per frame, ``D = max(M, floor)`` with ``M``
    the frame's own peak.

    A pixel loses the more, the further it lies below its frame's peak, so between frames the raised
    background of a defective part ranks below another part's defect, while the order of pixels within
    a frame is kept. ``floor`` (the largest peak of the held-out good frames, :attr:`FODConfig.peak_floor`)
    puts every frame that looks normal (``M <= floor``) on one common scale instead of stretching its
    background up to its own small peak. The score (the new peak) is ``M`` for ``M >= floor`` and
    ``floor * (M / floor) ** power`` below: the same order of frames, so image AUROC is unchanged.
    Scale-covariant (``c * m`` and ``c * floor`` give ``c *`` the result). The lever was measured, not
    taken from a paper: docs/results.md, twelfth round (magnetic-tile pixel AUROC 0.870 -> 0.904 with
    the regional window of 19; hazelnut 0.982 -> 0.988).

    Args:
        anomaly_map: ``[N, 1, H, W]`` float32, values >= 0 (the fused map; negatives count as 0).
        power: exponent >= 1 (1 returns the map unchanged).
        floor: the lowest ``D``, >= 0 (0: each frame relative to its own peak).

    Returns:
        ``[N, 1, H, W]`` float32; a frame whose ``D`` is <= 1e-6 maps to zeros.
    """
    if power == 1.0:
        return anomaly_map
    peak = anomaly_map.amax(dim=(2, 3), keepdim=True).clamp_min(max(floor, 1e-6))
    return peak * (torch.relu(anomaly_map) / peak) ** power


def sincos_position_2d(d: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sin/cos positional code (fod-method.md 2.1).

    Channels ``[0, d/2)`` encode the column, ``[d/2, d)`` the row; pair ``k`` of a half uses
    ``omega_k = exp(-2k ln(1e4) / (d/2))``, even channels sin, odd channels cos.

    Returns:
        ``[h*w, d]`` float32, row-major token order.
    """
    if d % 4:
        raise ValueError(f"d_model {d} must be a multiple of 4 for the 2-D positional code")
    half = d // 2
    omega = torch.exp(-torch.arange(0, half, 2, dtype=torch.float64) * math.log(1e4) / half)  # [d/4]

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None].double() * omega[None, :]  # [P, d/4]
        out = torch.zeros(pos.numel(), half, dtype=torch.float64)
        out[:, 0::2] = torch.sin(angles)
        out[:, 1::2] = torch.cos(angles)
        return out

    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def squared_distance_maps(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable squared distances of an ``h x w`` grid, tokens in row-major order.

    Returns:
        ``D^y_ir = (row_i - r)^2`` ``[L, h]`` and ``D^x_ic = (col_i - c)^2`` ``[L, w]``, float32; the
        full ``[L, L]`` distance ``D_ij`` of fod-method.md 2.3 is ``D^y_{i,row_j} + D^x_{i,col_j}``.
    """
    rows = torch.arange(h).repeat_interleave(w).float()
    cols = torch.arange(w).repeat(h).float()
    dist_y = (rows[:, None] - torch.arange(h).float()[None, :]) ** 2
    return dist_y, (cols[:, None] - torch.arange(w).float()[None, :]) ** 2


def rbf_target(sigma: torch.Tensor, dist_y: torch.Tensor, dist_x: torch.Tensor) -> torch.Tensor:
    """Row-normalised Gaussian target correlation (fod-method.md 2.3), computed separably.

    ``P_hij = softmax_j(-D^y_ij / (2 sigma_y,hi^2) - D^x_ij / (2 sigma_x,hi^2))`` equals the
    reference's ``T / sum_j T`` with ``T = exp(...) / (2 pi sigma_y sigma_x)`` (the prefactor cancels).
    The exponent is a sum of a row term and a column term, so the softmax over the ``h x w`` keys
    is the outer product of a softmax over rows and one over columns (the normaliser factorises:
    ``sum_{r,c} e^{a_r + b_c} = sum_r e^{a_r} sum_c e^{b_c}``). This builds the ``[N, H, L, L]`` map
    with one multiplication instead of five element-wise passes: exact, not an approximation.

    Args:
        sigma: ``[N, H, L, 2]`` float32 (channel 0 sigma_y, 1 sigma_x), in grid cells.
        dist_y: ``[L, h]``, dist_x: ``[L, w]`` float32 squared distances (:func:`squared_distance_maps`).

    Returns:
        ``[N, H, L, h*w]`` float32, rows sum to 1, keys row-major.
    """
    inv_y = 0.5 / sigma[..., 0:1].square()
    inv_x = 0.5 / sigma[..., 1:2].square()
    p_rows = torch.softmax(-(dist_y * inv_y), dim=-1)  # [N, H, L, h]
    p_cols = torch.softmax(-(dist_x * inv_x), dim=-1)  # [N, H, L, w]
    n, heads, length, h = p_rows.shape
    return (p_rows.unsqueeze(-1) * p_cols.unsqueeze(-2)).reshape(n, heads, length, h * p_cols.shape[-1])


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p||q) + KL(q||p)`` with the reference's 1e-4 smoothing, averaged over heads.

    ``sum_j (p - q) (log(p + eps) - log(q + eps))`` (fod-method.md 3.1), which equals the sum of the two
    KL terms as the reference writes them.

    Args:
        p, q: ``[N, H, L, S]`` row distributions.

    Returns:
        ``[N, L]`` float32.
    """
    return ((p - q) * (torch.log(p + EPS_KL) - torch.log(q + EPS_KL))).sum(-1).mean(1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """``H(p) = -sum_j p log(p + eps)`` averaged over heads: ``[N, H, L, S]`` -> ``[N, L]``."""
    return -(p * torch.log(p + EPS_KL)).sum(-1).mean(1)


class Attention(nn.Module):
    """Multi-head attention with learned per-token RBF sigma (the reference's ``Attention2D``).

    No output projection (the reference computes and discards it). Sigma comes from the query
    input ``x`` in both branches: ``sigma = 3^(sigmoid(5 W_s x) + 1e-5) - 1``.
    """

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.sigma = nn.Linear(d, 2 * heads)
        self.scale = 1.0 / math.sqrt(d // heads)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, L, d]`` -> ``[N, H, L, d/H]``."""
        n, length, d = x.shape
        return x.reshape(n, length, self.heads, d // self.heads).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend.

        Args:
            x: ``[N, L, d]`` query input.
            k, v: ``[N or 1, H, S, d/H]`` already projected and split keys and values.

        Returns:
            output ``[N, L, d]`` (heads concatenated) and attention map ``[N, H, L, S]``.
        """
        q = self.split(self.q(x))
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
        out = torch.matmul(attn, v)  # [N, H, L, d/H]
        n, heads, length, dh = out.shape
        return out.transpose(1, 2).reshape(n, length, heads * dh), attn

    def sigmas(self, x: torch.Tensor) -> torch.Tensor:
        """Learned sigma per token and head: ``[N, L, d]`` -> ``[N, H, L, 2]`` in grid cells."""
        n, length, _ = x.shape
        raw = self.sigma(x).reshape(n, length, self.heads, 2).transpose(1, 2)
        return torch.pow(3.0, torch.sigmoid(5.0 * raw) + 1e-5) - 1.0


@dataclass
class LayerMaps:
    """Attention maps and targets of one encoder layer (training and scoring)."""

    inter_attn: torch.Tensor
    inter_target: torch.Tensor
    intra_attn: torch.Tensor | None = None
    intra_target: torch.Tensor | None = None


class EncoderLayer(nn.Module):
    """Post-norm layer with I2Correlation fusion ``y = LN1(A - B)``, ``out = LN2(y + FFN(y))``."""

    def __init__(self, d: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.intra = Attention(d, heads)
        self.inter = Attention(d, heads)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d))

    def forward(
        self, x: torch.Tensor, ref: torch.Tensor, dist: tuple[torch.Tensor, torch.Tensor], training_maps: bool
    ) -> tuple[torch.Tensor, LayerMaps]:
        """``x`` ``[N, L, d]``, ``ref`` ``[1 or N, S, d]`` embedded reference -> ``[N, L, d]`` and the maps."""
        a, intra_attn = self.intra(x, self.intra.split(self.intra.k(x)), self.intra.split(self.intra.v(x)))
        b, inter_attn = self.inter(x, self.inter.split(self.inter.k(ref)), self.inter.split(self.inter.v(ref)))
        y = self.norm1(a - b)
        out = self.norm2(y + self.ffn(y))
        maps = LayerMaps(inter_attn, rbf_target(self.inter.sigmas(x), *dist))
        if training_maps:
            maps.intra_attn = intra_attn
            maps.intra_target = rbf_target(self.intra.sigmas(x), *dist)
        return out, maps


class FODLevel(nn.Module):
    """One FOD transformer for one feature level.

    Args:
        channels: backbone channels C of the level.
        grid: ``(h, w)`` feature grid.
        d: model width; heads, layers, ffn_mult, bank_size, anchor: see :class:`FODConfig` (``anchor``:
            the reconstruction is the reference patch plus the head's output, the head zero-initialised).

    Buffers: ``reference`` ``[1, L, C]`` (mean training feature per position), ``pos`` ``[1, L, d]``,
    ``dist_y`` ``[L, h]`` / ``dist_x`` ``[L, w]`` (not saved), and with ``bank_size`` > 0 ``bank``
    ``[C, bank_size]`` and ``bank_norm`` ``[bank_size]``: the memory bank of the nearest-patch reference
    (:attr:`FODConfig.reference`), one patch per column (the search's matmul reads it as stored and the
    lookup gathers columns, so the exported graph holds one copy), and each patch's squared norm.
    """

    pos: torch.Tensor
    dist_y: torch.Tensor
    dist_x: torch.Tensor
    reference: torch.Tensor
    bank: torch.Tensor | None
    bank_norm: torch.Tensor | None

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int],
        d: int,
        heads: int,
        layers: int,
        ffn_mult: int,
        bank_size: int = 0,
        anchor: bool = False,
    ) -> None:
        super().__init__()
        h, w = grid
        self.grid = grid
        self.embed = nn.Linear(channels, d)
        self.ref_embed = nn.Linear(channels, d)
        for lin in (self.embed, self.ref_embed):
            nn.init.kaiming_normal_(lin.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.layers = nn.ModuleList([EncoderLayer(d, heads, ffn_mult) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, channels)
        self.anchor = anchor
        if anchor:  # start from x_hat = reference: the first score is the plain distance to it
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        # set by fod.export while it traces a level whose correction is zero (correction_is_zero): the graph
        # then reads the reconstruction straight from the bank and carries no transformer
        self.skip_correction = False
        dist_y, dist_x = squared_distance_maps(h, w)
        self.register_buffer("pos", sincos_position_2d(d, h, w)[None])
        self.register_buffer("dist_y", dist_y, persistent=False)  # derived from the grid, not saved
        self.register_buffer("dist_x", dist_x, persistent=False)
        self.register_buffer("reference", torch.zeros(1, h * w, channels))
        self.register_buffer("bank", torch.zeros(channels, bank_size) if bank_size > 0 else None)
        self.register_buffer("bank_norm", torch.zeros(bank_size) if bank_size > 0 else None)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Drop the ``[L, L]`` distance maps that checkpoints before the separable target saved."""
        for key in (prefix + "dist_y", prefix + "dist_x"):
            state_dict.pop(key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_bank(self, patches: torch.Tensor) -> None:
        """Store ``patches`` ``[bank_size, C]`` float32 as the memory bank (and their squared norms)."""
        if self.bank is None or self.bank_norm is None:
            raise RuntimeError("this FOD level has no memory bank (reference 'mean')")
        self.bank.copy_(patches.t())
        self.bank_norm.copy_(patches.square().sum(-1))

    def bank_patches(self, index: torch.Tensor) -> torch.Tensor:
        """Bank patches by index: ``[N, L]`` int64 -> ``[N, L, C]`` float32 (ONNX ``Gather`` axis 1)."""
        if self.bank is None:
            raise RuntimeError("this FOD level has no memory bank (reference 'mean')")
        return self.bank[:, index].permute(1, 2, 0)

    def nearest(self, tokens: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of each token's nearest bank patch (squared Euclidean distance).

        Args:
            tokens: ``[N, L, C]`` float32.
            exclude: ``[N, bank_size]`` bool, bank patches a token may not pick (in training, the
                patches of its own image); None allows all.

        Returns:
            ``[N, L]`` int64 indices into ``bank``.

        Raises:
            RuntimeError: the level has no memory bank.
        """
        if self.bank is None or self.bank_norm is None:
            raise RuntimeError("this FOD level has no memory bank (reference 'mean')")
        # ||x - b||^2 = ||x||^2 - 2 x.b + ||b||^2; ||x||^2 does not change the argmin
        dist = self.bank_norm - 2.0 * torch.matmul(tokens, self.bank)  # [N, L, M]
        if exclude is not None:
            dist = dist.masked_fill(exclude[:, None, :], float("inf"))
        return dist.argmin(-1)

    def forward(
        self, tokens: torch.Tensor, training_maps: bool = False, ref_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[LayerMaps]]:
        """Reconstruct tokens.

        Args:
            tokens: ``[N, L, C]`` pooled backbone features, row-major.
            training_maps: also return the intra maps and targets (training only).
            ref_index: ``[N, L]`` int64 bank indices of the nearest-patch reference, computed once
                before training (own image excluded); None searches the bank (inference). Ignored
                with the mean reference.

        Returns:
            reconstruction ``[N, L, C]`` and one :class:`LayerMaps` per layer.
        """
        x = self.embed(tokens) + self.pos
        if self.bank is None:
            reference = self.reference  # [1, L, C]
        else:
            reference = self.bank_patches(self.nearest(tokens) if ref_index is None else ref_index)  # [N, L, C]
        ref = self.ref_embed(reference) + self.pos  # same for all layers (reference quirk 3)
        maps = []
        for layer in self.layers:
            x, m = layer(x, ref, (self.dist_y, self.dist_x), training_maps)
            maps.append(m)
        recon = self.head(self.norm(x))
        return (reference + recon if self.anchor else recon), maps

    def correction_is_zero(self) -> bool:
        """True for an anchored level with a memory bank whose correction head is all zeros (``fod train
        --epochs 0``, memory-bank mode): its reconstruction is then the nearest bank patch itself.
        """
        return (self.anchor and self.bank is not None and not bool(self.head.weight.detach().any())
                and not bool(self.head.bias.detach().any()))

    def patch_scores(self, tokens: torch.Tensor, score: str = "rec*inter") -> torch.Tensor:
        """Test-time patch score: ``rec_i * inter_i`` (fod-method.md section 4, steps 1-4) or ``rec_i``.

        With :attr:`skip_correction` (set by the exporter, only with ``score`` "rec" and a zero correction)
        the reconstruction is read from the bank without running the transformer: the same values.

        Args:
            tokens: ``[N, L, C]`` float32.
            score: :attr:`FODConfig.score`.

        Returns:
            ``[N, 1, h, w]`` float32.
        """
        if score == "rec" and self.skip_correction:
            recon = self.bank_patches(self.nearest(tokens))
            maps: list[LayerMaps] = []
        else:
            recon, maps = self(tokens)
        rec = (tokens - recon).square().mean(-1) + 1.0 - F.cosine_similarity(tokens, recon, dim=-1, eps=1e-8)
        if score == "rec":
            return rec.reshape(-1, 1, *self.grid)
        disc = torch.stack([symmetric_kl(m.inter_attn, m.inter_target) for m in maps]).mean(0)  # [N, L]
        prob = torch.softmax(-disc, dim=-1)
        inter = prob.amax(-1, keepdim=True) - prob
        return (rec * inter).reshape(-1, 1, *self.grid)


class NearestBank(nn.Module):
    """A memory bank of vectors and the Euclidean distance of queries to the nearest of them: the part the
    regional and global levels share (:class:`RegionalLevel`, :class:`GlobalLevel`).

    Args:
        dim: D, the vectors' length.
        bank_size: M, vectors in the bank.

    Buffers: ``bank`` ``[D, M]`` (one vector per column) and ``bank_norm`` ``[M]`` (squared norms).
    """

    bank: torch.Tensor
    bank_norm: torch.Tensor

    def __init__(self, dim: int, bank_size: int) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(dim, bank_size))
        self.register_buffer("bank_norm", torch.zeros(bank_size))

    def set_bank(self, vectors: torch.Tensor) -> None:
        """Store ``vectors`` ``[M, D]`` float32 as the bank (and their squared norms)."""
        self.bank.copy_(vectors.t())
        self.bank_norm.copy_(vectors.square().sum(-1))

    def nearest_distance(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` float32 -> ``[...]`` float32 Euclidean distance to the nearest bank vector, as
        ``||x||^2 - 2 x.b + ||b||^2`` minimised over the bank (``MatMul`` + ``ReduceMin`` in ONNX), clamped at 0
        before the square root.
        """
        dist = (self.bank_norm - 2.0 * torch.matmul(x, self.bank)).amin(-1) + x.square().sum(-1)
        return dist.clamp_min(0.0).sqrt()


class RegionalLevel(NearestBank):
    """Nearest-neighbour scoring of regional texture: each patch averaged over its K x K grid neighbours.

    Not a transformer: a memory bank of averaged training patches (a greedy k-center coreset, as the
    nearest-patch reference's; Roth et al., CVPR 2022, section 3.2) and the Euclidean distance to the
    nearest of them. The window is centred (stride 1); cells outside the grid are not counted, so a
    border patch averages fewer (docs/results.md, ninth and tenth rounds).

    Args:
        channels: C of the level input it reads.
        context: side K of the window in grid cells (odd).
        bank_size: M, patches in the memory bank.

    Buffers: ``bank`` ``[C, M]`` (one averaged patch per column; :meth:`set_bank` takes ``[M, C]`` already
    averaged with :meth:`pool`) and ``bank_norm`` ``[M]`` (squared norms).
    """

    def __init__(self, channels: int, context: int, bank_size: int) -> None:
        super().__init__(channels, bank_size)
        self.context = context

    def pool(self, feature: torch.Tensor) -> torch.Tensor:
        """``[N, C, h, w]`` -> the K x K neighbourhood mean at each position, ``[N, C, h, w]`` float32."""
        k = self.context
        return F.avg_pool2d(feature, k, stride=1, padding=k // 2, count_include_pad=False)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """``[N, C, h, w]`` level input -> ``[N, 1, h, w]`` float32 distance to the nearest bank patch."""
        n, _, h, w = feature.shape
        tokens = self.pool(feature).flatten(2).transpose(1, 2)  # [N, L, C]
        return self.nearest_distance(tokens).reshape(n, 1, h, w)


class GlobalLevel(NearestBank):
    """Nearest-neighbour scoring of the whole frame: one descriptor per frame against the training frames'.

    The descriptor is the per-channel mean and standard deviation of a level input over its grid
    (``[2C]``: first- and second-order statistics of the feature map, as global texture descriptors
    pool them; no position survives, so it sees a surface whose whole finish differs, which patches
    compared one by one see only as a slightly raised background). Not learned: a memory bank of the
    training images' descriptors and the Euclidean distance to the nearest of them, as
    :class:`RegionalLevel` does for regions (docs/results.md, ninth, tenth and fourteenth rounds).

    Args:
        channels: C of the level input it reads.
        bank_size: M, descriptors in the memory bank (one per training image).

    Buffers: ``bank`` ``[2C, M]`` (one descriptor per column; :meth:`set_bank` takes ``[M, 2C]`` from
    :meth:`describe`) and ``bank_norm`` ``[M]`` (squared norms).
    """

    def __init__(self, channels: int, bank_size: int) -> None:
        super().__init__(2 * channels, bank_size)

    @staticmethod
    def describe(feature: torch.Tensor) -> torch.Tensor:
        """``[N, C, h, w]`` float32 -> ``[N, 2C]`` float32: per channel the mean, then the (population)
        standard deviation over the ``h x w`` grid.
        """
        mean = feature.mean(dim=(2, 3))
        std = (feature - mean[:, :, None, None]).square().mean(dim=(2, 3)).sqrt()
        return torch.cat([mean, std], dim=1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """``[N, C, h, w]`` level input -> ``[N]`` float32 Euclidean distance of each frame's descriptor to the
        nearest bank descriptor.
        """
        return self.nearest_distance(self.describe(feature))


class FODModel(nn.Module):
    """Frame to answer: backbone, the FOD levels, scoring, upsampling, level fusion, smoothing.

    ``forward(images)``: ``images`` uint8 ``[N, H, W, 3]`` BGR at ``config.image_size`` ->
    ``anomaly_map`` float32 ``[N, 1, H, W]`` and ``score`` float32 ``[N]`` (max of the map).
    This is exactly the exported ONNX graph.

    Raises:
        CheckpointError: an invalid config (:meth:`FODConfig.validate`).
    """

    def __init__(self, config: FODConfig, *, pretrained: bool = True) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = FeatureExtractor(
            config.backbone, config.image_size, strides=config.strides, pretrained=pretrained,
            intensity=config.intensity, flat_sigma=config.flat_sigma,
        )
        channels = dict(zip(config.strides, self.backbone.channels))
        s = config.image_size
        self.levels: list[FODLevel] = nn.ModuleList(  # type: ignore[assignment]
            [
                FODLevel(sum(channels[st] for st in level), (s // min(level), s // min(level)), d,
                         config.heads, config.layers, config.ffn_mult, config.bank_size, config.anchor)
                for level, d in zip(config.levels, config.d_models)
            ]
        )
        self.regional = (
            RegionalLevel(self.levels[0].embed.in_features, config.regional, config.regional_bank_size)
            if config.regional else None
        )
        self.global_level = (
            GlobalLevel(self.levels[0].embed.in_features, config.global_bank_size) if config.global_bank_size else None
        )
        self.smoothing = GaussianSmoothing(config.smooth_sigma)

    @staticmethod
    def tokens(feature: torch.Tensor) -> torch.Tensor:
        """``[N, C, h, w]`` -> ``[N, h*w, C]`` row-major."""
        return feature.flatten(2).transpose(1, 2)

    def level_inputs(self, features: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Backbone maps (one per ``config.strides``) -> one ``[N, C_l, h_l, w_l]`` input per level.

        A level with several strides concatenates their maps on its finest grid (coarser maps
        bilinearly upsampled, ``align_corners=False``).
        """
        by_stride = dict(zip(self.config.strides, features))
        out = []
        for level in self.config.levels:
            grid = by_stride[level[0]].shape[-2:]
            parts = [by_stride[level[0]]] + [
                F.interpolate(by_stride[st], size=grid, mode="bilinear", align_corners=False) for st in level[1:]
            ]
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        return out

    def level_maps(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per level the patch-score map upsampled to the input size: ``[N, 1, H, W]`` float32 each."""
        size = (self.config.image_size, self.config.image_size)
        return [
            F.interpolate(level.patch_scores(self.tokens(f), self.config.score), size=size, mode="bilinear",
                          align_corners=True)
            for level, f in zip(self.levels, inputs)
        ]

    def fuse(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Combine the level maps (see :attr:`FODConfig.level_norm`), then smooth: ``[N, 1, H, W]``."""
        norm = self.config.level_norm
        if norm is None:
            fused = torch.stack(maps).mean(0)
        else:
            fused = torch.stack([torch.relu((m - mean) * (1.0 / std)) for m, (mean, std) in zip(maps, norm)]).mean(0)
        return self.smoothing(fused)

    def regional_map(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The regional level's distance map of the first level's input, upsampled: ``[N, 1, H, W]`` float32.

        Raises:
            RuntimeError: the model has no regional level (``config.regional`` 0).
        """
        if self.regional is None:
            raise RuntimeError("this FOD model has no regional level (regional 0)")
        size = (self.config.image_size, self.config.image_size)
        return F.interpolate(self.regional(inputs[0]), size=size, mode="bilinear", align_corners=True)

    def fused_map(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The map before the peak-relative step, from level inputs (:meth:`level_inputs`): ``[N, 1, H, W]``.

        With a measured regional level (``config.regional_norm``) it is ``a + r * exp(-a / REGIONAL_TAU)``:
        ``a`` the fused, smoothed level map (held-out z units) and ``r`` the regional map on the same scale
        (``relu((m - mean) / std)``, smoothed), so a region of odd texture lifts the map where the patches
        see nothing, and a sharp defect keeps its shape. Without one it is ``a``.
        """
        anomaly_map = self.fuse(self.level_maps(inputs))
        norm = self.config.regional_norm
        if self.regional is not None and norm is not None:
            mean, std = norm
            regional = self.smoothing(torch.relu((self.regional_map(inputs) - mean) * (1.0 / std)))
            anomaly_map = anomaly_map + regional * torch.exp(anomaly_map * (-1.0 / REGIONAL_TAU))
        return anomaly_map

    def global_lift(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The global level's lift ``relu((d - mean) / std)`` of each frame, from level inputs: ``[N]`` float32,
        in held-out standard deviations of the global distance ``d`` (:attr:`FODConfig.global_norm`).

        Raises:
            RuntimeError: the model has no measured global level.
        """
        norm = self.config.global_norm
        if self.global_level is None or norm is None:
            raise RuntimeError("this FOD model has no measured global level (global_bank_size 0 or global_norm None)")
        mean, std = norm
        return torch.relu((self.global_level(inputs[0]) - mean) * (1.0 / std))

    def maps_from_features(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scoring from level inputs (:meth:`level_inputs`) -> ``(anomaly_map [N,1,H,W], score [N])``:
        :meth:`fused_map` made peak-relative (:func:`peak_relative` with ``config.map_power`` and
        ``config.peak_floor``); the score is the maximum of the map.

        With a measured global level the map ``m`` (peak ``P``) becomes ``m * (1 + g / P)``, ``g`` the frame's
        :meth:`global_lift`: the peak rises by ``g``, every pixel in proportion, so the order of pixels within
        the frame and the map's shape are kept, and a frame whose whole surface is unlike every training
        frame scores higher (docs/results.md, fourteenth round: magnetic-tile image AUROC 0.965 -> 0.970 at
        the defaults, pixel AUROC and PRO kept). A frame whose map is all zeros (``P <= 1e-6``) becomes ``g``
        everywhere, so its score is still ``P + g``.
        """
        anomaly_map = peak_relative(self.fused_map(inputs), self.config.map_power, self.config.peak_floor)
        if self.global_level is not None and self.config.global_norm is not None:
            peak = anomaly_map.amax(dim=(1, 2, 3), keepdim=True)
            share = torch.where(peak > 1e-6, anomaly_map / peak.clamp_min(1e-6), torch.ones_like(anomaly_map))
            anomaly_map = anomaly_map + self.global_lift(inputs)[:, None, None, None] * share
        return anomaly_map, anomaly_map.amax(dim=(1, 2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See the class docstring."""
        return self.maps_from_features(self.level_inputs(self.backbone(images)))
