"""TensorRTRunner: availability without TensorRT (real), and its buffer plumbing on the fake of fake_trt.py.

The fake executes "engines" with ONNX Runtime, so these tests check our batching, buffer views, copies,
CUDA-context handling and release on deactivate, not TensorRT itself (see tests/engine_build/test_gpu.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from engine_build.errors import EngineMismatchError, TensorRTUnavailableError
from engine_build.parity import compare_runners, synthetic_frames
from engine_build.runner import TensorRTRunner, batch_slices, tensorrt_available
from fod.preprocess import to_model_input
from fod.runner import OnnxRuntimeRunner
from tests.engine_build import fake_trt
from tests.engine_build.helpers import RUNTIME, copy_package, fake_engine

SIZE = (64, 64)
TRT_PRESENT = tensorrt_available()[0]


@pytest.mark.skipif(TRT_PRESENT, reason="TensorRT and a GPU are present: covered by test_gpu.py")
def test_unavailable_here_says_why_and_never_raises():
    ok, reason = tensorrt_available()
    assert ok is False
    assert "TensorRT" in reason
    assert "python3-libnvinfer" in reason
    assert "pip install '.[cpu,tensorrt]'" in reason


@pytest.mark.skipif(TRT_PRESENT, reason="TensorRT and a GPU are present")
def test_activate_without_tensorrt_raises_and_holds_nothing(tmp_path: Path):
    runner = TensorRTRunner(tmp_path / "model.fp16.engine", SIZE)
    with pytest.raises(TensorRTUnavailableError, match="How to install it"):
        runner.activate()
    assert not runner.is_active
    assert runner.released


@pytest.mark.parametrize(
    ("n", "max_batch", "expected"),
    [
        (1, 4, [(0, 1)]),
        (4, 4, [(0, 4)]),
        (7, 3, [(0, 3), (3, 6), (6, 7)]),  # last chunk smaller
        (0, 2, []),
    ],
)
def test_batch_slices(n, max_batch, expected):
    assert batch_slices(n, max_batch) == expected


def test_batch_slices_rejects_zero():
    with pytest.raises(Exception, match="at least 1"):
        batch_slices(3, 0)


# ------------------------------------------------------------------------------ on the fake (plumbing)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> fake_trt.FakeState:
    return fake_trt.install(monkeypatch)


@pytest.fixture
def pkg(toy_package: Path, tmp_path: Path) -> Path:
    return copy_package(toy_package, tmp_path / "pkg")


def fake_plan(pkg: Path, max_batch: int = 3, offset: float = 0.0) -> bytes:
    shape = [[1, 64, 64, 3], [1, 64, 64, 3], [max_batch, 64, 64, 3]]
    return json.dumps({"onnx": str(pkg / "model.onnx"), "profile": shape, "offset": offset}).encode()


def test_infer_chunks_copies_and_matches_onnxruntime(fake, pkg: Path):
    engine = fake_engine(pkg, content=fake_plan(pkg, max_batch=3), runtime=RUNTIME)
    frames = synthetic_frames(SIZE, 7)
    with OnnxRuntimeRunner(pkg / "model.onnx", SIZE) as ref:
        expected = ref.infer(frames)
    runner = TensorRTRunner(engine, SIZE)
    with runner:
        assert runner.max_batch == 3
        assert runner.manifest is not None
        out = runner.infer(frames)
        first_map = out.anomaly_map.copy()
        runner.infer(255 - frames[:2])  # reuses the page-locked buffers
    assert fake.executions == [3, 3, 1, 2]
    np.testing.assert_allclose(out.score, expected.score, rtol=1e-6)
    np.testing.assert_allclose(out.anomaly_map, expected.anomaly_map, rtol=1e-6)
    np.testing.assert_array_equal(out.anomaly_map, first_map)  # results are copies, not buffer views
    assert out.anomaly_map.dtype == np.float32
    assert out.anomaly_map.shape == (7, 1, 64, 64)


def test_deactivate_releases_everything(fake, pkg: Path):
    engine = fake_engine(pkg, content=fake_plan(pkg), runtime=RUNTIME)
    runner = TensorRTRunner(engine, SIZE)
    runner.activate()
    assert not runner.released
    assert len(fake.memory) == 3
    assert fake.pinned == 3
    runner.deactivate()
    assert runner.released
    assert not runner.is_active
    assert fake.memory == {}
    assert fake.freed == 3
    assert fake.ctx_depth == 0
    assert fake.ctx_retained == fake.ctx_detached == 1
    runner.deactivate()  # idempotent
    assert fake.ctx_detached == 1


def test_backend_interface_predictor_and_other_thread(fake, pkg: Path):
    engine = fake_engine(pkg, content=fake_plan(pkg), runtime=RUNTIME)
    with TensorRTRunner(engine, SIZE) as runner:
        frame = np.full((90, 120, 3), 128, np.uint8)
        frame[10:30, 10:30] = 255
        prediction = runner.infer(to_model_input(frame, SIZE)[None])
        assert prediction.anomaly_map.shape == (1, 1, *SIZE)
        assert float(prediction.score[0]) == pytest.approx(127 / 128, abs=1e-3)
        results = []
        worker = threading.Thread(target=lambda: results.append(runner.infer(synthetic_frames(SIZE, 2))))
        worker.start()
        worker.join()
        assert results[0].score.shape == (2,)
    assert fake.ctx_depth == 0


def test_mismatched_engine_is_refused_before_touching_the_gpu(monkeypatch: pytest.MonkeyPatch, pkg: Path):
    fake = fake_trt.install(monkeypatch, fake_trt.FakeState(version="10.4.0"))
    engine = fake_engine(pkg, content=fake_plan(pkg), runtime=RUNTIME)  # built with 10.3.0
    runner = TensorRTRunner(engine, SIZE)
    with pytest.raises(EngineMismatchError, match=r"engine built with 10\.3\.0, this box runs 10\.4\.0"):
        runner.activate()
    assert runner.released
    assert fake.ctx_retained == 0


@pytest.mark.parametrize(
    ("content", "size", "message"),
    [
        (b"\x00garbage", SIZE, "cannot deserialise this engine"),  # corrupt plan
        (None, (32, 32), r"engine input accepts \[1, 64, 64, 3\]"),  # engine for another input size
    ],
)
def test_bad_engine_releases_what_it_took(fake, pkg: Path, content, size, message):
    engine = pkg / "model.fp32.engine"
    engine.write_bytes(content or fake_plan(pkg))
    runner = TensorRTRunner(engine, size, verify=False)
    with pytest.raises(EngineMismatchError, match=message):
        runner.activate()
    assert runner.released
    assert not runner.is_active
    assert fake.ctx_depth == 0
    assert fake.ctx_retained == fake.ctx_detached == 1
    assert fake.memory == {}


def test_parity_with_onnxruntime_through_runners(fake, pkg: Path):
    good = fake_engine(pkg, content=fake_plan(pkg), runtime=RUNTIME)
    frames = synthetic_frames(SIZE, 5)
    report = compare_runners(
        OnnxRuntimeRunner(pkg / "model.onnx", SIZE),
        TensorRTRunner(good, SIZE),
        frames,
        precision="fp32",
        batch_size=3,
    )
    assert report.passed
    assert report.candidate == "tensorrt"
    bad = fake_engine(pkg, content=fake_plan(pkg, offset=0.05), runtime=RUNTIME)
    report = compare_runners(
        OnnxRuntimeRunner(pkg / "model.onnx", SIZE),
        TensorRTRunner(bad, SIZE),
        frames,
        precision="fp32",
        batch_size=3,
    )
    assert not report.passed


def test_tensorrt_8_is_refused_with_upgrade_hint(monkeypatch: pytest.MonkeyPatch):
    fake_trt.install(monkeypatch, fake_trt.FakeState(version="8.6.2"))  # JetPack 6.0's TensorRT
    ok, reason = tensorrt_available()
    assert ok is False
    assert "needs TensorRT 10 or newer" in reason
    assert "found 8.6.2" in reason
    assert "JetPack 6.1" in reason


def test_fake_box_is_reported_available(fake):
    assert tensorrt_available() == (True, "TensorRT 10.3.0, GPU Orin (compute 8.7)")


def test_import_needs_neither_tensorrt_nor_pycuda():
    code = (
        "import sys, engine_build, engine_build.cli; "
        "print(sorted(m for m in ('tensorrt', 'pycuda', 'onnxruntime', 'torch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
