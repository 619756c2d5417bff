"""ensure_broker: an embedded broker that real paho clients talk through, and reuse of a running one."""

from __future__ import annotations

import socket
import sys

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import BrokerError
from fod_tools.demo import broker as broker_mod
from fod_tools.demo.broker import ensure_broker, probe_mqtt
from tests.conftest import free_port

pytest.importorskip("amqtt.broker", reason="amqtt not installed: pip install 'fod-agent[demo]'")


def _publish(host: str, port: int, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{topic.replace('/', '-')}")
    client.connect(host, port, keepalive=10)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("prefer", ["amqtt", "mosquitto"])
def test_embedded_broker_carries_messages_and_stops(prefer, topic_root, subscriber):
    port = free_port()
    assert probe_mqtt("127.0.0.1", port) == "closed"
    with ensure_broker("127.0.0.1", port, prefer=prefer) as info:
        assert info.kind == prefer
        assert info.embedded
        assert info.url == f"mqtt://127.0.0.1:{port}"
        assert probe_mqtt(info.host, info.port) == "mqtt"
        sub = subscriber(info, f"{topic_root}/#")
        _publish(info.host, info.port, f"{topic_root}/live", b"hello")
        assert sub.wait_for(f"{topic_root}/live")[0].payload == b"hello"
        # a retained message reaches a subscriber that comes later (the agent's status and alarms rely on it)
        _publish(info.host, info.port, f"{topic_root}/status", b"online", retain=True)
        late = subscriber(info, f"{topic_root}/status")
        msg = late.wait_for(f"{topic_root}/status")[0]
        assert (msg.payload, msg.retain) == (b"online", True)
    assert probe_mqtt("127.0.0.1", port) == "closed"


def test_last_will_is_delivered_by_the_embedded_broker(topic_root, subscriber):
    with ensure_broker("127.0.0.1", 0) as info:
        assert info.kind == "amqtt"
        sub = subscriber(info, f"{topic_root}/#")
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-will")
        client.will_set(f"{topic_root}/status", b"offline", qos=1, retain=True)
        client.connect(info.host, info.port, keepalive=10)
        client.loop_start()
        client.publish(f"{topic_root}/status", b"online", qos=1, retain=True).wait_for_publish(5)
        sub.wait_for(f"{topic_root}/status")
        client.loop_stop()
        sock = client.socket()
        sock.shutdown(socket.SHUT_RDWR)  # die without DISCONNECT: the broker publishes the will
        sock.close()
        msgs = sub.wait_for(f"{topic_root}/status", n=2, timeout_s=10)
        assert msgs[-1].payload == b"offline"
    # it stops (and frees the port) even with a subscriber still connected and a QoS 1 delivery in flight
    assert probe_mqtt(info.host, info.port) == "closed"


def test_a_running_broker_is_used_as_is(mosquitto):
    with ensure_broker(mosquitto.host, mosquitto.port) as info:
        assert info.kind == "existing"
        assert not info.embedded
    assert mosquitto.running  # not stopped by the context manager


def test_port_taken_by_something_else_is_an_error():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with pytest.raises(BrokerError, match=rf"127\.0\.0\.1:{port} is in use"):
            with ensure_broker("127.0.0.1", port):
                pass


def test_falls_back_to_mosquitto_without_amqtt(monkeypatch):
    monkeypatch.setitem(sys.modules, "amqtt.broker", None)  # import amqtt.broker now raises ImportError
    with ensure_broker("127.0.0.1", 0) as info:
        assert info.kind == "mosquitto"
        assert probe_mqtt(info.host, info.port) == "mqtt"


def test_no_broker_available_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "amqtt.broker", None)
    monkeypatch.setattr(broker_mod, "_find_mosquitto", lambda: None)
    hint = r"pip install -e '\.\[demo\]' in the fod-agent clone.*apt-get install -y mosquitto"
    with pytest.raises(BrokerError, match=hint):
        with ensure_broker("127.0.0.1", free_port()):
            pass


def test_no_embedded_broker_for_a_remote_host():
    # 192.0.2.0/24 is TEST-NET-1: nothing answers there, and it is not this machine
    with pytest.raises(BrokerError, match="only run on this machine"):
        with ensure_broker("192.0.2.1", 1883):
            pass
