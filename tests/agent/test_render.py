"""Mask and overlay rendering."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from agent.render import (
    MapScale,
    encode_jpeg,
    encode_png,
    frame_map,
    mask_image,
    overlay_image,
    resize_to_width,
)


def test_scale_is_half_at_threshold() -> None:
    scale = MapScale(low=0.0, threshold=0.2, high=1.0)
    assert scale.normalize(np.array([0.0, 0.1, 0.2, 0.6, 5.0])).tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])


def test_frame_map_pastes_rois_at_frame_resolution() -> None:
    roi_map = np.ones((4, 4), np.float32)
    out = frame_map((20, 30), [((10, 5, 8, 6), roi_map), ((0, 0, 2, 2), 2 * roi_map)])
    assert out.shape == (20, 30)
    assert out.dtype == np.float32
    assert out[5:11, 10:18].min() == 1.0
    assert out[0:2, 0:2].min() == 2.0
    assert out.sum() == pytest.approx(8 * 6 * 1.0 + 4 * 2.0)


def test_mask_png_round_trips_as_binary() -> None:
    amap = np.zeros((16, 16), np.float32)
    amap[4:8, 4:8] = 0.9
    png = encode_png(mask_image(amap, 0.5))
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None
    assert decoded.shape == (16, 16)
    assert set(np.unique(decoded).tolist()) == {0, 255}
    assert int(np.count_nonzero(decoded == 255)) == 16


def test_overlay_marks_the_anomaly_red_and_keeps_normal_pixels() -> None:
    frame = np.full((64, 64, 3), 128, np.uint8)
    amap = np.zeros((64, 64), np.float32)
    amap[20:40, 20:40] = 1.0
    out = overlay_image(frame, amap, MapScale(0.0, 0.5, 1.0), boxes=[("full", (0, 0, 64, 64), "NG")])
    assert out.shape == frame.shape
    assert out.dtype == np.uint8
    assert out[30, 30, 2] > out[30, 30, 0]  # hot region is red-ish
    assert (out[50, 50] == 128).all()  # zero anomaly: the frame shows through
    jpeg = encode_jpeg(out)
    assert jpeg[:2] == b"\xff\xd8"


def test_resize_to_width_keeps_aspect() -> None:
    assert resize_to_width(np.zeros((100, 200, 3), np.uint8), 50).shape == (25, 50, 3)
    assert resize_to_width(np.zeros((10, 20, 3), np.uint8), 50).shape == (10, 20, 3)
