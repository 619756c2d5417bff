"""SyntheticConveyor: determinism, shapes, exact ground truth of the defects."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fod_tools.demo.conveyor import DEFECT_KINDS, SyntheticConveyor


def _frames(conveyor: SyntheticConveyor, n: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        ok, frame = conveyor.read()
        assert ok
        out.append(frame)
    return out


def test_same_seed_same_frames_other_seed_other_frames():
    a = _frames(SyntheticConveyor(320, 240, seed=5), 40)
    b = _frames(SyntheticConveyor(320, 240, seed=5), 40)
    c = _frames(SyntheticConveyor(320, 240, seed=6), 40)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_frames_are_bgr_uint8_of_the_requested_size_and_move():
    conveyor = SyntheticConveyor(200, 120, seed=1)
    first, second = _frames(conveyor, 2)
    assert first.shape == (120, 200, 3)
    assert first.dtype == np.uint8
    assert first.flags.c_contiguous
    assert not np.array_equal(first, second)  # the belt moved
    assert conveyor.frames_read == 2
    assert conveyor.last_id == 1
    assert conveyor.get(cv2.CAP_PROP_FRAME_WIDTH) == 200
    assert conveyor.get(cv2.CAP_PROP_FRAME_HEIGHT) == 120


def test_release_ends_the_stream():
    conveyor = SyntheticConveyor(128, 96, seed=0)
    assert conveyor.read()[0]
    conveyor.release()
    ok, frame = conveyor.read()
    assert not ok
    assert frame.size == 0
    assert not conveyor.isOpened()


def test_defects_change_pixels_only_inside_their_ground_truth_boxes():
    # same seed, once with and once without the defects drawn: same parts, same belt, same noise
    kwargs = {"seed": 3, "defect_rate": 1.0}
    with_defects = SyntheticConveyor(320, 240, **kwargs)
    without = SyntheticConveyor(320, 240, draw_defects=False, **kwargs)
    frames_with_defect = 0
    for _ in range(120):
        _, a = with_defects.read()
        _, b = without.read()
        truth = with_defects.truth
        assert truth is not None
        assert without.truth == truth  # ground truth does not depend on drawing
        changed = np.any(a != b, axis=2)
        allowed = np.zeros_like(changed)
        for x0, y0, x1, y1 in truth.defect_boxes:
            allowed[y0:y1, x0:x1] = True
        assert not np.any(changed & ~allowed), "a defect changed pixels outside its ground-truth box"
        if truth.defective_in_view:
            frames_with_defect += 1
            # every defect that is mostly in view really changed pixels inside its box
            for part in truth.parts:
                for defect in part.defects:
                    if defect.visible_fraction >= 0.5:
                        x0, y0, x1, y1 = defect.box
                        assert changed[y0:y1, x0:x1].any(), defect
    assert frames_with_defect > 30


def test_good_conveyor_has_no_defect_in_view_and_draws_each_kind():
    good = SyntheticConveyor(256, 192, seed=2, defect_rate=0.0)
    for _ in range(80):
        good.read()
        assert good.truth is not None
        assert not good.truth.defective_in_view
        assert good.truth.defect_boxes == []
    seen: set[str] = set()
    bad = SyntheticConveyor(256, 192, seed=2, defect_rate=1.0, speed_px=24)
    for _ in range(150):
        bad.read()
        assert bad.truth is not None
        seen |= {d.kind for p in bad.truth.parts for d in p.defects}
    assert seen == set(DEFECT_KINDS)


def test_truth_at_looks_up_recent_frames():
    conveyor = SyntheticConveyor(160, 120, seed=4)
    _frames(conveyor, 5)
    assert conveyor.truth_at(4) == conveyor.truth
    assert conveyor.truth_at(0) is not None
    assert conveyor.truth_at(0).index == 0
    assert conveyor.truth_at(99) is None


def test_part_crops_shapes_and_defect_masks():
    conveyor = SyntheticConveyor(seed=0)
    good = conveyor.good_part_images(4, (64, 80))
    assert good.shape == (4, 64, 80, 3)
    assert good.dtype == np.uint8
    assert np.array_equal(good, conveyor.good_part_images(4, (64, 80)))  # deterministic
    images, masks, kinds = conveyor.defect_part_images(8, (96, 96))
    assert images.shape == (8, 96, 96, 3)
    assert masks.shape == (8, 96, 96)
    assert masks.dtype == bool
    assert kinds == list(DEFECT_KINDS) * 2
    assert all(m.any() for m in masks)  # each defect is visible at this size
    # a defect covers a small part of the crop, not the whole part
    assert float(masks.mean()) < 0.1


def test_good_frames_are_full_frames_without_defects():
    conveyor = SyntheticConveyor(160, 120, seed=9, defect_rate=1.0)
    frames = conveyor.good_frames(3, stride=5)
    assert frames.shape == (3, 120, 160, 3)
    assert len({f.tobytes() for f in frames}) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 32},  # too small
        {"defect_rate": 1.5},
        {"part_size": 0.05},
        {"defect_kinds": ["dent"]},
        {"fps": 0},
    ],
)
def test_bad_settings_raise_value_error_naming_the_setting(kwargs):
    with pytest.raises(ValueError, match="SyntheticConveyor"):
        SyntheticConveyor(**kwargs)


def test_trigger_mode_shows_each_part_once_centred():
    conveyor = SyntheticConveyor(320, 240, seed=8, trigger=True)
    seen = []
    for _ in range(6):
        conveyor.read()
        truth = conveyor.truth
        assert truth is not None
        centred = [p for p in truth.parts if abs((p.box[0] + p.box[2]) / 2 - 160) < 0.05 * 320]
        assert len(centred) == 1, truth  # exactly one part at the centre (1 % jitter, rotation skews its box)
        seen.append(centred[0].part_id)
    assert seen == sorted(seen)
    assert len(set(seen)) == 6  # a new part in every frame


def test_defective_in_a_box():
    conveyor = SyntheticConveyor(320, 240, seed=3, defect_rate=1.0, trigger=True)
    conveyor.read()
    truth = conveyor.truth
    assert truth is not None
    assert truth.defective_in((0, 0, 320, 240))
    x0, y0, x1, y1 = truth.defect_boxes[0]
    assert truth.defective_in((x0, y0, x1, y1), 1.0)
    assert not truth.defective_in((x1, y1, x1 + 5, y1 + 5))  # beside the defect
