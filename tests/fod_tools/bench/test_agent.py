"""``fod bench``, agent part: the real agent on the toy package against a real mosquitto.

No timed assertions: the checks are that every scored frame's result arrives and is counted, the
report's structure, that the numbers are finite and positive, and that the percentiles are ordered.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fod.cli import main
from fod_tools.bench.agent import (
    CAPTURE_TS,
    NG,
    RECV,
    SEQ,
    TOTAL,
    AgentBenchSettings,
    MemoryReplay,
    _broker,
    bench_agent,
    latency_stats,
    rss_mib,
    scored_per_s,
)
from fod_tools.demo.broker import probe_mqtt
from tests.agent.conftest import Mosquitto
from tests.conftest import free_port
from tests.toy_package import calibrated_copy

LONG, FRAMES = 150, 30


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def ordered(part: dict[str, Any], key: str) -> bool:
    return part[f"{key}_p50_ms"] <= part[f"{key}_p95_ms"] <= part[f"{key}_p99_ms"]


def test_cli_quick_agent_against_mosquitto(
    toy_package: Path, mosquitto: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    rc = main(
        [
            *("bench", "--model", str(toy_package), "--quick", "--repeats", "2"),
            *("--frames", str(FRAMES), "--long-frames", str(LONG)),
            *("--broker", f"mqtt://{mosquitto.host}:{mosquitto.port}", "--json", str(out)),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["model"]["results"], "the model part runs too"
    agent = report["agent"]
    assert {"sustained", "latency", "overload", "memory", "bare_backend", "throughput_ratio", "notes"} <= set(agent)
    assert agent["backend"] == "onnxruntime"
    assert agent["rois"] == 1
    assert agent["broker"] == {"kind": "given", "url": f"mqtt://{mosquitto.host}:{mosquitto.port}"}
    assert agent["source"]["frame_size"] == [480, 640]
    # the toy package is not calibrated: a threshold above every pool score, said in the notes
    assert agent["threshold"]["from_package"] is False
    assert positive(agent["threshold"]["image_threshold"])
    assert any("not calibrated" in n for n in agent["notes"])

    sustained = agent["sustained"]
    # model pace: every frame of the replay is scored, and every result arrives over MQTT
    assert sustained["frames_sent"] == LONG
    assert sustained["frames_scored"] == LONG
    assert sustained["received"] == LONG
    assert sustained["lost"] == 0
    assert positive(sustained["fps"])
    assert positive(agent["bare_backend"]["frames_per_s"])
    assert positive(agent["throughput_ratio"])
    expected_ratio = sustained["fps"] / agent["bare_backend"]["frames_per_s"]
    assert agent["throughput_ratio"] == pytest.approx(expected_ratio, abs=6e-4)  # rounded to 3 decimals

    latency = agent["latency"]
    assert latency["received"] == FRAMES  # warm-up results left out of the statistics
    assert latency["source_factor"] == 0.5
    for key in ("receive", "total"):
        assert all(positive(latency[f"{key}_p{q}_ms"]) for q in (50, 95, 99))
        assert ordered(latency, key)
    assert set(latency["stage_mean_ms"]) == {"capture", "preprocess", "inference", "postprocess", "total"}
    assert positive(latency["stage_mean_ms"]["inference"])
    assert latency["ng_fraction"] == 0.0  # threshold above every pool score

    overload = agent["overload"]
    assert overload["source_factor"] == 2.0
    assert overload["frames_captured"] >= FRAMES
    # every captured frame was either scored, dropped by the newest-frame policy, or in flight at the stop
    in_flight = overload["frames_captured"] - overload["frames_dropped"] - overload["frames_scored"]
    assert 0 <= in_flight <= 2
    assert overload["age_mean_ms"] > 0
    assert overload["age_max_ms"] >= overload["age_mean_ms"]
    assert 0 <= overload["drop_fraction"] < 1

    memory = agent["memory"]
    assert memory["first_frames"] == 100
    assert memory["last_frames"] == LONG
    assert positive(memory["rss_first_mib"])
    assert positive(memory["rss_last_mib"])
    assert memory["growth_mib"] == pytest.approx(memory["rss_last_mib"] - memory["rss_first_mib"], abs=0.11)
    assert [n for n, _ in memory["samples"]] == sorted({15, 30, 45, 60, 75, 90, 100, 105, 120, 135, 150})

    printed = capsys.readouterr().out
    assert "Agent end to end" in printed
    assert "sustained FPS" in printed
    assert "RSS MiB" in printed


def test_calibrated_package_uses_its_threshold(toy_package: Path, mosquitto: Mosquitto, tmp_path: Path) -> None:
    pkg = calibrated_copy(toy_package, tmp_path / "calibrated", threshold=0.05)  # NG verdicts on the conveyor
    settings = AgentBenchSettings(frames=10, long_frames=40, broker=f"mqtt://{mosquitto.host}:{mosquitto.port}")
    report = bench_agent(pkg, settings)
    assert report["threshold"] == {"from_package": True, "image_threshold": 0.05}
    assert not any("not calibrated" in n for n in report["notes"])
    assert report["sustained"]["frames_scored"] == 40
    assert report["latency"]["ng_fraction"] > 0  # NG frames went through rendering and image publishing
    assert report["memory"]["first_frames"] == 40  # fewer frames than the first sample point: sampled at the end


def test_unreachable_broker_fails_the_agent_part_only(
    toy_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    out = tmp_path / "bench.json"
    rc = main(
        [
            *("bench", "--model", str(toy_package), "--quick", "--repeats", "1"),
            *("--broker", f"mqtt://127.0.0.1:{port}", "--json", str(out)),
        ]
    )
    assert rc == 1
    report = json.loads(out.read_text())
    assert str(port) in report["agent"]["error"]
    assert report["model"]["results"]  # the model part still ran
    assert "FAILED" in capsys.readouterr().out


def test_default_broker_is_started_and_stopped() -> None:
    messages: list[str] = []
    with _broker(None, messages.append) as (kind, url):
        assert kind in ("mosquitto", "amqtt")
        host, port = url.removeprefix("mqtt://").split(":")
        assert probe_mqtt(host, int(port)) == "mqtt"
    assert probe_mqtt(host, int(port)) == "closed"
    assert messages
    assert url in messages[0]


def test_memory_replay_ends_or_signals() -> None:
    frames = [np.full((8, 8, 3), i, np.uint8) for i in range(3)]
    replay = MemoryReplay(frames, live=False, limit=4)
    read = [replay.read() for _ in range(5)]
    assert [ok for ok, _ in read] == [True, True, True, True, False]
    assert read[3][1] is frames[0]  # cycles the pool
    assert replay.last_id == 3

    hits: list[int] = []
    live = MemoryReplay(frames, live=True, fps=100.0, limit=2, on_limit=lambda: hits.append(live.count))
    assert all(live.read()[0] for _ in range(4))  # a live source goes on after the limit
    assert hits == [3]  # signalled when the frame after the 2nd is read: both were handed over


def test_statistics_of_rows() -> None:
    rows = np.full((12, 10), np.nan)
    rows[:, CAPTURE_TS] = 1000.0 + np.arange(12) * 0.1  # 10 frames/s
    rows[:, RECV] = rows[:, CAPTURE_TS] + 0.005  # 5 ms capture -> receive
    rows[:, TOTAL] = 4.0
    rows[:, 3:7] = 1.0
    rows[:, NG] = [1, 1] + [1] * 5 + [0] * 5  # 5 NG among the 10 rows after the 2 skipped
    stats = latency_stats(rows, skip=2)
    assert stats["received"] == 10
    assert stats["receive_p50_ms"] == pytest.approx(5.0, abs=1e-3)
    assert stats["total_p99_ms"] == 4.0
    assert stats["stage_mean_ms"]["inference"] == 1.0
    assert stats["ng_fraction"] == 0.5
    rows[:, SEQ] = np.arange(12)
    assert scored_per_s(rows, skip=2) == pytest.approx(10.0)
    # a lost result (row 5 missing) does not change the rate: it is counted by seq
    assert scored_per_s(np.delete(rows, 5, axis=0), skip=2) == pytest.approx(10.0)
    assert math.isnan(scored_per_s(rows[:1], skip=0))


def test_rss_is_read() -> None:
    assert positive(rss_mib())
