"""Write a synthetic MVTec-layout test set from the demo conveyor (generated, so it may be shipped).

Usage: ``python benchmarks/demo_results_set.py OUT_DIR``, then ``fod eval --model PKG --data OUT_DIR --grid X.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from fod_tools.demo.conveyor import SyntheticConveyor


def main(root: Path) -> None:
    """Write 30 good and 40 defective 256 px parts with masks under ``root``."""
    conveyor = SyntheticConveyor(seed=777)
    (root / "test" / "good").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(conveyor.good_part_images(30, (256, 256), seed=4242)):
        cv2.imwrite(str(root / "test" / "good" / f"{i:03d}.png"), image)
    images, masks, kinds = conveyor.defect_part_images(40, (256, 256))
    for i, (image, mask, kind) in enumerate(zip(images, masks, kinds)):
        (root / "test" / kind).mkdir(parents=True, exist_ok=True)
        (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "test" / kind / f"{i:03d}.png"), image)
        cv2.imwrite(str(root / "ground_truth" / kind / f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
