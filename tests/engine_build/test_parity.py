"""Parity check on real ONNX Runtime sessions: same model passes, a perturbed model fails."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from engine_build.errors import EngineBuildError
from engine_build.parity import (
    TOLERANCES,
    ParityTolerance,
    compare_outputs,
    compare_runners,
    load_frames,
    run_batched,
    synthetic_frames,
)
from fod.runner import OnnxRuntimeRunner
from tests.engine_build.helpers import copy_package, perturb_toy_onnx

SIZE = (64, 64)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return synthetic_frames(SIZE, 8, seed=1)


def ort(path: Path) -> OnnxRuntimeRunner:
    return OnnxRuntimeRunner(path, SIZE, providers=["CPUExecutionProvider"], intra_op_threads=1)


def test_same_model_passes_every_precision(toy_package: Path, frames: np.ndarray):
    for precision in ("fp32", "fp16", "int8"):
        report = compare_runners(
            ort(toy_package / "model.onnx"),
            ort(toy_package / "model.onnx"),
            frames,
            precision=precision,
            batch_size=3,
        )
        assert report.passed, report.summary()
        assert report.score_max_rel_err == 0.0
        assert report.map_max_rel_err == 0.0
        assert report.n_images == 8
        assert report.tolerance == TOLERANCES[precision]


def test_perturbed_model_fails_and_says_why(toy_package: Path, tmp_path: Path, frames: np.ndarray):
    other = copy_package(toy_package, tmp_path / "pkg")
    perturb_toy_onnx(other / "model.onnx", center=120.0)  # |x-120|/120 instead of |x-128|/128
    report = compare_runners(
        ort(toy_package / "model.onnx"), ort(other / "model.onnx"), frames, precision="fp16"
    )
    assert not report.passed
    assert any(f.startswith("map max relative error") for f in report.failures)
    assert report.map_max_rel_err > TOLERANCES["fp16"].map_max_rel
    assert "FAILED" in report.summary()
    as_dict = report.to_dict()
    assert as_dict["passed"] is False
    assert as_dict["tolerance"]["score_rel"] == TOLERANCES["fp16"].score_rel


def test_runner_state_is_restored(toy_package: Path, frames: np.ndarray):
    active, idle = ort(toy_package / "model.onnx"), ort(toy_package / "model.onnx")
    active.activate()
    compare_runners(active, idle, frames[:2])
    assert active.is_active
    assert not idle.is_active
    active.deactivate()


def test_results_do_not_depend_on_batching(toy_package: Path, frames: np.ndarray):
    with ort(toy_package / "model.onnx") as runner:
        whole = run_batched(runner, frames)
        split = run_batched(runner, frames, batch_size=3)  # 3 + 3 + 2
    np.testing.assert_array_equal(whole[0], split[0])
    np.testing.assert_array_equal(whole[1], split[1])
    assert split[1].shape == (8, 1, 64, 64)
    assert split[0].dtype == np.float32


# table of compare_outputs edge cases: (candidate scores, candidate map offset, expected pass, failure text)
EDGES = [
    ([1.0, 2.0], 0.0, True, None),  # identical
    ([1.0, 2.0 * 1.005], 0.0, True, None),  # 0.5% score error < 1% fp32 limit
    ([1.0, 2.0 * 1.05], 0.0, False, "score relative error"),  # 5% > 1%
    ([1.0, float("nan")], 0.0, False, "NaN or infinite"),  # broken engine output
    ([1.0, 2.0], 0.1, False, "map mean relative error"),  # every pixel off by 10% of the map range
]


@pytest.mark.parametrize(("cand_scores", "map_offset", "passed", "failure"), EDGES)
def test_compare_outputs_table(cand_scores, map_offset, passed, failure):
    ref_maps = np.linspace(0, 1, 2 * 16, dtype=np.float32).reshape(2, 1, 4, 4)
    report = compare_outputs(
        np.array([1.0, 2.0], np.float32), ref_maps, np.array(cand_scores, np.float32), ref_maps + map_offset
    )
    assert report.passed is passed
    if failure:
        assert any(failure in f for f in report.failures), report.failures


def test_compare_outputs_zero_reference_and_shapes():
    zeros = np.zeros((1, 1, 2, 2), np.float32)
    same = compare_outputs(np.zeros(1, np.float32), zeros, np.zeros(1, np.float32), zeros)
    assert same.passed  # all-zero reference: no division by zero
    off = compare_outputs(np.zeros(1, np.float32), zeros, np.ones(1, np.float32), zeros)
    assert not off.passed
    assert off.score_max_rel_err == float("inf")
    with pytest.raises(EngineBuildError, match="output shapes differ"):
        compare_outputs(np.zeros(2, np.float32), zeros, np.zeros(1, np.float32), zeros)
    with pytest.raises(EngineBuildError, match="no parity tolerance for precision 'bf16'"):
        compare_outputs(np.zeros(1, np.float32), zeros, np.zeros(1, np.float32), zeros, precision="bf16")
    loose = ParityTolerance(score_rel=2.0, map_max_rel=1.0, map_mean_rel=1.0)
    assert compare_outputs(
        np.ones(1, np.float32), zeros, np.zeros(1, np.float32), zeros, tolerance=loose
    ).passed


def test_compare_runners_rejects_empty_batch(toy_package: Path):
    with pytest.raises(EngineBuildError, match="non-empty"):
        compare_runners(
            ort(toy_package / "model.onnx"),
            ort(toy_package / "model.onnx"),
            np.zeros((0, 64, 64, 3), np.uint8),
        )


def test_synthetic_frames_are_deterministic_and_varied():
    a, b = synthetic_frames((48, 80), 6, seed=3), synthetic_frames((48, 80), 6, seed=3)
    assert a.shape == (6, 48, 80, 3)
    assert a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert len({frame.tobytes() for frame in a}) == 6
    assert a[1:].std() > 10  # noise and blobs, not flat grey


def test_load_frames_resizes_and_sorts(tmp_path: Path):
    for i, name in enumerate(["b.png", "a.jpg", "notes.txt"]):
        if name.endswith(".txt"):
            (tmp_path / name).write_text("x")
        else:
            cv2.imwrite(str(tmp_path / name), np.full((30, 50, 3), 40 * (i + 1), np.uint8))
    frames = load_frames(tmp_path, SIZE)
    assert frames.shape == (2, 64, 64, 3)
    assert frames[0].mean() == pytest.approx(80, abs=3)  # a.jpg first
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineBuildError, match=r"no \.png"):
        load_frames(tmp_path / "empty", SIZE)
    with pytest.raises(EngineBuildError, match="not a folder"):
        load_frames(tmp_path / "missing", SIZE)
