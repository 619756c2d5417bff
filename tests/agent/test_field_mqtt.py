"""The agent against brokers and consumers of the field: restarts and retained topics, packet size
limits, PLCs that read few bytes. A real mosquitto on loopback throughout."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.publish as mqtt_publish
import pytest

from agent.config import AgentConfig, load_config
from agent.mqtt.size import publish_packet_bytes, shrink_image
from agent.outbox import Outbox
from agent.pipeline import Agent
from tests.agent.conftest import Mosquitto, Subscriber

GREY = 128
LIMIT = 131072


def write_folder(folder: Path, blobs: list[int], size: tuple[int, int] = (96, 128)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, blob in enumerate(blobs):
        image = np.full((*size, 3), GREY, np.uint8)
        if blob:
            image[40:56, 50:66] = GREY + blob  # toy score blob / 128
        names.append(f"{i:03d}.png")
        cv2.imwrite(str(folder / names[-1]), image)
    return names


def config_for(
    tmp_path: Path, broker: Mosquitto, topic_root: str, package: Path, source: Path, **more: Any
) -> AgentConfig:
    base: dict[str, Any] = {
        "agent_id": "field",
        "cameras.0.source": str(source),
        "model.path": str(package),
        "model.threshold": 0.5,
        "decision.debounce_n": 1,
        "decision.debounce_m": 1,
        "mqtt.host": broker.host,
        "mqtt.port": broker.port,
        "mqtt.topic_root": topic_root,
        "mqtt.reconnect_min_s": 0.05,
        "mqtt.reconnect_max_s": 0.2,
        "state_dir": str(tmp_path / "state"),
        "snapshots.enabled": False,
        "http.port": 0,
        "exit_at_end": True,
    }
    base.update(more)
    return load_config(None, base)


def retained(broker: Mosquitto, topic: str, wait_s: float = 1.0) -> bytes | None:
    """The retained message of ``topic`` as a new subscriber sees it (None: nothing retained)."""
    sub = Subscriber(broker.host, broker.port, topic)
    try:
        try:
            return sub.wait_for(topic, 1, timeout_s=wait_s)[0].payload
        except AssertionError:
            return None
    finally:
        sub.close()


@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto that accepts packets of at most 128 KiB (like AWS IoT) and drops clients that send more."""
    broker = Mosquitto(tmp_path / "mosquitto_small", extra=[f"max_packet_size {LIMIT}"])
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(kill=True)


def test_retained_topics_are_true_after_a_restart_and_after_a_stop(
    tmp_path: Path, mosquitto: Mosquitto, topic_root: str, toy_package: Path
) -> None:
    alarm, state = f"{topic_root}/cam0/alarm", f"{topic_root}/cam0/state"
    # what a run that died while NG leaves: a retained NG alarm and a retained "connected" state (its
    # last will only covers <root>/status), plus an NG alarm still in its outbox
    stale = {"schema_version": 1, "camera": "cam0", "roi": "full", "state": "NG", "previous": "OK"}
    where = {"hostname": mosquitto.host, "port": mosquitto.port}
    mqtt_publish.single(alarm, json.dumps(stale), qos=1, retain=True, **where)  # type: ignore[arg-type]
    mqtt_publish.single(state, b'{"state":"connected"}', qos=1, retain=True, **where)  # type: ignore[arg-type]
    assert retained(mosquitto, alarm) is not None
    with Outbox(tmp_path / "state" / "outbox") as outbox:
        outbox.add(alarm, lambda seq: json.dumps({**stale, "alarm_seq": seq}).encode())

    # the restarted agent sees only good parts
    config = config_for(tmp_path, mosquitto, topic_root, toy_package, tmp_path / "good", **{"mqtt.plc_topics": True})
    write_folder(tmp_path / "good", [0] * 4)
    assert asyncio.run(Agent(config).run()) == 0

    assert retained(mosquitto, alarm) is None  # the stale NG is gone (and the earlier run's outbox alarm
    # was delivered as an event, not as the retained state)
    assert json.loads(retained(mosquitto, state) or b"{}")["state"] == "ended"
    assert retained(mosquitto, f"{topic_root}/plc/cam0/full/alarm") is None
    assert json.loads(retained(mosquitto, f"{topic_root}/status") or b"{}")["state"] == "offline"


def test_an_agent_stopped_while_ng_leaves_no_ng_behind(
    tmp_path: Path, mosquitto: Mosquitto, topic_root: str, toy_package: Path, subscriber: Callable[..., Subscriber]
) -> None:
    sub = subscriber(mosquitto, f"{topic_root}/#")
    write_folder(tmp_path / "imgs", [0, 0, 96, 96])  # ends NG
    config = config_for(tmp_path, mosquitto, topic_root, toy_package, tmp_path / "imgs")
    assert asyncio.run(Agent(config).run()) == 0
    alarms = sub.wait_until(f"{topic_root}/cam0/alarm", lambda ms: len(ms) >= 2 and ms[-1].payload == b"", 5)
    assert [m.json()["state"] for m in alarms if m.payload] == ["NG"]  # delivered while running
    assert alarms[-1].payload == b""  # then cleared on the clean stop
    assert retained(mosquitto, f"{topic_root}/cam0/alarm") is None


def test_plc_topics_carry_short_tokens(
    tmp_path: Path, mosquitto: Mosquitto, topic_root: str, toy_package: Path, subscriber: Callable[..., Subscriber]
) -> None:
    sub = subscriber(mosquitto, f"{topic_root}/plc/#")
    write_folder(tmp_path / "imgs", [0, 0, 96, 96, 0, 0])
    config = config_for(tmp_path, mosquitto, topic_root, toy_package, tmp_path / "imgs", **{"mqtt.plc_topics": True})
    assert asyncio.run(Agent(config).run()) == 0
    alarm = f"{topic_root}/plc/cam0/full/alarm"
    tokens = [m.payload for m in sub.wait_until(alarm, lambda ms: len(ms) >= 4, 5)]
    assert [t for t in tokens if t] == [b"0", b"1", b"0"]  # OK from the first frame, NG, OK again
    assert tokens[-1] == b""  # cleared on stop: the state of a stopped agent is unknown
    scores = [m.payload for m in sub.wait_for(f"{topic_root}/plc/cam0/full/score", 6)]
    assert len(scores) == 6
    assert all(len(s) <= 5 for s in scores)  # "0.734": inside any PLC library's first 80 bytes
    assert float(scores[2]) > 0.5 > float(scores[0])


def test_plc_topics_are_off_by_default(tmp_path: Path, mosquitto: Mosquitto, topic_root: str, toy_package: Path,
                                       subscriber: Callable[..., Subscriber]) -> None:  # fmt: skip
    sub = subscriber(mosquitto, f"{topic_root}/#")
    write_folder(tmp_path / "imgs", [0, 96, 96])
    assert asyncio.run(Agent(config_for(tmp_path, mosquitto, topic_root, toy_package, tmp_path / "imgs")).run()) == 0
    sub.wait_for(f"{topic_root}/cam0/result", 3)
    assert not [t for t in sub.messages if "/plc/" in t]


@pytest.mark.parametrize(
    ("protocol", "configured"),
    [
        ("5", None),  # the limit comes from the broker's CONNACK (Maximum Packet Size)
        ("3.1.1", LIMIT),  # MQTT 3.1.1 has no such property: the limit comes from the config
    ],
)
def test_images_over_the_broker_packet_limit_are_shrunk_and_the_link_never_drops(
    tmp_path: Path,
    small_broker: Mosquitto,
    topic_root: str,
    toy_package: Path,
    subscriber: Callable[..., Subscriber],
    protocol: str,
    configured: int | None,
) -> None:
    folder = tmp_path / "hd"
    folder.mkdir()
    rng = np.random.default_rng(0)
    n = 4
    for i in range(n):  # 1080p noise: the overlay JPEG is well over 128 KiB
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8))
    sub = subscriber(small_broker, f"{topic_root}/#")
    more: dict[str, Any] = {"mqtt.images": "all", "mqtt.image_min_interval_s": 0.0, "mqtt.protocol": protocol}
    if configured:
        more["mqtt.max_packet_bytes"] = configured
    agent = Agent(config_for(tmp_path, small_broker, topic_root, toy_package, folder, **more))
    assert asyncio.run(agent.run()) == 0
    assert len(sub.wait_for(f"{topic_root}/cam0/result", n, timeout_s=10)) == n
    overlays = sub.wait_for(f"{topic_root}/cam0/overlay", n, timeout_s=10)
    assert all(len(m.payload) <= LIMIT for m in overlays)
    assert cv2.imdecode(np.frombuffer(overlays[0].payload, np.uint8), cv2.IMREAD_COLOR) is not None
    assert agent.metrics.value("fod_mqtt_images_resized_total", {"kind": "overlay"}) == n
    assert agent.metrics.value("fod_mqtt_reconnects_total") == 0  # no publish tore the link down
    status = [m.json()["state"] for m in sub.get(f"{topic_root}/status")]
    # no flapping: online (republished when the derived health changes, issue 14) until the clean offline
    assert [s for i, s in enumerate(status) if i == 0 or s != status[i - 1]] == ["online", "offline"]


def test_packet_size_and_shrink_limits() -> None:
    assert publish_packet_bytes("a/b", 100, 0, v5=False) == 1 + 1 + 2 + 3 + 100
    assert publish_packet_bytes("a/b", 200, 1, v5=True) == 1 + 2 + 2 + 3 + 2 + 1 + 200
    noise = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", noise)[1].tobytes()
    smaller = shrink_image(jpeg, "overlay", 20_000)
    assert smaller is not None
    assert len(smaller) <= 20_000
    assert shrink_image(jpeg, "overlay", 10) is None  # cannot fit: skipped (and counted by the link)
