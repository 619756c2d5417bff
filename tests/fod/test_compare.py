"""The one comparator of two runners' outputs (fod/compare.py): one definition of each error."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fod.compare import OutputComparator, compare_outputs
from fod.errors import InputError

REF_S = np.array([1.0, 2.0, 4.0], np.float32)
STEP = np.array([0, 1, 0], np.float32)
REF_M = np.stack([np.full((1, 2, 2), v, np.float32) for v in (1.0, 2.0, 4.0)])


@pytest.mark.parametrize(
    ("cand_s", "cand_m", "expected"),
    [
        # identical outputs: every error 0
        (REF_S, REF_M, {"score_max_rel_err": 0.0, "map_max_rel_err": 0.0, "map_mean_rel_err": 0.0}),
        # one score off by 1: abs 1, relative to max |ref| = 4; worst image 1
        (REF_S + STEP, REF_M, {"score_max_abs_err": 1.0, "score_max_rel_err": 0.25, "worst_image": 1}),
        # one pixel off by 2: max 2/4, mean (2/12)/4
        (REF_S, REF_M + np.eye(12, dtype=np.float32)[0].reshape(3, 1, 2, 2) * 2,
         {"map_max_rel_err": 0.5, "map_mean_rel_err": pytest.approx(2 / 12 / 4)}),
        # a NaN score: infinite error, counted
        (np.array([1.0, np.nan, 4.0]), REF_M, {"score_max_rel_err": math.inf, "nonfinite_scores": 1}),
        # a NaN pixel: infinite map errors, counted
        (REF_S, np.where(np.arange(12).reshape(3, 1, 2, 2) == 5, np.nan, REF_M),
         {"map_max_rel_err": math.inf, "map_mean_rel_err": math.inf, "nonfinite_map_values": 1}),
    ],
)
def test_errors_table(cand_s, cand_m, expected) -> None:
    errors = compare_outputs(REF_S, REF_M, cand_s, cand_m)
    for key, value in expected.items():
        assert getattr(errors, key) == value, key


def test_zero_reference_scale() -> None:
    zeros = np.zeros(2, np.float32)
    maps = np.zeros((2, 1, 2, 2), np.float32)
    assert compare_outputs(zeros, maps, zeros, maps).score_max_rel_err == 0.0
    assert compare_outputs(zeros, maps, zeros + 1, maps).score_max_rel_err == math.inf


def test_streaming_equals_one_shot() -> None:
    rng = np.random.default_rng(0)
    cand_s = REF_S + rng.normal(0, 0.1, 3).astype(np.float32)
    cand_m = REF_M + rng.normal(0, 0.1, REF_M.shape).astype(np.float32)
    comparator = OutputComparator()
    for i in range(3):
        comparator.add(REF_S[i : i + 1], REF_M[i : i + 1], cand_s[i : i + 1], cand_m[i : i + 1])
    streamed, whole = comparator.result(), compare_outputs(REF_S, REF_M, cand_s, cand_m)
    assert streamed.worst_image == whole.worst_image
    for key in ("score_max_rel_err", "map_max_rel_err", "map_mean_rel_err"):
        assert getattr(streamed, key) == pytest.approx(getattr(whole, key))


def test_shapes_must_match() -> None:
    with pytest.raises(InputError, match="shape"):
        compare_outputs(REF_S, REF_M, REF_S[:2], REF_M[:2])
