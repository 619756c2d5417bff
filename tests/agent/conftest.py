"""Fixtures for agent tests: a real mosquitto broker on a free loopback port and a collecting subscriber.

- ``mosquitto``: a function-scoped broker (``.host``, ``.port``, ``.stop()``, ``.start()`` restarts on
  the SAME port to simulate an outage). ``mosquitto_persistent`` keeps sessions and retained
  messages across ``stop()`` / ``start()`` (needed when a subscriber must not miss messages
  published while it reconnects after a broker restart).
- ``topic_root``: a topic root unique to the test (from its node id).
- ``subscriber``: factory ``subscriber(topic_filter, persistent=False) -> Subscriber``; closed at teardown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fod_tools.demo.broker import MosquittoProcess

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
COMMAND_SECRET_ENV = "FOD_TEST_COMMAND_SECRET"
COMMAND_SECRET = "test-secret-0123456789abcdef"


@pytest.fixture(autouse=True)
def command_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """The shared command secret, in the environment variable the test configs name."""
    monkeypatch.setenv(COMMAND_SECRET_ENV, COMMAND_SECRET)
    return COMMAND_SECRET


class Mosquitto(MosquittoProcess):
    """A mosquitto broker on ``127.0.0.1:<free port>`` that can be stopped and restarted, logging connections."""

    def __init__(self, workdir: Path, *, persistence: bool = False, extra: list[str] | None = None) -> None:
        options = [f"log_type {kind}" for kind in ("error", "warning", "notice", "information")]
        options.append("connection_messages true")
        if os.geteuid() == 0:  # as root mosquitto drops to user "mosquitto", who cannot read pytest's tmp dirs
            options.append("user root")
        super().__init__(workdir, persistence=persistence, listener_options=extra or (), options=options)


@dataclass(frozen=True)
class Msg:
    """One received message."""

    topic: str
    payload: bytes
    qos: int
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """A paho client that subscribes to a filter and collects messages per topic (thread-safe).

    It re-subscribes on every reconnect. With ``persistent=True`` it uses a fixed client id and
    ``clean_session=False`` with QoS 1, so on a persistent broker it receives QoS 1 messages
    published while it was away.
    """

    def __init__(
        self, host: str, port: int, topic_filter: str, *, persistent: bool = False, qos: int = 1
    ) -> None:
        self.topic_filter = topic_filter
        self.qos = qos
        self.persistent = persistent
        self._cond = threading.Condition()
        self.messages: dict[str, list[Msg]] = {}
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{uuid.uuid4().hex[:10]}",
            clean_session=not persistent,
        )
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.2)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            self.close()
            raise RuntimeError(f"subscriber could not subscribe to {topic_filter} on {host}:{port}")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            return
        if self.persistent and flags.session_present:
            # the broker kept the subscription: subscribing again would re-send retained messages
            self.subscribed.set()
        else:
            client.subscribe(self.topic_filter, qos=self.qos)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.subscribed.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        msg = Msg(message.topic, bytes(message.payload), message.qos, bool(message.retain))
        with self._cond:
            self.messages.setdefault(msg.topic, []).append(msg)
            self._cond.notify_all()

    def get(self, topic: str) -> list[Msg]:
        """Messages received on ``topic`` so far (a copy)."""
        with self._cond:
            return list(self.messages.get(topic, []))

    def wait_for(self, topic: str, n: int = 1, timeout_s: float = 5.0) -> list[Msg]:
        """Wait until at least ``n`` messages arrived on ``topic``; return all of them.

        Raises:
            AssertionError: fewer than ``n`` arrived within ``timeout_s`` (lists what did arrive).
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.messages.get(topic, [])) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    got = {t: len(m) for t, m in self.messages.items()}
                    raise AssertionError(
                        f"expected {n} message(s) on {topic} within {timeout_s} s; got {got}"
                    )
                self._cond.wait(left)
            return list(self.messages[topic])

    def wait_until(self, topic: str, pred: Callable[[list[Msg]], bool], timeout_s: float = 5.0) -> list[Msg]:
        """Wait until ``pred(messages on topic)`` is true; return the messages.

        Raises:
            AssertionError: the predicate stayed false for ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not pred(list(self.messages.get(topic, []))):
                left = deadline - time.monotonic()
                if left <= 0:
                    msgs = [m.payload[:200] for m in self.messages.get(topic, [])]
                    raise AssertionError(f"condition on {topic} not met within {timeout_s} s; got {msgs}")
                self._cond.wait(left)
            return list(self.messages.get(topic, []))

    def clear(self) -> None:
        """Forget every message received so far."""
        with self._cond:
            self.messages.clear()

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running mosquitto on a free loopback port, persistence off; killed at teardown."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(kill=True)


@pytest.fixture
def mosquitto_persistent(tmp_path: Path) -> Iterator[Mosquitto]:
    """Like ``mosquitto`` but sessions and retained messages survive ``stop()`` / ``start()``."""
    broker = Mosquitto(tmp_path / "mosquitto_p", persistence=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(kill=True)


@pytest.fixture
def topic_root(request: pytest.FixtureRequest) -> str:
    """A topic root unique to this test, e.g. ``fodtest/test_mqtt_py-test_alarm_order-1a2b3c``."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", request.node.nodeid.split("::")[-1])[:60]
    return f"fodtest/{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def subscriber() -> Iterator[Callable[..., Subscriber]]:
    """Factory ``subscriber(broker, topic_filter, persistent=False) -> Subscriber``, closed at teardown."""
    made: list[Subscriber] = []

    def make(broker: Mosquitto, topic_filter: str, *, persistent: bool = False) -> Subscriber:
        sub = Subscriber(broker.host, broker.port, topic_filter, persistent=persistent)
        made.append(sub)
        return sub

    yield make
    for sub in made:
        sub.close()
