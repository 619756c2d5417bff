"""Build steps: settings validation and progress (real), and the TensorRT calls they make (on the fake)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine_build.errors import EngineBuildError, TensorRTUnavailableError
from engine_build.runner import tensorrt_available
from engine_build.steps import (
    BuildProgress,
    BuildSettings,
    CreateConfig,
    EngineBytesFromNetwork,
    Heartbeat,
    NetworkFromOnnx,
    SaveEngine,
    make_progress_monitor,
    network_flags,
    profile_shapes,
)
from tests.engine_build import fake_trt

SIZE = (64, 64)


# ------------------------------------------------------------------------------------------ settings

# (keyword arguments, text the error must contain)
BAD_SETTINGS = [
    ({"precision": "bf16"}, "--precision 'bf16': choose one of fp32, fp16, int8"),
    ({"precision": "fp16", "max_batch": 0}, "--max-batch 0: must be at least 1"),
    (
        {"precision": "fp16", "max_batch": 2, "opt_batch": 3},
        "opt_batch 3: must be between 1 and --max-batch 2",
    ),
    ({"precision": "fp16", "workspace_mib": 0}, "--workspace-mib 0"),
    ({"precision": "fp16", "opt_level": 6}, "--opt-level 6: TensorRT accepts 0..5"),
    ({"precision": "fp16", "opt_level": -1}, "--opt-level -1"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_SETTINGS)
def test_bad_settings_name_the_option(kwargs, message):
    with pytest.raises(EngineBuildError) as info:
        BuildSettings(**kwargs)
    assert message in str(info.value)


def test_settings_defaults_dict_and_profile(tmp_path: Path):
    settings = BuildSettings(precision="int8", max_batch=8, timing_cache=tmp_path / "tc.bin")
    assert settings.profile_opt_batch == 1
    as_dict = settings.to_dict()
    assert as_dict == {
        "precision": "int8",
        "max_batch": 8,
        "opt_batch": 1,
        "workspace_mib": None,
        "opt_level": None,
        "timing_cache": str(tmp_path / "tc.bin"),
        "strongly_typed": True,
    }
    assert profile_shapes(settings, (48, 80)) == ((1, 48, 80, 3), (1, 48, 80, 3), (8, 48, 80, 3))
    assert profile_shapes(BuildSettings("fp16", max_batch=4, opt_batch=2), SIZE)[1] == (2, 64, 64, 3)


def test_network_flags_strongly_typed_when_the_flag_exists():
    trt10 = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1, EXPLICIT_BATCH=0))
    no_flag = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace())  # a TensorRT without the flag
    assert network_flags(trt10) == 2
    assert network_flags(trt10, strongly_typed=False) == 0
    assert network_flags(no_flag) == 0


# ------------------------------------------------------------------------------------------ progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_top_level_phases_and_describes_nesting(caplog: pytest.LogCaptureFixture):
    clock = FakeClock()
    progress = BuildProgress(clock=clock)
    caplog.set_level(logging.INFO, logger="engine_build.build")
    clock.now += 5
    progress.phase_start("Building engine", None, 3)
    progress.phase_start("Tactic selection", "Building engine", 40)
    progress.step_complete("Tactic selection", 11)
    assert progress.describe() == (
        "building the engine: 5 s elapsed; Building engine (0/3) > Tactic selection (12/40)"
    )
    clock.now += 30
    progress.phase_finish("Tactic selection")
    progress.phase_finish("Building engine")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "TensorRT: Building engine (3 steps) started at 5 s",
        "TensorRT: Building engine done in 30.0 s (35 s elapsed)",
    ]
    assert progress.describe() == "building the engine: 35 s elapsed; working"
    progress.restart()
    assert progress.elapsed_s == 0


def test_heartbeat_logs_from_its_thread_until_stopped(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="engine_build.build")
    progress = BuildProgress()
    with Heartbeat(progress, interval_s=0.01) as beat:
        deadline = time.monotonic() + 10
        while beat.beats < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
    stopped_at = beat.beats
    assert stopped_at >= 2
    assert any("building the engine:" in r.getMessage() for r in caplog.records)
    time.sleep(0.05)
    assert beat.beats == stopped_at  # the thread is gone
    with pytest.raises(EngineBuildError, match="must be > 0"):
        Heartbeat(progress, interval_s=0)


# ------------------------------------------------------------------------------------ without TensorRT


@pytest.mark.skipif(tensorrt_available()[0], reason="TensorRT is installed here")
def test_steps_need_tensorrt(toy_package: Path):
    with pytest.raises(TensorRTUnavailableError, match="parsing ONNX for TensorRT needs the TensorRT Python"):
        NetworkFromOnnx(toy_package / "model.onnx")()


def test_save_engine_is_atomic_and_accepts_a_step(tmp_path: Path):
    out = SaveEngine(b"plan-1", tmp_path / "sub" / "a.engine")()
    assert out.read_bytes() == b"plan-1"
    SaveEngine(lambda: b"plan-2", out)()
    assert out.read_bytes() == b"plan-2"
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.engine"]  # no .part left


# ----------------------------------------------- TensorRT calls, on the fake of fake_trt.py (plumbing)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> fake_trt.FakeState:
    return fake_trt.install(monkeypatch)


def test_network_from_onnx_is_strongly_typed(fake, toy_package: Path):
    parsed = NetworkFromOnnx(toy_package / "model.onnx")()
    assert parsed.network.flags == 2  # 1 << STRONGLY_TYPED
    assert parsed.network.get_input(0).name == "image"
    with pytest.raises(EngineBuildError, match="ONNX file not found"):
        NetworkFromOnnx(toy_package / "missing.onnx")()


def test_create_config_applies_every_setting(fake, toy_package: Path, tmp_path: Path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    settings = BuildSettings(
        "fp16", max_batch=4, opt_batch=2, workspace_mib=256, opt_level=5, timing_cache=cache
    )
    parsed = NetworkFromOnnx(toy_package / "model.onnx")()
    progress = BuildProgress()
    step = CreateConfig(settings, SIZE, progress=progress)
    config = step(parsed.builder, parsed.network)
    assert ("set_memory_pool_limit", "WORKSPACE", 256 * 2**20) in fake.calls
    assert config.builder_optimization_level == 5
    assert config.profiles[0].shapes["image"] == [[1, 64, 64, 3], [2, 64, 64, 3], [4, 64, 64, 3]]
    assert config.cache.data == b"old"  # loaded from the file
    assert config.progress_monitor is step.monitor is not None


def test_create_config_leaves_defaults_alone(fake, toy_package: Path):
    parsed = NetworkFromOnnx(toy_package / "model.onnx")()
    config = CreateConfig(BuildSettings("fp32"), SIZE)(parsed.builder, parsed.network)
    assert not [c for c in fake.calls if c[0] == "set_memory_pool_limit"]
    assert config.builder_optimization_level == 3
    assert config.cache is None
    assert config.progress_monitor is None


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("input", (-1, 64, 64, 3), "the ONNX graph has inputs \\['input'\\], not 'image'"),
        ("image", (-1, 32, 32, 3), r"has shape \[-1, 32, 32, 3\], expected \[N, 64, 64, 3\]"),
        ("image", (-1, 3, 64, 64), "re-export the package"),  # NCHW graph
    ],
)
def test_create_config_checks_the_graph_input(fake, name, shape, message):
    import tensorrt  # the fake

    tensor = SimpleNamespace(name=name, shape=shape)
    network = SimpleNamespace(num_inputs=1, get_input=lambda i: tensor)
    with pytest.raises(EngineBuildError, match=message):
        CreateConfig(BuildSettings("fp32"), SIZE)(tensorrt.Builder(None), network)


def test_engine_bytes_builds_with_progress_and_saves_timing_cache(
    fake, toy_package: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="engine_build.build")
    cache = tmp_path / "timing.cache"
    settings = BuildSettings("fp32", max_batch=2, timing_cache=cache)
    progress = BuildProgress()
    plan = EngineBytesFromNetwork(
        NetworkFromOnnx(toy_package / "model.onnx"),
        CreateConfig(settings, SIZE, progress=progress),
        progress=progress,
        timing_cache=cache,
    )()
    assert b'"profile"' in plan
    assert cache.read_bytes() == b"+tuned"  # new cache, serialised after the build
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "TensorRT: Building (2 steps) started" in messages
    assert "engine built in" in messages


def test_engine_bytes_failure_says_what_to_try(fake, toy_package: Path):
    fake.fail_build = True
    step = EngineBytesFromNetwork(
        NetworkFromOnnx(toy_package / "model.onnx"), CreateConfig(BuildSettings("fp32"), SIZE)
    )
    with pytest.raises(
        EngineBuildError, match=r"could not build the engine .* lower --max-batch or --workspace-mib"
    ):
        step()


def test_progress_monitor_forwards_and_never_cancels(fake):
    progress = BuildProgress()
    monitor = make_progress_monitor(progress)
    monitor.phase_start("Build", "", 4)  # TensorRT may pass "" for no parent
    assert monitor.step_complete("Build", 1) is True
    assert "Build (2/4)" in progress.describe()
    monitor.phase_finish("Build")
    assert "working" in progress.describe()
