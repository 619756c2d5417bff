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
