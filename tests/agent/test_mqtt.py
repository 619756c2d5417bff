"""MqttLink against a real mosquitto broker on a free loopback port."""

from __future__ import annotations

import paho.mqtt.publish as publish


def test_broker_fixture_restarts_on_same_port(mosquitto, subscriber, topic_root):
    sub = subscriber(mosquitto, f"{topic_root}/#")
    publish.single(f"{topic_root}/x", b"1", qos=1, hostname=mosquitto.host, port=mosquitto.port)
    assert sub.wait_for(f"{topic_root}/x", 1)[0].payload == b"1"
    port = mosquitto.port
    mosquitto.stop()
    mosquitto.start()
    assert mosquitto.port == port
    assert sub.subscribed.wait(5)  # the subscriber reconnected and re-subscribed
    publish.single(f"{topic_root}/x", b"2", qos=1, hostname=mosquitto.host, port=mosquitto.port)
    assert [m.payload for m in sub.wait_for(f"{topic_root}/x", 2)] == [b"1", b"2"]


import json
import time
from pathlib import Path

import pytest

from agent.mqtt import MqttConfig, MqttLink
from agent.schemas import AlarmPayload, CameraStatePayload, LatencyMs, ResultPayload


@pytest.fixture
def make_link(tmp_path, topic_root):
    links: list[MqttLink] = []

    def make(broker, *, outbox: Path | None = None, on_command=None, agent_id="a1", **cfg) -> MqttLink:
        config = MqttConfig(
            host=broker.host,
            port=broker.port,
            topic_root=topic_root,
            reconnect_min_s=0.05,
            reconnect_max_s=0.2,
            keepalive_s=5,
            outbox_dir=outbox or tmp_path / f"outbox-{len(links)}",
            **cfg,
        )
        link = MqttLink(config, agent_id=agent_id, on_command=on_command)
        links.append(link)
        return link

    yield make
    for link in links:
        link.close(timeout_s=1.0)


def alarm(i: int, state="NG") -> AlarmPayload:
    return AlarmPayload(
        camera="cam0",
        roi="full",
        state=state,
        previous="OK" if state == "NG" else "NG",
        ts=1000.0 + i,
        score=2.0,
        normalized_score=0.7,
        threshold=1.0,
        source_frame=f"f{i}.png",
    )


def test_smoke_online_alarm(mosquitto, subscriber, topic_root, make_link):
    sub = subscriber(mosquitto, f"{topic_root}/#")
    link = make_link(mosquitto)
    link.start()
    assert link.connected.wait(5)
    st = sub.wait_for(f"{topic_root}/status", 1)[0].json()
    assert st["state"] == "online"
    out = link.publish_alarm("cam0", alarm(1))
    assert out.alarm_seq == 1
    got = sub.wait_for(f"{topic_root}/cam0/alarm", 1)[0].json()
    assert got["alarm_seq"] == 1
