"""Pictures of a scored frame: the binary mask (PNG) and the heatmap overlay (JPEG), with OpenCV.

Anomaly maps come from the model at model resolution, one per ROI; :func:`frame_map` pastes them
back at frame resolution. The heatmap colour of a pixel uses the same piecewise-linear scale as the
normalised score (:class:`MapScale`: ``low -> 0``, ``threshold -> 0.5``, ``high -> 1``), so red
regions are the ones above the pixel threshold whatever the model's raw units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from fod.normalization import normalize_values

Box = tuple[int, int, int, int]
"""``(x, y, width, height)`` in frame px."""


@dataclass(frozen=True)
class MapScale:
    """How raw anomaly-map values become colours.

    Attributes:
        low: raw value shown as 0 (dark blue).
        threshold: raw pixel threshold, shown as 0.5; pixels at or above it are in the mask.
        high: raw value shown as 1 (dark red).
    """

    low: float
    threshold: float
    high: float

    def normalize(self, values: np.ndarray) -> np.ndarray:
        """Map raw values to [0, 1], 0.5 at the threshold.

        Args:
            values: float array of any shape.

        Returns:
            float32 array of the same shape.
        """
        return normalize_values(values, low=self.low, threshold=self.threshold, high=self.high).astype(np.float32)


def frame_map(shape_hw: tuple[int, int], parts: Sequence[tuple[Box, np.ndarray]]) -> np.ndarray:
    """Paste per-ROI anomaly maps into one map at frame resolution.

    Args:
        shape_hw: ``(H, W)`` of the frame in px.
        parts: ``(box, map)`` per ROI, ``map`` ``[h, w]`` float32 at any resolution; it is resized
            to the box. Overlapping ROIs keep the larger value.

    Returns:
        ``[H, W]`` float32; 0 outside every ROI.
    """
    height, width = shape_hw
    out = np.zeros((height, width), np.float32)
    for (x, y, w, h), amap in parts:
        if w <= 0 or h <= 0:
            continue
        resized = amap if amap.shape == (h, w) else cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
        region = out[y : y + h, x : x + w]
        np.maximum(region, resized[: region.shape[0], : region.shape[1]], out=region)
    return out


def mask_image(amap: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """Binary mask of an anomaly map.

    Args:
        amap: ``[H, W]`` float32 raw anomaly map.
        pixel_threshold: raw value at or above which a pixel is anomalous.

    Returns:
        ``[H, W]`` uint8, 255 for anomalous pixels, 0 elsewhere.
    """
    return np.where(amap >= pixel_threshold, np.uint8(255), np.uint8(0))


def overlay_image(
    frame: np.ndarray,
    amap: np.ndarray,
    scale: MapScale,
    *,
    boxes: Sequence[tuple[str, Box, str]] = (),
    max_alpha: float = 0.6,
) -> np.ndarray:
    """Heatmap over the frame, mask outline in red, ROI boxes with their verdict.

    Args:
        frame: ``[H, W, 3]`` uint8 BGR.
        amap: ``[H, W]`` float32 raw anomaly map at frame resolution.
        scale: colour scale.
        boxes: ``(label, box, verdict)`` per ROI; NG boxes are drawn red, OK boxes green.
        max_alpha: heatmap opacity at normalised value 1; opacity grows with the value so that
            normal regions stay visible.

    Returns:
        ``[H, W, 3]`` uint8 BGR.
    """
    norm = scale.normalize(amap)
    colours = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (norm * max_alpha)[..., None]
    out = (frame.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).astype(np.uint8)
    mask = mask_image(amap, scale.threshold)
    if mask.any():
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 0, 255), 2)
    for label, (x, y, w, h), verdict in boxes:
        colour = (0, 0, 255) if verdict == "NG" else (0, 200, 0)
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), colour, 2)
        cv2.putText(out, f"{label} {verdict}", (x + 4, y + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, colour, 2)
    return out


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (``[H, W]`` or ``[H, W, 3]`` BGR).

    Raises:
        ValueError: OpenCV cannot encode it.
    """
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"cannot PNG-encode an image of shape {image.shape} and dtype {image.dtype}")
    return data.tobytes()


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of a uint8 BGR image.

    Args:
        image: ``[H, W, 3]`` uint8 BGR.
        quality: JPEG quality 1-100.

    Raises:
        ValueError: OpenCV cannot encode it.
    """
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"cannot JPEG-encode an image of shape {image.shape} and dtype {image.dtype}")
    return data.tobytes()


def resize_to_width(image: np.ndarray, width_px: int) -> np.ndarray:
    """Shrink an image to ``width_px`` wide, aspect kept (never enlarges).

    Args:
        image: ``[H, W, C]`` or ``[H, W]``.
        width_px: target width in px.
    """
    height, width = image.shape[:2]
    if width <= width_px:
        return image
    new_h = max(1, round(height * width_px / width))
    return cv2.resize(image, (width_px, new_h), interpolation=cv2.INTER_AREA)
