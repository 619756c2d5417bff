"""Per-frame intensity conditioning in the graph: flat-field correction and standardisation.

Parts on a line are lit and exposed differently from frame to frame (magnetic-tile's good images have
mean grey levels from 61 to 165 and standard deviations from 16 to 50). A frozen ImageNet backbone maps
that to different features, and a model of normal texture then has to cover every exposure, or rates
a darker part as anomalous. Conditioning each frame before the backbone removes the nuisance:

* flat-field correction (optional): divide by the frame's own Gaussian-blurred brightness, which
  removes slow illumination gradients and keeps texture, as a flat-field image does for a camera;
* standardisation: shift and scale the frame to a fixed mean and standard deviation (the training
  images' average, :func:`intensity_statistics`), then clip to 0..255.

Both work on all channels of a frame together, so colours keep their ratios. The kNN ceilings and the
FOD runs that chose this are in docs/results.md ("Fifth round").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fod.smoothing import GaussianSmoothing

FLAT_POOL = 4
"""The flat-field blur runs on a copy average-pooled by this factor (:class:`IntensityNorm`)."""


def standardize_intensity(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Shift and scale each frame to a target mean and standard deviation, then clip to 0..255.

    Args:
        x: ``[N, C, H, W]`` float32 pixel values (grey levels).
        mean: target mean in grey levels (0..255).
        std: target standard deviation in grey levels (> 0).

    Returns:
        ``[N, C, H, W]`` float32: ``clip((x - mu) * std / sqrt(var + 1) + mean, 0, 255)``, with ``mu`` and
        ``var`` the frame's mean and variance over all its pixels and channels. The ``+ 1`` floors the
        frame's standard deviation at one grey level, so a flat frame is not amplified into noise. In
        the graph: ReduceMean, Mul, Sqrt, Div, Clip.
    """
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    centred = x - mu
    var = (centred * centred).mean(dim=(1, 2, 3), keepdim=True)
    return (centred * (std / torch.sqrt(var + 1.0)) + mean).clamp(0.0, 255.0)


class IntensityNorm(nn.Module):
    """Flat-field correction (optional), then :func:`standardize_intensity`.

    Args:
        mean: target mean in grey levels, 0..255.
        std: target standard deviation in grey levels, > 0.
        flat_sigma: sigma in px of the Gaussian that estimates the illumination (0: no flat-field
            correction). The frame becomes ``x * mean(luma) / (blur(luma) + 1)``, ``luma`` the channel mean:
            the illumination divided out, the frame's average brightness kept (so the standardisation's
            one-grey-level floor keeps its meaning). The blur runs on a 4x4-average-pooled copy with
            sigma / 4 and is upsampled back bilinearly: the illumination is smooth at that scale, and a
            full-resolution 215-tap blur at 320 px cost about 15 ms of a 75 ms CPU frame. Frame height
            and width must be multiples of 4, and ``4 sigma / 4`` under a quarter of them.

    ``forward(x)``: ``[N, C, H, W]`` float32 grey levels -> the same shape, float32, in 0..255.
    The kernels are not in the ``state_dict``: they follow from ``flat_sigma``, which the config holds.
    """

    def __init__(self, mean: float, std: float, *, flat_sigma: float = 0.0) -> None:
        super().__init__()
        self.mean = float(mean)
        self.std = float(std)
        self.flat = GaussianSmoothing(flat_sigma / FLAT_POOL, persistent=False) if flat_sigma > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        if self.flat is not None:
            luma = x.mean(dim=1, keepdim=True)
            low = self.flat(F.avg_pool2d(luma, FLAT_POOL))
            light = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x * (luma.mean(dim=(2, 3), keepdim=True) / (light + 1.0))
        return standardize_intensity(x, self.mean, self.std)


def intensity_statistics(images: np.ndarray) -> tuple[float, float]:
    """The target of :func:`standardize_intensity` for a training set: its average frame.

    Args:
        images: ``[N, H, W, C]`` uint8 good images (N >= 1).

    Returns:
        ``(mean, std)`` in grey levels: the mean over the images of each image's mean and of each
        image's standard deviation (all pixels and channels of an image together), so standardised
        frames look like a typical training image, not like one extreme.
    """
    flat = images.reshape(len(images), -1)
    means = np.array([row.mean(dtype=np.float64) for row in flat])
    stds = np.array([row.std(dtype=np.float64) for row in flat])
    return float(means.mean()), float(stds.mean())
