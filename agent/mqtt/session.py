"""The connection supervisor: one thread that connects, reconnects with capped exponential back-off,
republishes status and camera states on every connection and delivers the alarm outbox in order.
"""


from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent.backoff import Backoff
from agent.mqtt.base import LinkState

log = logging.getLogger("agent.mqtt")

ALARM_WINDOW = 20
"""Most alarms handed to the connection and not yet acknowledged."""
SEND_BUFFER_BYTES = 16 * 1024
"""SO_SNDBUF of the broker socket (Linux doubles it). The default autotunes up to megabytes, all of which
an alarm would wait behind on a slow uplink; results and images beyond it are bounded by the link's
backlog rule (:data:`agent.mqtt.base.BACKLOG_LIMIT_BYTES`)."""
CONNECT_TIMEOUT_S = 5.0
"""TCP/TLS connect and CONNACK wait per attempt (s)."""


class _QuietRaces(logging.Filter):
    """paho logs ``Client is not connected`` as an ERROR when its network thread runs once more after
    a disconnect (a clean stop, or a loss the supervisor already reports): shown only at DEBUG.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith("Client is not connected"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("agent.mqtt").isEnabledFor(logging.DEBUG)
        return True


PAHO_LOG = logging.getLogger("agent.mqtt.paho")
PAHO_LOG.addFilter(_QuietRaces())


class _Session:
    """Per-connection state shared with paho's callbacks (events only)."""

    def __init__(self) -> None:
        self.connack = threading.Event()
        self.reason: Any = None
        self.lost = threading.Event()
        self.lost_reason: Any = None
        self.max_packet: int | None = None



class Supervisor(LinkState):
    """Connection supervisor of :class:`agent.mqtt.link.MqttLink` (runs in the ``mqtt-link-*`` thread)."""

    def _new_client(self, session: _Session) -> mqtt.Client:
        if self.config.protocol == "5":
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=mqtt.MQTTv5,
                reconnect_on_failure=False,
            )
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                clean_session=True,
                reconnect_on_failure=False,
            )
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.max_inflight_messages_set(ALARM_WINDOW + 80)
        client.max_queued_messages_set(1000)
        client.enable_logger(PAHO_LOG)
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self._password)
        if self._ssl_context is not None:
            client.tls_set_context(self._ssl_context)
        with self._lock:
            will = self._status_payload("offline").to_json()
        client.will_set(self.status_topic, will, qos=1, retain=True)

        def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            session.reason = reason
            session.max_packet = getattr(props, "MaximumPacketSize", None)  # MQTT 5 CONNACK property
            session.connack.set()

        def on_disconnect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            session.lost_reason = reason
            session.lost.set()
            session.connack.set()
            self._wake.set()

        def on_publish(c: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            self._sent(mid)
            self._wake.set()

        def on_message(c: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            try:
                self._commands.offer(c, message)
            except Exception:  # never let an exception end paho's network thread
                log.exception("error while handling MQTT message on %s", message.topic)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_message = on_message
        return client

    def _connect(self, client: mqtt.Client, session: _Session) -> str | None:
        """Connect and wait for CONNACK; return None on success, else the reason."""
        try:
            if self.config.protocol == "5":
                client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive_s, clean_start=True)
            else:
                client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        except (OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        sock = client.socket()
        if isinstance(sock, socket.socket):  # a small kernel send queue: alarms never wait behind megabytes
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        client.loop_start()
        if not session.connack.wait(CONNECT_TIMEOUT_S) or session.reason is None:
            return f"no CONNACK within {CONNECT_TIMEOUT_S} s"
        if session.reason.is_failure:
            hint = ""
            if "authori" in str(session.reason).lower() or "password" in str(session.reason).lower():
                hint = " (check mqtt.username and the variable named by mqtt.password_env)"
            return f"broker refused the connection: {session.reason}{hint}"
        return None

    @staticmethod
    def _teardown(client: mqtt.Client) -> None:
        try:
            client.disconnect()
        finally:
            client.loop_stop()

    def _run(self) -> None:
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        failing = False
        where = f"{self.config.host}:{self.config.port}"
        while not self._stopping.is_set():
            session = _Session()
            client = self._new_client(session)
            error = self._connect(client, session)
            if error is not None:
                self._teardown(client)
                if not failing:
                    log.warning(
                        "cannot connect to MQTT broker %s (%s); retrying with back-off up to %.0f s, "
                        "alarms are kept in the outbox",
                        where,
                        error,
                        self.config.reconnect_max_s,
                    )
                    failing = True
                else:
                    log.debug("MQTT connect to %s failed again: %s", where, error)
                if backoff.wait(self._stopping):
                    break
                continue
            failing = False
            backoff.reset()
            self._sessions += 1
            if self._sessions > 1:
                self._m_reconnects.inc()
            log.info("connected to MQTT broker %s as %s (topic root %s)", where, self.client_id, self.root)
            try:
                graceful = self._session(client, session)
            except Exception:
                log.exception("MQTT session failed; reconnecting")
                graceful = False
            self._end_session(client, graceful)
            if graceful or self._stopping.is_set():
                break
            log.warning(
                "lost connection to MQTT broker %s (%s); reconnecting, alarms are kept in the outbox",
                where,
                session.lost_reason,
            )
            if self._stopping.wait(backoff.delay):  # the first retry after a loss: not doubled
                break

    def _session(self, client: mqtt.Client, session: _Session) -> bool:
        """Run one connection; return True when it ended because of :meth:`stop` (still connected)."""
        with self._lock:  # held until _client is set, so a command response never finds it unset
            self._broker_max_packet = session.max_packet
            if session.max_packet:
                log.info("broker maximum packet size: %d bytes", session.max_packet)
            if self.config.commands:
                client.subscribe(self.command_filter, qos=1)
            if self._sessions == 1:
                self._clear_retained(client)  # what a previous run (or its last will) left is not true now
            self._publish_status(client, "online")
            for camera, state in self._states.items():
                self._publish_state(client, camera, state)
            for topic, token in self._plc_retained.items():
                self._publish(client, topic, token.encode("ascii"), 1, True, "plc_alarm")
            self._client = client
            self.connected.set()
            self._m_connected.set(1)
        inflight: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        last_seq = 0
        while not session.lost.is_set():
            self._wake.clear()
            acked: list[int] = []
            pending: list[tuple[int, mqtt.MQTTMessageInfo]] = []
            broken = False
            for seq, info in inflight:
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    broken = True
                elif info.is_published():
                    acked.append(seq)
                else:
                    pending.append((seq, info))
            inflight = pending
            if acked:
                self._outbox.remove(acked)
                self._m_published.labels("alarm").inc(len(acked))
            self._m_depth.set(len(self._outbox))
            if broken:
                return False
            if self._stopping.is_set():
                if not inflight and len(self._outbox) == 0:
                    return True
                if time.monotonic() >= self._stop_deadline - self._offline_reserve_s():
                    return True
            free = ALARM_WINDOW - len(inflight)
            if free > 0:
                for entry in self._outbox.peek(after_seq=last_seq, limit=free):
                    retain = entry.seq > self._earlier_run_seq  # an earlier run's alarm is history, not state
                    last_seq = entry.seq
                    try:
                        json.loads(entry.payload)
                        info = client.publish(entry.topic, entry.payload, qos=self.config.qos_alarm, retain=retain)
                    except ValueError as exc:  # not JSON, or a topic / size paho refuses: never sendable
                        self._outbox.dead_letter(entry.seq, f"cannot be sent: {exc}")
                        continue
                    inflight.append((entry.seq, info))
                    if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
            if not self._stopping.is_set():
                self._refresh_states(client)
            self._wake.wait(0.05 if self._stopping.is_set() else 0.5)
        return False

    def _offline_reserve_s(self) -> float:
        return 0.5

    def _end_session(self, client: mqtt.Client, graceful: bool) -> None:
        self._reset_backlog()
        with self._lock:
            self._client = None
            self.connected.clear()
            self._m_connected.set(0)
        try:
            if graceful:
                self._clear_retained(client)  # after the outbox flush: the last alarm is not the state any more
                info = client.publish(
                    self.status_topic, self._status_payload("offline").to_json(), qos=1, retain=True
                )
                if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._m_published.labels("status").inc()
                    left = max(0.1, self._stop_deadline - time.monotonic())
                    try:
                        info.wait_for_publish(left)
                    except (RuntimeError, ValueError):
                        pass
        finally:
            self._teardown(client)

