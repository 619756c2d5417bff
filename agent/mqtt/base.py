"""State shared by the parts of :class:`agent.mqtt.link.MqttLink`, its metrics and its publishing primitives.

The link is one object assembled from one module per concept: this base (state, metrics, the
``_publish`` primitive), :mod:`agent.mqtt.publishers` (the public ``publish_*`` API, called from
the agent's threads), :mod:`agent.mqtt.session` (the connection supervisor thread) and
:mod:`agent.mqtt.commands` (the command thread). ``_client`` is the live paho client or None;
it is swapped only by the supervisor, under ``_lock``; paho callbacks never take ``_lock``.
"""


from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import CollectorRegistry, Counter, Gauge

from agent import __version__
from agent.mqtt.commands import CommandQueue
from agent.mqtt.config import MqttConfig, validate_topic_level
from agent.mqtt.size import publish_packet_bytes
from agent.outbox import Outbox
from agent.schemas import (
    CameraStatePayload,
    StatusPayload,
)

log = logging.getLogger("agent.mqtt")



YIELDING_KINDS = frozenset({"result", "mask", "overlay"})
"""Message kinds that yield to alarms (alarms first): dropped and counted rather than queued ahead."""
ALARM_FIRST_BYTES = 16 * 1024
"""While alarms wait in the outbox, results and images are dropped (``reason="alarm_first"``) as soon as
more than this many bytes of them wait for the socket (a fast link never gets there)."""
BACKLOG_LIMIT_BYTES = 64 * 1024
"""Results and images handed to paho and not yet written to the socket, in bytes, above which more are
dropped (``reason="backlog"``): on a slow uplink they would otherwise queue in front of the next alarm."""


class LinkState:
    """Attributes shared by the link's parts (set by :meth:`agent.mqtt.link.MqttLink.__init__`)."""

    config: MqttConfig
    agent_id: str
    client_id: str
    root: str
    status_topic: str
    command_filter: str
    response_topic: str
    connected: threading.Event
    _lock: threading.RLock
    _wake: threading.Event
    _stopping: threading.Event
    _stop_deadline: float
    _client: mqtt.Client | None
    _states: dict[str, CameraStatePayload]
    _state_sent_at: dict[str, float]
    _backend: str | None
    _model: str | None
    _health: tuple[bool | None, tuple[str, ...]]
    _result_counts: dict[tuple[str, str], int]
    _image_last: dict[tuple[str, str], float]
    _sessions: int
    _earlier_run_seq: int
    _cleared_topics: tuple[str, ...]
    _plc_retained: dict[str, str]
    _broker_max_packet: int | None
    _password: str | None
    _ssl_context: ssl.SSLContext | None
    _outbox: Outbox
    _backlog_lock: threading.Lock
    _backlog: dict[int, int]
    _backlog_bytes: int
    _backlog_early: set[int]
    _commands: CommandQueue

    def _init_metrics(self, registry: CollectorRegistry | None) -> None:
        reg = registry if registry is not None else CollectorRegistry()
        self.registry = reg
        self._m_connected = Gauge(
            "fod_mqtt_connected", "1 while connected to the MQTT broker, else 0", registry=reg
        )
        self._m_reconnects = Counter(
            "fod_mqtt_reconnects_total",
            "Connections to the broker established after the first one",
            registry=reg,
        )
        self._m_published = Counter(
            "fod_mqtt_messages_published_total",
            "MQTT messages handed to the connection (alarms: counted when acknowledged)",
            ["kind"],
            registry=reg,
        )
        self._m_dropped = Counter(
            "fod_mqtt_messages_dropped_total",
            "Messages not published: reason=disconnected (results, images), rate_limit (images) or too_large "
            "(over the broker's maximum packet size)",
            ["kind", "reason"],
            registry=reg,
        )
        self._m_resized = Counter(
            "fod_mqtt_images_resized_total",
            "Images down-scaled to fit the broker's maximum packet size",
            ["kind"],
            registry=reg,
        )
        self._m_commands = Counter(
            "fod_mqtt_commands_total", "Commands received, by result (ok | error)", ["result"], registry=reg
        )
        self._m_depth = Gauge(
            "fod_alarm_outbox_depth", "Alarms in the on-disk outbox not yet acknowledged", registry=reg
        )
        self._m_outbox_dropped = Counter(
            "fod_alarm_outbox_dropped_total",
            "Oldest alarms dropped because the outbox was full",
            registry=reg,
        )
        self._m_dead_letter = Counter(
            "fod_alarm_outbox_dead_letter_total",
            "Outbox rows that could not be read or sent, moved to the dead-letter table (never delivered)",
            registry=reg,
        )
        self._m_alarms = Counter(
            "fod_alarms_total", "Alarms raised, by new state (NG | OK)", ["state"], registry=reg
        )

    @staticmethod
    def _check_camera(camera: str, in_payload: str) -> None:
        validate_topic_level(camera)
        if camera != in_payload:
            raise ValueError(f"camera {camera!r} differs from the payload's camera {in_payload!r}")

    @property
    def max_packet_bytes(self) -> int | None:
        """The packet size limit in force: ``mqtt.max_packet_bytes`` and the broker's CONNACK value, the smaller."""
        limits = [v for v in (self.config.max_packet_bytes, self._broker_max_packet) if v]
        return min(limits) if limits else None

    def _fits(self, topic: str, payload: bytes, qos: int, property_bytes: int = 0) -> bool:
        limit = self.max_packet_bytes
        size = publish_packet_bytes(
            topic, len(payload), qos, v5=self.config.protocol == "5", property_bytes=property_bytes
        )
        return limit is None or size <= limit

    def _publish(
        self,
        client: mqtt.Client,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        kind: str,
        expiry_s: int = 0,
    ) -> bool:
        properties = None
        if expiry_s > 0 and self.config.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = expiry_s
        # the broker would drop the connection: never send it
        if not self._fits(topic, payload, qos, 5 if properties is not None else 0):
            self._m_dropped.labels(kind, "too_large").inc()
            log.warning(
                "%s message on %s not published: %d bytes exceed the broker's maximum packet size %s",
                kind,
                topic,
                len(payload),
                self.max_packet_bytes,
            )
            return False
        yielding = kind in YIELDING_KINDS
        if yielding:
            reason = self._yield_reason()
            if reason is not None:
                self._m_dropped.labels(kind, reason).inc()
                return False
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._m_published.labels(kind).inc()
            if yielding:
                with self._backlog_lock:
                    if info.mid in self._backlog_early:  # already written (on_publish came first)
                        self._backlog_early.discard(info.mid)
                    else:
                        self._backlog[info.mid] = len(payload)
                        self._backlog_bytes += len(payload)
            return True
        self._m_dropped.labels(kind, "disconnected").inc()
        return False

    def _yield_reason(self) -> str | None:
        """Why a result or image must give way now: ``alarm_first`` or ``backlog``; None = send it."""
        with self._backlog_lock:
            backlog = self._backlog_bytes
        if backlog > BACKLOG_LIMIT_BYTES:
            return "backlog"  # the uplink is slower than what we produce: do not queue more
        if backlog > ALARM_FIRST_BYTES and len(self._outbox) > 0:
            return "alarm_first"  # alarms wait for the link: nothing more goes in front of them
        return None

    def _sent(self, mid: int) -> None:
        """Paho wrote message ``mid`` to the socket (QoS 0) or had it acknowledged (QoS > 0)."""
        with self._backlog_lock:
            if mid in self._backlog:
                self._backlog_bytes -= self._backlog.pop(mid)
            elif len(self._backlog_early) < 4096:  # alarms and statuses land here too: approximate, bounded
                self._backlog_early.add(mid)  # maybe a result whose publish() has not returned yet

    def _reset_backlog(self) -> None:
        with self._backlog_lock:
            self._backlog.clear()
            self._backlog_early.clear()
            self._backlog_bytes = 0

    def _status_payload(self, state: Literal["online", "offline"]) -> StatusPayload:
        return StatusPayload(
            agent_id=self.agent_id,
            state=state,
            ts=time.time(),
            version=__version__,
            backend=self._backend,
            model=self._model,
            healthy=self._health[0] if state == "online" else None,
            problems=list(self._health[1]) if state == "online" else [],
        )

    def _publish_status(self, client: mqtt.Client, state: Literal["online", "offline"]) -> bool:
        return self._publish(
            client, self.status_topic, self._status_payload(state).to_json(), 1, True, "status"
        )

    def _clear_retained(self, client: mqtt.Client) -> None:
        """Delete the retained message of every topic given to ``clear_retained_on_start_and_stop``."""
        for topic in self._cleared_topics:
            self._publish(client, topic, b"", 1, True, "clear")

    def _publish_state(self, client: mqtt.Client, camera: str, state: CameraStatePayload) -> bool:
        """Publish a camera's retained state; with MQTT 5 it expires after ``mqtt.state_expiry_s``."""
        self._state_sent_at[camera] = time.monotonic()
        return self._publish(
            client,
            f"{self.root}/{camera}/state",
            state.to_json(),
            self.config.qos_state,
            True,
            "state",
            expiry_s=math.ceil(self.config.state_expiry_s),
        )

    def _refresh_states(self, client: mqtt.Client) -> None:
        """Republish each camera state a third of ``mqtt.state_expiry_s`` after it was sent (MQTT 5 only).

        The retained copies expire on the broker unless renewed, so a crashed agent's camera states
        vanish within ``state_expiry_s`` (the Last Will covers only ``<root>/status``).
        """
        if self.config.protocol != "5" or self.config.state_expiry_s <= 0:
            return
        due = time.monotonic() - self.config.state_expiry_s / 3.0
        with self._lock:
            for camera, state in self._states.items():
                if self._state_sent_at.get(camera, 0.0) <= due:
                    self._publish_state(client, camera, state)

