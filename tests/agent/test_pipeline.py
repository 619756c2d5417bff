"""The whole agent on the toy package, a folder / object source and a real mosquitto broker."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.publish as mqtt_publish
import pytest

from agent.backends import LoadedModel, effective_calibration
from agent.capture import Frame
from agent.commands import sign_command
from agent.config import AgentConfig, ModelConfig, load_config
from agent.pipeline import Agent, RoiScore, ScoredFrame
from fod.package import ModelPackage
from fod.runner import Runner
from tests.agent.conftest import COMMAND_SECRET, COMMAND_SECRET_ENV, Mosquitto, Subscriber
from tests.conftest import free_port

GREY = 128


def frame(blob: int = 0, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """Grey frame (toy score 0) with an optional bright square: toy score = blob / 128."""
    image = np.full((*size, 3), GREY, np.uint8)
    if blob:
        image[40:56, 50:66] = GREY + blob
    return image


def write_folder(folder: Path, blobs: list[int]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, blob in enumerate(blobs):
        names.append(f"{i:03d}.png")
        cv2.imwrite(str(folder / names[-1]), frame(blob))
    return names


def make_config(
    tmp_path: Path, broker: Mosquitto, topic_root: str, toy_package: Path, source: Any = 0, **overrides: Any
) -> AgentConfig:
    base: dict[str, Any] = {
        "agent_id": "test-agent",
        "cameras.0.source": str(source),
        "model.path": str(toy_package),
        "model.threshold": 0.5,
        "mqtt.host": broker.host,
        "mqtt.port": broker.port,
        "mqtt.topic_root": topic_root,
        "mqtt.outbox_dir": str(tmp_path / "outbox"),
        "mqtt.image_min_interval_s": 0.0,
        "mqtt.reconnect_min_s": 0.05,
        "mqtt.reconnect_max_s": 0.2,
        "http.port": 0,
        "snapshots.dir": str(tmp_path / "snapshots"),
        "snapshots.min_interval_s": 0.0,
        "exit_at_end": True,
    }
    base.update(overrides)
    return load_config(None, base)


class Running:
    """An agent running in a background thread (for tests that talk to it while it runs)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert agent.started.wait(20), f"agent did not start: {self.error}"

    def _main(self) -> None:
        try:
            asyncio.run(self.agent.run())
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.agent.request_stop("test done")
        self.thread.join(20)
        assert not self.thread.is_alive()
        assert self.error is None, self.error


@pytest.fixture
def running() -> Iterator[Callable[[Agent], Running]]:
    made: list[Running] = []

    def start(agent: Agent) -> Running:
        made.append(Running(agent))
        return made[-1]

    yield start
    for run in made:
        if run.thread.is_alive():
            run.stop()


def wait_alarms(sub: Subscriber, topic: str, n: int, timeout_s: float = 5.0) -> list[Any]:
    """The first ``n`` alarm messages (the empty payloads that clear the retained alarm at start and stop skipped)."""
    got = sub.wait_until(topic, lambda ms: len([m for m in ms if m.payload]) >= n, timeout_s)
    return [m for m in got if m.payload]


def payloads(sub: Subscriber, topic: str) -> list[dict[str, Any]]:
    return [m.json() for m in sub.get(topic)]


def test_folder_replay_end_to_end(
    tmp_path: Path,
    mosquitto: Mosquitto,
    topic_root: str,
    toy_package: Path,
    subscriber: Callable[..., Subscriber],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # frames 3, 4, 5 carry a defect (toy score 0.75 >= threshold 0.5); debounce 2-of-3
    names = write_folder(tmp_path / "imgs", [0, 0, 0, 96, 96, 96, 0, 0, 0, 0])
    sub = subscriber(mosquitto, f"{topic_root}/#")
    config = make_config(tmp_path, mosquitto, topic_root, toy_package, tmp_path / "imgs")
    agent = Agent(config)
    with caplog.at_level(logging.INFO, logger="agent.pipeline"):
        assert asyncio.run(agent.run()) == 0
    # the end-of-replay summary: frame 3 was NG but held back by the 2-of-3 debounce, frame 4 raised the alarm
    summary = agent.summary_lines()
    assert summary[0].startswith("cam0/full: 10 frames, 3 NG verdicts, 1 alarms; debounce 2/3 held back 1 NG frame(s)")
    assert f"summary: {summary[0]}" in caplog.messages

    results = sub.wait_for(f"{topic_root}/cam0/result", 10)
    got = [m.json() for m in results]
    assert [r["source_frame"] for r in got] == names  # model pace: every frame, in order
    assert [r["seq"] for r in got] == list(range(10))
    assert [r["verdict"] for r in got] == ["OK"] * 3 + ["NG"] * 3 + ["OK"] * 4
    assert got[3]["score"] == pytest.approx(0.75)
    assert got[3]["normalized_score"] > 0.5 > got[0]["normalized_score"]
    assert all(r["threshold"] == 0.5 and r["roi"] == "full" and r["schema_version"] == 1 for r in got)
    assert all(r["latency_ms"]["total"] >= r["latency_ms"]["inference"] >= 0 for r in got)

    alarms = [m.json() for m in wait_alarms(sub, f"{topic_root}/cam0/alarm", 2)]
    assert [(a["previous"], a["state"], a["source_frame"]) for a in alarms] == [
        ("OK", "NG", "004.png"),  # second NG frame of the window
        ("NG", "OK", "007.png"),  # second clear frame
    ]
    assert [a["alarm_seq"] for a in alarms] == [1, 2]

    # online is republished whenever the health changes (a slow CI frame can flip it), so wait for the last
    # retained status, not for a count of messages
    status = [m.json()["state"] for m in sub.wait_until(
        f"{topic_root}/status", lambda ms: len(ms) >= 2 and ms[-1].json()["state"] == "offline")]
    assert status[0] == "online"
    assert status[-1] == "offline"
    states = [m.json() for m in sub.get(f"{topic_root}/cam0/state")]
    assert states[-1]["state"] == "ended"
    assert states[-1]["frames_captured"] == 10

    masks = sub.wait_for(f"{topic_root}/cam0/mask", 3)
    overlays = sub.wait_for(f"{topic_root}/cam0/overlay", 3)
    mask = cv2.imdecode(np.frombuffer(masks[0].payload, np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask is not None
    assert mask.shape == (96, 128)
    assert mask[48, 58] == 255
    assert mask[5, 5] == 0
    assert overlays[0].payload[:2] == b"\xff\xd8"

    snaps = sorted((tmp_path / "snapshots" / "cam0").iterdir())
    assert len(snaps) == 3
    saved = json.loads((snaps[0] / "result.json").read_text())
    assert saved["results"][0]["source_frame"] == "003.png"
    assert {p.name for p in snaps[0].iterdir()} == {"frame.jpg", "mask.png", "overlay.jpg", "result.json"}

    assert agent.metrics.value("fod_frames_scored_total") == 10
    assert agent.metrics.value("fod_alarm_transitions_total", {"state": "NG"}) == 1
    assert agent.metrics.value("fod_inference_latency_seconds_count") == 10


def test_rois_are_scored_and_thresholded_on_their_own(
    tmp_path: Path, mosquitto: Mosquitto, topic_root: str, toy_package: Path, subscriber: Callable[..., Subscriber]
) -> None:
    write_folder(tmp_path / "imgs", [96])  # the blob is at x 50..66, y 40..56
    sub = subscriber(mosquitto, f"{topic_root}/#")
    config = make_config(
        tmp_path,
        mosquitto,
        topic_root,
        toy_package,
        tmp_path / "imgs",
        **{
            "cameras.0.rois": [
                {"name": "left", "box_px": [0, 0, 40, 96]},
                {"name": "blob", "box_px": [45, 35, 30, 30]},
                {"name": "strict", "box_px": [45, 35, 30, 30], "threshold": 0.9},
                {"name": "outside", "box_px": [500, 500, 10, 10]},  # off the frame: skipped
            ],
            "decision.debounce_n": 1,
            "decision.debounce_m": 1,
        },
    )
    asyncio.run(Agent(config).run())
    got = {r["roi"]: r for r in (m.json() for m in sub.wait_for(f"{topic_root}/cam0/result", 3))}
    assert set(got) == {"left", "blob", "strict"}
    assert got["left"]["verdict"] == "OK"
    assert got["blob"]["verdict"] == "NG"
    assert (got["strict"]["verdict"], got["strict"]["threshold"]) == ("OK", 0.9)
    alarms = [m.json()["roi"] for m in wait_alarms(sub, f"{topic_root}/cam0/alarm", 1)]
    assert alarms == ["blob"]


class FiniteObject:
    """A non-live source object: good, broken and grayscale frames, then the end."""

    is_live = False

    def __init__(self) -> None:
        self.frames: list[Any] = [
            frame(),
            None,  # failed decode
            np.zeros((96, 128, 3), np.float32),  # wrong dtype
            np.full((96, 128), 255, np.uint8),  # grayscale: converted and scored
            np.zeros((2, 2, 3), np.uint8),  # too small
            frame(96),
        ]
        self.released = False

    def read(self) -> tuple[bool, Any]:
        if not self.frames:
            return False, None
        return True, self.frames.pop(0)

    def release(self) -> None:
        self.released = True


def test_broken_frames_are_counted_and_skipped(
    tmp_path: Path, mosquitto: Mosquitto, topic_root: str, toy_package: Path, subscriber: Callable[..., Subscriber]
) -> None:
    sub = subscriber(mosquitto, f"{topic_root}/#")
    source = FiniteObject()
    config = make_config(tmp_path, mosquitto, topic_root, toy_package, **{"decision.debounce_n": 1})
    agent = Agent(config, sources={"cam0": source})
    asyncio.run(agent.run())
    results = [m.json() for m in sub.wait_for(f"{topic_root}/cam0/result", 3)]
    assert [r["verdict"] for r in results] == ["OK", "NG", "NG"]
    assert results[1]["score"] == pytest.approx(127 / 128)  # the white grayscale frame
    broken = {
        reason: agent.metrics.value("fod_frames_broken_total", {"reason": reason})
        for reason in ("empty", "dtype", "size")
    }
    assert broken == {"empty": 1, "dtype": 1, "size": 1}
    assert source.released


class SlowRunner(Runner):
    """A fake backend slower than the source: fixed delay, zero maps."""

    name = "slow"

    def __init__(self, image_size: tuple[int, int], delay_s: float) -> None:
        super().__init__()
        self.image_size = image_size
        self.delay_s = delay_s

    def _activate_impl(self) -> None:
        pass

    def _infer_impl(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        time.sleep(self.delay_s)
        n = len(images)
        return np.zeros((n, 1, *self.image_size), np.float32), np.zeros(n, np.float32)

    def _deactivate_impl(self) -> None:
        pass


def slow_model(toy_package: Path, delay_s: float) -> LoadedModel:
    package = ModelPackage(toy_package)
    calibration, calibrated = effective_calibration(package, ModelConfig(threshold=0.5))
    runner = SlowRunner(package.image_size, delay_s)
    runner.activate()
    return LoadedModel(runner, package, "slow", "test", toy_package / "model.onnx", calibration, calibrated)


@pytest.mark.parametrize(
    ("extra", "expect_drops"),
    [
        # realtime replay at 400 frames/s into a 20 ms model: newest-frame policy, drops counted
        ({"cameras.0.fps": 400.0}, True),
        # default for folders: model pace, every frame scored
        ({}, False),
    ],
)
def test_newest_frame_policy_with_a_slow_model(
    tmp_path: Path,
    mosquitto: Mosquitto,
    topic_root: str,
    toy_package: Path,
    extra: dict[str, Any],
    expect_drops: bool,
) -> None:
    write_folder(tmp_path / "imgs", [0] * 30)
    config = make_config(tmp_path, mosquitto, topic_root, toy_package, tmp_path / "imgs", **extra)
    agent = Agent(config, model=slow_model(toy_package, 0.02))
    asyncio.run(agent.run())
    captured = agent.metrics.value("fod_frames_captured_total")
    scored = agent.metrics.value("fod_frames_scored_total")
    dropped = agent.metrics.value("fod_frames_dropped_total", {"reason": "newest_frame"})
    assert captured == 30
    assert scored + dropped == captured
    assert (dropped > 0) == expect_drops
    age = agent.metrics.value("fod_frame_age_at_inference_seconds_count")
    assert age == scored


def publish_command(broker: Mosquitto, topic_root: str, name: str, payload: dict[str, Any]) -> None:
    body = json.dumps(sign_command(name, payload, COMMAND_SECRET))
    mqtt_publish.single(f"{topic_root}/cmd/{name}", body, hostname=broker.host, port=broker.port)


def response(sub: Subscriber, topic_root: str, request_id: str) -> dict[str, Any]:
    topic = f"{topic_root}/cmd/response"
    msgs = sub.wait_until(topic, lambda ms: any(m.json().get("request_id") == request_id for m in ms), 10)
    return next(m.json() for m in msgs if m.json().get("request_id") == request_id)


def test_commands_change_the_running_agent(
    tmp_path: Path,
    mosquitto: Mosquitto,
    topic_root: str,
    toy_package: Path,
    subscriber: Callable[..., Subscriber],
    running: Callable[[Agent], Running],
) -> None:
    write_folder(tmp_path / "imgs", [38, 38])  # toy score 38/128 ~ 0.297: OK at 0.5
    sub = subscriber(mosquitto, f"{topic_root}/#")
    config = make_config(
        tmp_path,
        mosquitto,
        topic_root,
        toy_package,
        tmp_path / "imgs",
        **{
            "exit_at_end": False,
            "cameras.0.loop": True,
            "cameras.0.fps": 50.0,
            "snapshots.enabled": False,
            "mqtt.commands": True,
            "mqtt.command_secret_env": COMMAND_SECRET_ENV,
            "model.reload_dir": str(toy_package),
        },
    )
    run = running(Agent(config))
    agent = run.agent
    result_topic = f"{topic_root}/cam0/result"
    sub.wait_for(result_topic, 1)

    # set_threshold below the score: NG results and an NG alarm
    publish_command(mosquitto, topic_root, "set_threshold", {"camera": "cam0", "threshold": 0.2, "request_id": "t1"})
    assert response(sub, topic_root, "t1")["ok"] is True
    sub.wait_until(result_topic, lambda ms: any(m.json()["verdict"] == "NG" for m in ms), 10)
    alarm = wait_alarms(sub, f"{topic_root}/cam0/alarm", 1)[0].json()
    assert (alarm["state"], alarm["threshold"]) == ("NG", 0.2)

    # a command for a camera that does not exist changes nothing
    publish_command(mosquitto, topic_root, "set_threshold", {"camera": "nope", "threshold": 9, "request_id": "t2"})
    reply = response(sub, topic_root, "t2")
    assert reply["ok"] is False
    assert "nope" in reply["error"]
    assert agent.cameras["cam0"].thresholds == {"full": 0.2}

    # snapshot on demand, even with automatic snapshots off
    publish_command(mosquitto, topic_root, "snapshot", {"camera": "cam0", "request_id": "s1"})
    assert response(sub, topic_root, "s1")["ok"] is True
    deadline = time.monotonic() + 10
    while not list((tmp_path / "snapshots").glob("cam0/*/result.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((tmp_path / "snapshots").glob("cam0/*/result.json"))

    # pause: frames are counted as dropped (reason paused) instead of scored; resume scores again
    publish_command(mosquitto, topic_root, "pause", {"request_id": "p1"})
    assert response(sub, topic_root, "p1")["result"] == {"paused": True}
    deadline = time.monotonic() + 10
    while agent.metrics.value("fod_frames_dropped_total", {"reason": "paused"}) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert agent.metrics.value("fod_frames_dropped_total", {"reason": "paused"}) >= 3
    publish_command(mosquitto, topic_root, "resume", {"request_id": "p2"})
    assert response(sub, topic_root, "p2")["result"] == {"paused": False}
    scored = agent.metrics.value("fod_frames_scored_total")
    deadline = time.monotonic() + 10
    while agent.metrics.value("fod_frames_scored_total") <= scored and time.monotonic() < deadline:
        time.sleep(0.02)
    assert agent.metrics.value("fod_frames_scored_total") > scored

    # reload from a bad path is refused and the model keeps running; a good one resets the thresholds
    publish_command(
        mosquitto, topic_root, "reload_model", {"path": str(toy_package / "nope"), "request_id": "r1"}
    )
    reply = response(sub, topic_root, "r1")
    assert reply["ok"] is False
    assert "not found" in reply["error"]
    assert agent.model is not None
    assert agent.model.runner.is_active
    publish_command(mosquitto, topic_root, "reload_model", {"path": str(toy_package), "request_id": "r2"})
    reply = response(sub, topic_root, "r2")
    assert reply["ok"] is True
    assert reply["result"]["backend"] == "onnxruntime"
    assert agent.cameras["cam0"].thresholds == {"full": 0.5}

    # a folder outside model.reload_dir is never loaded
    publish_command(mosquitto, topic_root, "reload_model", {"path": str(tmp_path), "request_id": "r3"})
    reply = response(sub, topic_root, "r3")
    assert reply["ok"] is False
    assert "outside model.reload_dir" in reply["error"]
    # a threshold that would switch detection off is refused
    publish_command(mosquitto, topic_root, "set_threshold", {"camera": "cam0", "threshold": 1e308, "request_id": "t3"})
    reply = response(sub, topic_root, "t3")
    assert reply["ok"] is False
    assert "above" in reply["error"]
    assert agent.cameras["cam0"].thresholds == {"full": 0.5}
    run.stop()


def test_source_that_cannot_be_opened_is_published_and_unhealthy(
    tmp_path: Path,
    mosquitto: Mosquitto,
    topic_root: str,
    toy_package: Path,
    subscriber: Callable[..., Subscriber],
    running: Callable[[Agent], Running],
) -> None:
    sub = subscriber(mosquitto, f"{topic_root}/#")
    port = free_port()
    config = make_config(
        tmp_path,
        mosquitto,
        topic_root,
        toy_package,
        "/dev/v4l/by-id/usb-missing-video-index0",  # a live camera that is unplugged: retried forever
        **{
            "cameras.0.reconnect_min_s": 0.05,
            "cameras.0.reconnect_max_s": 0.1,
            "http.port": port,
            "http.host": "127.0.0.1",
            "pipeline.state_interval_s": 0.1,
        },
    )
    run = running(Agent(config))
    state = sub.wait_until(f"{topic_root}/cam0/state", lambda ms: any(m.json()["reconnects"] >= 2 for m in ms), 10)[
        -1
    ].json()
    assert state["state"] == "failed"
    assert state["connected"] is False
    assert "usb-missing" in state["error"]
    assert "not present" in state["error"]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert info.value.code == 503
    body = json.loads(info.value.read())
    assert body["model_loaded"] is True
    assert body["cameras"]["cam0"]["state"] == "failed"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    assert 'fod_camera_reconnects_total{camera="cam0"}' in text
    assert "fod_mqtt_connected 1.0" in text  # the MQTT link registers on the same registry
    run.stop()
    status = [m.json()["state"] for m in sub.get(f"{topic_root}/status")]
    assert status[-1] == "offline"


def test_preview_stream_shows_the_overlay(
    tmp_path: Path,
    mosquitto: Mosquitto,
    topic_root: str,
    toy_package: Path,
    running: Callable[[Agent], Running],
) -> None:
    write_folder(tmp_path / "imgs", [96, 0])
    port = free_port()
    config = make_config(
        tmp_path,
        mosquitto,
        topic_root,
        toy_package,
        tmp_path / "imgs",
        **{
            "exit_at_end": False,
            "cameras.0.loop": True,
            "cameras.0.fps": 30.0,
            "http.host": "127.0.0.1",
            "http.port": port,
            "http.preview_fps": 30.0,
            "http.preview_width_px": 64,
        },
    )
    run = running(Agent(config))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/preview.mjpg?camera=cam0", timeout=10) as stream:
        data = b""
        while data.count(b"\xff\xd9") < 1:
            data += stream.read1(65536)
    start = data.index(b"\xff\xd8")
    image = cv2.imdecode(np.frombuffer(data[start : data.index(b"\xff\xd9") + 2], np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    assert image.shape == (48, 64, 3)  # 128x96 frame shrunk to preview_width_px, aspect kept
    run.stop()


class AlarmingObject:
    """A finite source whose scores raise and clear the alarm twice (debounce 1-of-1)."""

    is_live = False

    def __init__(self) -> None:
        self.blobs = [0, 96, 0, 96, 0]
        self.index = -1

    def read(self) -> tuple[bool, Any]:
        self.index += 1
        if self.index >= len(self.blobs):
            return False, None
        self.last_id = self.index
        return True, frame(self.blobs[self.index])


def test_alarms_raised_while_the_broker_is_down_arrive_in_order(
    tmp_path: Path,
    mosquitto: Mosquitto,
    topic_root: str,
    toy_package: Path,
    subscriber: Callable[..., Subscriber],
    running: Callable[[Agent], Running],
) -> None:
    mosquitto.stop()  # down at start
    config = make_config(
        tmp_path,
        mosquitto,
        topic_root,
        toy_package,
        **{
            "exit_at_end": False,
            "decision.debounce_n": 1,
            "decision.debounce_m": 1,
            "pipeline.broker_wait_s": 0.1,
            "mqtt.reconnect_min_s": 1.0,  # slow enough for the subscriber to be first after the restart
            "mqtt.reconnect_max_s": 1.0,
        },
    )
    run = running(Agent(config, sources={"cam0": AlarmingObject()}))
    agent = run.agent
    assert agent.link is not None
    deadline = time.monotonic() + 20
    while agent.link.outbox_depth < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert agent.link.outbox_depth == 4  # every alarm stored while the broker is away
    assert agent.metrics.value("fod_frames_scored_total") == 5  # scoring went on without a broker

    mosquitto.start()
    sub = subscriber(mosquitto, f"{topic_root}/#")
    alarms = [m.json() for m in wait_alarms(sub, f"{topic_root}/cam0/alarm", 4, timeout_s=20)]
    assert [(a["state"], a["source_frame"]) for a in alarms] == [("NG", 1), ("OK", 2), ("NG", 3), ("OK", 4)]
    assert [a["alarm_seq"] for a in alarms] == [1, 2, 3, 4]
    assert sub.wait_for(f"{topic_root}/status", 1)[-1].json()["state"] == "online"
    run.stop()
    assert sub.wait_until(f"{topic_root}/status", lambda ms: bool(ms) and ms[-1].json()["state"] == "offline")


class ImageHungryLink:
    """Stands in for MqttLink where only the image decision matters."""

    def image_wanted(self, camera: str, kind: str, verdict: str) -> bool:
        return True


def test_publish_queue_drops_the_oldest_and_counts(tmp_path: Path, toy_package: Path) -> None:
    config = load_config(
        None,
        {
            "model.path": str(toy_package),
            "model.threshold": 0.5,
            "http.port": 0,
            "pipeline.publish_queue_size": 2,
            "snapshots.enabled": False,
        },
    )
    agent = Agent(config, model=slow_model(toy_package, 0.0))
    agent.link = ImageHungryLink()  # type: ignore[assignment]
    agent._init_cameras()
    runtime = agent.cameras["cam0"]

    async def fill() -> list[int]:
        agent._publish_queue = asyncio.Queue(config.pipeline.publish_queue_size)
        for seq in range(5):
            image = frame(96)
            job_frame = Frame(image, seq, 0.0, time.perf_counter(), seq)
            scored = ScoredFrame([RoiScore("full", (0, 0, 128, 96), 0.75, np.zeros((64, 64), np.float32))], 0, 0, 0)
            runtime.scored = seq + 1
            agent._queue_publish_job(runtime, job_frame, scored, {"full": "NG"}, [], agent.model)  # type: ignore[arg-type]
        return [agent._publish_queue.get_nowait().frame.seq for _ in range(agent._publish_queue.qsize())]

    kept = asyncio.run(fill())
    assert kept == [3, 4]  # drop-oldest: the newest NG frames are kept
    assert agent.metrics.value("fod_queue_dropped_total", {"queue": "publish"}) == 3
    assert agent.metrics.value("fod_queue_depth", {"queue": "publish"}) == 2


class LiveGrey:
    """A live camera object: grey frames at 25 frames/s."""

    fps = 25.0

    def read(self) -> tuple[bool, Any]:
        return True, frame()


class SilentAfter:
    """A live camera whose read() blocks (socket open, no data) after ``n`` frames until ``unblock``."""

    def __init__(self, n: int, unblock: threading.Event) -> None:
        self.n = n
        self.unblock = unblock

    def read(self) -> tuple[bool, Any]:
        if self.n <= 0:
            self.unblock.wait()
            return False, None
        self.n -= 1
        time.sleep(0.02)
        return True, frame()


def test_a_stalled_camera_is_published_unhealthy_and_does_not_block_the_others_or_stop(
    tmp_path: Path,
    mosquitto: Mosquitto,
    topic_root: str,
    toy_package: Path,
    subscriber: Callable[..., Subscriber],
    running: Callable[[Agent], Running],
) -> None:
    unblock = threading.Event()
    sub = subscriber(mosquitto, f"{topic_root}/#")
    config = make_config(
        tmp_path,
        mosquitto,
        topic_root,
        toy_package,
        **{
            "cameras.0.name": "stuck",
            "cameras.0.stale_after_s": 0.4,
            "cameras.0.reconnect_min_s": 0.05,
            "cameras.1.name": "good",
            "exit_at_end": False,
        },
    )
    agent = Agent(config, sources={"stuck": lambda: SilentAfter(3, unblock), "good": LiveGrey()})
    run = running(agent)
    try:
        states = sub.wait_until(
            f"{topic_root}/stuck/state", lambda ms: any(m.json()["state"] == "stalled" for m in ms), 15
        )
        stalled = next(m.json() for m in states if m.json()["state"] == "stalled")
        assert stalled["connected"] is False
        assert "no frame" in stalled["error"]
        healthy, details = agent.health()
        assert not healthy
        assert details["cameras"]["stuck"]["state"] in ("stalled", "reconnecting", "connected")
        assert details["cameras"]["stuck"]["stalls"] >= 1
        # the other camera keeps being scored while the stuck reader is blocked
        before = len(sub.get(f"{topic_root}/good/result"))
        sub.wait_for(f"{topic_root}/good/result", before + 5, timeout_s=10)
        assert agent.metrics.value("fod_camera_stalls_total", {"camera": "stuck"}) >= 1
        started = time.monotonic()
        run.stop()  # asserts the agent thread ended without error
        assert time.monotonic() - started < 15
        assert sub.wait_until(
            f"{topic_root}/stuck/state", lambda ms: ms[-1].json()["state"] == "ended", 5
        )[-1].json()["connected"] is False
    finally:
        unblock.set()
