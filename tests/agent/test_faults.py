"""Issue 14 faults against the whole agent: real mosquitto, real sqlite outbox, real HTTP client.

Each test injects one fault an operator meets (full disk, a disk that stops answering, frames that
never score) and checks that no alarm is lost and that health says so, with the reason, on
``/healthz``, the retained status and ``/metrics``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.backends import LoadedModel, effective_calibration
from agent.config import ModelConfig
from agent.outbox import DB_NAME
from agent.pipeline import Agent
from fod.package import ModelPackage
from fod.runner import Runner
from tests.agent.conftest import Mosquitto, Subscriber
from tests.agent.test_pipeline import Running, frame, make_config
from tests.conftest import free_port


class Conveyor:
    """A live source whose defect the test switches on and off (toy score = blob / 128)."""

    is_live = False  # model pace: every frame is scored

    def __init__(self) -> None:
        self.blob = 0
        self.last_id = 0

    def read(self) -> tuple[bool, Any]:
        time.sleep(0.01)
        self.last_id += 1
        return True, frame(self.blob)

    def release(self) -> None:
        pass


def until(pred: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    """Poll ``pred`` until it returns something truthy (no fixed sleeps in assertions)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def healthz(agent: Agent) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{agent.http.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def problems_matching(agent: Agent, text: str) -> list[str]:
    code, body = healthz(agent)
    return [p for p in body["problems"] if text in p] if code == 503 else []


def alarm_messages(sub: Subscriber, topic: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` alarms on ``topic`` (the empty message that clears the retained alarm at start skipped)."""
    msgs = sub.wait_until(topic, lambda ms: len([m for m in ms if m.payload]) >= n, timeout_s=20)
    return [m.json() for m in msgs if m.payload][:n]


def unhealthy_status(sub: Subscriber, topic_root: str, text: str) -> list[dict[str, Any]]:
    """Online status messages that say unhealthy with a problem containing ``text``."""
    found = []
    for msg in sub.get(f"{topic_root}/status"):
        body = msg.json()
        if body["state"] == "online" and body["healthy"] is False and any(text in p for p in body["problems"]):
            found.append(body)
    return found


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs for the outbox (needs root / CAP_SYS_ADMIN; skipped otherwise)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def agent_on(
    tmp_path: Path, mosquitto: Mosquitto, topic_root: str, toy_package: Path
) -> Iterator[Callable[..., tuple[Running, Conveyor]]]:
    made: list[Running] = []

    def start(*, model: LoadedModel | None = None, **overrides: Any) -> tuple[Running, Conveyor]:
        settings = {
            "exit_at_end": False,
            "decision.debounce_n": 1,
            "decision.debounce_m": 1,
            "pipeline.health_window_s": 1.0,
            "pipeline.store_stall_s": 0.5,
            "http.host": "127.0.0.1",
            "http.port": free_port(),
            **overrides,
        }
        config = make_config(tmp_path, mosquitto, topic_root, toy_package, **settings)
        conveyor = Conveyor()
        made.append(Running(Agent(config, sources={"cam0": conveyor}, model=model)))
        return made[-1], conveyor

    yield start
    for run in made:
        if run.thread.is_alive():
            run.stop()


def test_alarm_is_not_lost_when_the_outbox_disk_is_full(
    tiny_fs: Path,
    mosquitto: Mosquitto,
    topic_root: str,
    subscriber: Callable[..., Subscriber],
    agent_on: Callable[..., tuple[Running, Conveyor]],
) -> None:
    sub = subscriber(mosquitto, f"{topic_root}/#")
    run, conveyor = agent_on(**{"mqtt.outbox_dir": str(tiny_fs / "outbox")})
    agent = run.agent
    until(lambda: healthz(agent)[0] == 200, "healthy at start")

    filler = tiny_fs / "filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    conveyor.blob = 96  # a defect while the disk is full: the alarm cannot be stored
    failing = until(lambda: problems_matching(agent, "alarm store failing"), "the failure in /healthz")
    assert "full" in failing[0]  # the cause, not "cannot rollback"
    assert agent.metrics.value("fod_alarm_store_failures_total") >= 1
    assert agent.link is not None
    assert agent.link.outbox_depth == 0
    assert "full" not in agent.cameras["cam0"].committed  # the transition was not taken (retried every frame)
    until(lambda: unhealthy_status(sub, topic_root, "alarm store failing"), "the failure in the status message")
    assert agent.metrics.value("fod_healthy") == 0

    filler.unlink()  # space again: the retried transition is stored and delivered
    alarms = alarm_messages(sub, f"{topic_root}/cam0/alarm", 1)
    assert (alarms[0]["previous"], alarms[0]["state"]) == ("OK", "NG")
    assert alarms[0]["alarm_seq"] == 1  # no gap: the failed write took no number
    assert alarms[0]["alarm_id"] == f"test-agent/{alarms[0]['alarm_epoch']}/1"
    until(lambda: healthz(agent)[0] == 200, "healthy again")
    conveyor.blob = 0
    alarms = alarm_messages(sub, f"{topic_root}/cam0/alarm", 2)
    assert [(a["state"], a["alarm_seq"]) for a in alarms] == [("NG", 1), ("OK", 2)]  # no repeat, no loss
    run.stop()


def test_frozen_outbox_does_not_freeze_scoring_and_shows_in_health(
    tmp_path: Path,
    mosquitto: Mosquitto,
    topic_root: str,
    subscriber: Callable[..., Subscriber],
    agent_on: Callable[..., tuple[Running, Conveyor]],
) -> None:
    sub = subscriber(mosquitto, f"{topic_root}/#")
    run, conveyor = agent_on()
    agent = run.agent
    until(lambda: healthz(agent)[0] == 200, "healthy at start")
    # another process holds the database: every write of the agent waits (a disk that stops answering)
    holder = sqlite3.connect(tmp_path / "outbox" / DB_NAME, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        conveyor.blob = 96
        until(lambda: problems_matching(agent, "alarm store stuck"), "the stuck store in /healthz")
        before = agent.metrics.value("fod_frames_scored_total")
        until(lambda: agent.metrics.value("fod_frames_scored_total") >= before + 20, "scoring to go on")
        assert not [m for m in sub.get(f"{topic_root}/cam0/alarm") if m.payload]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    alarms = alarm_messages(sub, f"{topic_root}/cam0/alarm", 1)
    assert (alarms[0]["state"], alarms[0]["alarm_seq"]) == ("NG", 1)
    until(lambda: healthz(agent)[0] == 200, "healthy again")
    run.stop()


class NanRunner(Runner):
    """A backend whose scores are NaN (a broken engine)."""

    name = "nan"

    def __init__(self, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.image_size = image_size

    def _activate_impl(self) -> None:
        pass

    def _infer_impl(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(images)
        return np.zeros((n, 1, *self.image_size), np.float32), np.full(n, np.nan, np.float32)

    def _deactivate_impl(self) -> None:
        pass


class FailingRunner(NanRunner):
    """A backend that fails on every frame (e.g. an input size that does not match the graph)."""

    def _infer_impl(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise ValueError("input 'image' has shape [1, 64, 64, 3], the graph wants [1, 32, 32, 3]")


def model_with(toy_package: Path, runner_cls: type[NanRunner]) -> LoadedModel:
    package = ModelPackage(toy_package)
    calibration, calibrated = effective_calibration(package, ModelConfig(threshold=0.5))
    runner = runner_cls(package.image_size)
    runner.activate()
    return LoadedModel(runner, package, runner_cls.name, "test", toy_package / "model.onnx", calibration, calibrated)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("nan", "non-finite score"),  # the engine scores NaN
        ("failing", "inference failed"),  # every inference raises
        ("outside", "outside"),  # the only ROI lies outside the frame
        ("paused", "paused"),  # someone paused scoring
        ("too_large", "larger than cameras.max_frame_side_px"),  # frames over the documented size limit
    ],
)
def test_health_is_derived_from_work_done(
    toy_package: Path,
    mosquitto: Mosquitto,
    topic_root: str,
    subscriber: Callable[..., Subscriber],
    agent_on: Callable[..., tuple[Running, Conveyor]],
    fault: str,
    reason: str,
) -> None:
    sub = subscriber(mosquitto, f"{topic_root}/status")
    overrides: dict[str, Any] = {}
    model = None
    if fault == "nan":
        model = model_with(toy_package, NanRunner)
    elif fault == "failing":
        model = model_with(toy_package, FailingRunner)
    elif fault == "outside":
        overrides["cameras.0.rois"] = [{"name": "off", "box_px": [500, 500, 10, 10]}]
    elif fault == "too_large":
        overrides["cameras.0.max_frame_side_px"] = 64  # the conveyor's frames are 128x96
    run, _ = agent_on(model=model, **overrides)
    agent = run.agent
    if fault == "paused":
        agent.paused = True
    assert agent.cameras["cam0"].worker.status().state in ("connecting", "connected")
    found = until(lambda: problems_matching(agent, reason), f"{reason!r} in /healthz")
    assert found
    # The gauges start at 0 and the ticker sets them once a second: wait for the tick that counts the problem.
    until(lambda: agent.metrics.value("fod_health_problems") >= 1, "fod_health_problems >= 1")
    assert agent.metrics.value("fod_healthy") == 0
    if fault == "too_large":
        assert agent.metrics.value("fod_frames_broken_total", {"camera": "cam0", "reason": "too_large"}) >= 1
        assert agent.metrics.value("fod_frames_scored_total") == 0
    until(lambda: unhealthy_status(sub, topic_root, reason), "the reason in the status message")
    run.stop()


def test_a_dead_worker_is_a_health_failure(
    agent_on: Callable[..., tuple[Running, Conveyor]],
) -> None:
    run, _ = agent_on()
    agent = run.agent
    until(lambda: healthz(agent)[0] == 200, "healthy at start")
    loop = agent._loop
    assert loop is not None
    done = threading.Event()

    def kill() -> None:
        for task in agent._tasks:
            if task.get_name() == "publisher":
                task.cancel()
        done.set()

    loop.call_soon_threadsafe(kill)
    assert done.wait(5)
    found = until(lambda: problems_matching(agent, "worker publisher"), "the dead worker in /healthz")
    assert found
    run.stop()
