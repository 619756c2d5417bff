"""``fod bench``, model part: real ONNX Runtime sessions (and PyTorch eager on the tiny FOD run).

Speed is not asserted (no timed tests): the checks are the report's structure, that every number
is finite and positive, and the arithmetic of the summaries and ratios. The agent part runs in
tests/fod_tools/bench/test_agent.py against a real mosquitto.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fod.cli import main
from fod.errors import InputError
from fod.package import ModelPackage, sha256_file
from fod.runner import OnnxRuntimeRunner
from fod.timing import summarize_times, time_runners
from fod_tools.bench.models import format_report, latency_ratios, machine_info

TIMING_KEYS = {"batch", "calls", "p50_ms", "p95_ms", "mean_ms", "min_ms", "max_ms", "per_frame_ms", "frames_per_s"}


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def run_bench(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "bench.json"
    rc = main(["bench", *args, "--json", str(out)])
    return rc, json.loads(out.read_text())


def with_variant(toy_package: Path, tmp_path: Path) -> Path:
    """A copy of the toy package with the FP32 graph also registered as ``model.int8.onnx``."""
    pkg_dir = tmp_path / "pkg"
    shutil.copytree(toy_package, pkg_dir)
    shutil.copy(pkg_dir / "model.onnx", pkg_dir / "model.int8.onnx")
    package = ModelPackage(pkg_dir)
    package.add_file("model.int8.onnx")
    package.save()
    assert ModelPackage(pkg_dir).manifest.files["model.int8.onnx"] == sha256_file(pkg_dir / "model.int8.onnx")
    return pkg_dir


def test_quick_json_model_part(toy_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pkg = with_variant(toy_package, tmp_path)
    rc, report = run_bench(tmp_path, "--model", str(pkg), "--quick", "--no-agent", "--batch", "4")
    assert rc == 0
    assert report["schema_version"] == 1
    assert {"machine", "package", "settings", "model", "created_utc"} <= set(report)
    assert "agent" not in report
    machine = report["machine"]
    assert machine["cores"] >= 1
    assert machine["cpu"]
    assert machine["ram_gib"] is None or machine["ram_gib"] > 0
    assert machine["versions"]["onnxruntime"]
    assert "CPUExecutionProvider" in machine["onnxruntime_providers"]
    assert report["package"]["image_size"] == [64, 64]
    assert set(report["package"]["variants_mb"]) == {"fp32", "int8"}
    assert report["settings"]["quick"] is True
    assert report["settings"]["batch"] == 4

    results = report["model"]["results"]
    # fp32 and int8 through ONNX Runtime, at batch 1 and 4
    assert {(r["backend"], r["precision"], r["batch"]) for r in results} == {
        ("onnxruntime", p, b) for p in ("fp32", "int8") for b in (1, 4)
    }
    for r in results:
        assert TIMING_KEYS <= set(r)
        assert r["calls"] == report["settings"]["repeats"]
        for key in TIMING_KEYS - {"batch", "calls"}:
            assert positive(r[key]), (key, r)
        assert r["min_ms"] <= r["p50_ms"] <= r["p95_ms"] <= r["max_ms"]
        assert r["detail"]["providers"][0] == "CPUExecutionProvider"
    ratios = report["model"]["ratios"]
    assert {(r["comparison"], r["batch"]) for r in ratios} == {
        ("onnxruntime int8 / onnxruntime fp32", 1),
        ("onnxruntime int8 / onnxruntime fp32", 4),
    }
    for r in ratios:
        assert positive(r["latency_ratio"])
        assert positive(r["speedup"])
    skipped = {(s["backend"], s["precision"]) for s in report["model"]["skipped"]}
    assert ("onnxruntime", "fp16") in skipped  # no model.fp16.onnx
    assert any(b == "tensorrt" for b, _ in skipped)  # no TensorRT on a test machine

    printed = capsys.readouterr().out
    assert "| onnxruntime" in printed
    assert "int8" in printed
    assert "onnxruntime int8 / onnxruntime fp32" in printed


def test_variant_that_cannot_load_is_skipped(toy_package: Path, tmp_path: Path) -> None:
    pkg_dir = tmp_path / "pkg"
    shutil.copytree(toy_package, pkg_dir)
    (pkg_dir / "model.fp16.onnx").write_bytes(b"not an onnx graph")
    ModelPackage(pkg_dir).add_file("model.fp16.onnx")  # hash recorded: the package validates, ORT refuses it
    rc, report = run_bench(tmp_path, "--model", str(pkg_dir), "--no-agent", "--repeats", "1", "--warmup", "0")
    assert rc == 0
    assert {r["precision"] for r in report["model"]["results"]} == {"fp32"}
    reason = next(s["reason"] for s in report["model"]["skipped"] if s["precision"] == "fp16")
    assert "model.fp16.onnx" in reason


def test_pytorch_eager_and_ratio(tiny_run: Path, tiny_fod_package: Path, tmp_path: Path) -> None:
    rc, report = run_bench(
        tmp_path,
        *("--model", str(tiny_fod_package), "--checkpoint", str(tiny_run), "--no-agent"),
        *("--repeats", "2", "--warmup", "0", "--batch", "2"),
    )
    assert rc == 0
    backends = {(r["backend"], r["batch"]) for r in report["model"]["results"]}
    assert backends == {("pytorch", 1), ("pytorch", 2), ("onnxruntime", 1), ("onnxruntime", 2)}
    torch_result = next(r for r in report["model"]["results"] if r["backend"] == "pytorch")
    assert torch_result["detail"]["same_model_as_package"] is True
    assert torch_result["detail"]["threads"] >= 1
    ratio = {r["batch"]: r for r in report["model"]["ratios"] if r["comparison"].endswith("/ pytorch fp32")}
    assert set(ratio) == {1, 2}
    by = {(r["backend"], r["batch"]): r["p50_ms"] for r in report["model"]["results"]}
    assert ratio[1]["latency_ratio"] == pytest.approx(by["onnxruntime", 1] / by["pytorch", 1], abs=1e-4)
    assert report["machine"]["versions"]["torch"]


def test_checkpoint_of_another_size_is_refused(tiny_run: Path, toy_package_128: Path, tmp_path: Path) -> None:
    # the tiny run is 64 px, this package 128 px: the ratio would compare different models
    rc = main(["bench", "--model", str(toy_package_128), "--checkpoint", str(tiny_run), "--no-agent", "--quick"])
    assert rc == 2


@pytest.fixture
def toy_package_128(tmp_path: Path) -> Path:
    from tests.toy_package import make_toy_package

    return make_toy_package(tmp_path / "toy128", (128, 128))


def test_bad_settings_are_refused(toy_package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--model", str(toy_package), "--no-agent", "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
    assert main(["bench", "--model", str(toy_package / "missing"), "--no-agent"]) == 2


def test_summarize_times() -> None:
    t = summarize_times([10.0, 20.0, 30.0, 40.0], batch=4)
    assert t.p50_ms == 25.0
    assert t.min_ms == 10.0
    assert t.max_ms == 40.0
    assert t.mean_ms == 25.0
    assert t.per_frame_ms == 6.25
    assert t.frames_per_s == pytest.approx(4 * 4 / 0.1)  # 16 images in 100 ms
    assert 30.0 < t.p95_ms < 40.0
    with pytest.raises(InputError):
        summarize_times([], batch=1)


def test_time_runners_interleaved(toy_package: Path) -> None:
    package = ModelPackage(toy_package)
    calls: list[str] = []

    class Counting(OnnxRuntimeRunner):
        def _infer_impl(self, images):  # type: ignore[no-untyped-def]
            calls.append(str(self.onnx_path))
            return super()._infer_impl(images)

    images = np.full((2, 64, 64, 3), 128, np.uint8)
    a, b = Counting(package.onnx_path(), package.image_size), Counting(package.onnx_path(), package.image_size)
    with a, b:
        a.onnx_path, b.onnx_path = Path("a"), Path("b")
        timings = time_runners({"a": a, "b": b}, images, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # 1 warm-up round, then 3 timed rounds, alternating
    assert timings["a"].calls == 3
    assert timings["a"].batch == 2


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        # ORT twice as fast as PyTorch at batch 1: ratio 0.5, speedup 2
        (
            [("pytorch", "fp32", 1, 20.0), ("onnxruntime", "fp32", 1, 10.0)],
            {("onnxruntime fp32 / pytorch fp32", 1): (0.5, 2.0)},
        ),
        # variants against FP32 of the same backend, per batch; no cross-batch pairs
        (
            [
                ("onnxruntime", "fp32", 1, 10.0),
                ("onnxruntime", "int8", 1, 5.0),
                ("onnxruntime", "fp32", 8, 40.0),
                ("onnxruntime", "fp16", 8, 50.0),
            ],
            {
                ("onnxruntime int8 / onnxruntime fp32", 1): (0.5, 2.0),
                ("onnxruntime fp16 / onnxruntime fp32", 8): (1.25, 0.8),
            },
        ),
        # TensorRT against ONNX Runtime at the same precision
        (
            [("tensorrt", "fp16", 1, 1.0), ("onnxruntime", "fp16", 1, 8.0)],
            {("tensorrt fp16 / onnxruntime fp16", 1): (0.125, 8.0)},
        ),
        # no reference present: no ratio
        ([("onnxruntime", "int8", 1, 5.0)], {}),
    ],
)
def test_latency_ratios(results: list[tuple[str, str, int, float]], expected: dict[Any, Any]) -> None:
    rows = [{"backend": b, "precision": p, "batch": n, "p50_ms": ms} for b, p, n, ms in results]
    got = {(r["comparison"], r["batch"]): (r["latency_ratio"], r["speedup"]) for r in latency_ratios(rows)}
    assert got == expected


def test_machine_info_and_report_without_agent() -> None:
    machine = machine_info()
    assert machine["cores"] >= 1
    assert isinstance(machine["tensorrt"]["available"], bool)
    assert machine["tensorrt"]["detail"]
    report = {
        "machine": machine,
        "created_utc": "2026-01-01T00:00:00+00:00",
        "package": {"model_name": "m", "image_size": [64, 64], "backbone": "none"},
        "settings": {"quick": False},
        "model": {"results": [], "ratios": [], "skipped": []},
        "agent": {"error": "no broker"},
    }
    text = format_report(report)
    assert machine["cpu"] in text
    assert "FAILED (no broker)" in text
