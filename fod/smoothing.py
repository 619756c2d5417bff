"""Separable Gaussian blur in the graph: the anomaly map's smoothing and the input's flat field."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel_1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius ``int(4 sigma + 0.5)`` (scipy's truncate=4): 33 taps at sigma 4."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


class GaussianSmoothing(nn.Module):
    """Separable Gaussian blur of ``[N, 1, H, W]`` maps with mirror padding (ONNX Pad ``reflect``).

    The reference uses scipy's ``gaussian_filter`` whose ``reflect`` mode repeats the edge pixel;
    ONNX has no such pad mode, so the graph mirrors without repeating it. The difference is
    confined to the outer ``radius`` px and is far below the map's values there.

    Args:
        sigma: standard deviation in px (the kernel has ``2 * int(4 sigma + 0.5) + 1`` taps, which must
            be fewer than twice the map's height and width for the mirror padding).
        persistent: keep the kernels in the module's ``state_dict`` (True for the anomaly-map
            smoothing, whose checkpoints carry them).
    """

    kx: torch.Tensor
    ky: torch.Tensor

    def __init__(self, sigma: float, *, persistent: bool = True) -> None:
        super().__init__()
        k = gaussian_kernel_1d(sigma)
        self.radius = (k.numel() - 1) // 2
        self.register_buffer("kx", k.view(1, 1, 1, -1), persistent=persistent)
        self.register_buffer("ky", k.view(1, 1, -1, 1), persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]`` -> ``[N, 1, H, W]`` float32."""
        r = self.radius
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), self.kx)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), self.ky)
