"""The agent's MQTT link: configuration, connection supervisor, publishers and command handling.

:class:`MqttLink` owns one broker connection (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``,
network loop in paho's thread via ``loop_start``) and a supervisor thread that connects, reconnects
forever with capped exponential back-off (``reconnect_min_s`` doubling up to ``reconnect_max_s``)
and delivers alarms from the on-disk outbox (:mod:`agent.outbox`).

On every (re)connection, in this order: subscribe ``<root>/cmd/#`` (only with ``mqtt.commands = true``;
every command must then be signed, see :class:`agent.commands.CommandAuth`); publish ``online`` on
``<root>/status`` (retained); republish the latest state of every camera (retained); deliver the
outbox from its oldest entry, in order, at most :data:`ALARM_WINDOW` unacknowledged at a time. An
alarm leaves the outbox only when the broker acknowledged it (PUBACK for QoS 1, PUBCOMP for QoS 2).

Each connection uses a fresh paho client (paho's own auto-reconnect is off). That is deliberate:
paho would re-send its in-memory copies of unacknowledged messages after a reconnect, *after*
anything published from ``on_connect``, which can reorder alarms and resurrect stale retained
camera states. With a fresh client the outbox is the only source of alarms and the order on the
wire is always the outbox order. Delivery is at-least-once: an alarm whose PUBACK was lost with the
connection is sent again on the next connection; consumers drop repeats by ``alarm_id``. A stored
row that cannot be read or sent is moved to the outbox's dead-letter table (counted in
``fod_alarm_outbox_dead_letter_total``, logged with its ``alarm_seq``) and delivery goes on.

The Last Will is a retained ``offline`` :class:`~agent.schemas.StatusPayload` on ``<root>/status``;
:meth:`MqttLink.stop` flushes the outbox (bounded by its timeout), publishes ``offline`` itself and
disconnects cleanly.

Alarms first: results and images are counted from the moment they are handed to paho until paho
has written them to the socket. When more than :data:`~agent.mqtt.base.BACKLOG_LIMIT_BYTES` of them
wait (a slow uplink), further ones are dropped (``fod_mqtt_messages_dropped_total{reason="backlog"}``);
while an alarm is stored and not yet acknowledged, that limit drops to
:data:`~agent.mqtt.base.ALARM_FIRST_BYTES` (``reason="alarm_first"``). An alarm therefore waits
behind at most that much image data: its latency is bounded by the link, not by the image rate.

Threads: ``publish_*`` are thread-safe and never wait for the network (``publish_alarm`` waits for
one sqlite fsync). ``on_command`` runs in the link's own command thread, one command at a time in
arrival order (neither paho's network thread, whose keep-alive must go on during a slow model
reload, nor the caller's event loop); at most :data:`COMMAND_QUEUE_SIZE` commands wait, more are
answered ``ok: false`` at once. paho's callbacks here only set events, enqueue or publish, and
never take the link's lock, so no lock-order deadlock with paho's internal locks is possible.
"""


from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from prometheus_client import CollectorRegistry

from agent.commands import Command, CommandAuth
from agent.mqtt.commands import CommandQueue
from agent.mqtt.config import MqttConfig
from agent.mqtt.publishers import Publishers
from agent.mqtt.session import CONNECT_TIMEOUT_S, Supervisor
from agent.outbox import Outbox
from agent.schemas import (
    CameraStatePayload,
)
from agent.statedir import outbox_dir

log = logging.getLogger("agent.mqtt")



class MqttLink(Publishers, Supervisor):
    """The agent's connection to the MQTT broker: status, camera states, results, alarms, images, commands.

    Args:
        config: MQTT settings.
        agent_id: Agent identifier (in the status payload; default client id ``fod-agent-<agent_id>``).
        on_command: Called with each valid command, in the link's command thread (one at a time);
            returns the ``result`` dict of the response or raises
            :class:`~agent.commands.CommandError`. None = every command is answered ``ok: false``.
        registry: Prometheus registry for the link's metrics; None = a private one.

    Raises:
        BrokerError: ``password_env`` or ``command_secret_env`` names an unset variable, or a TLS file
            cannot be loaded.
        agent.outbox.OutboxError: ``outbox_dir`` is not writable or used by another agent.
        ValueError: ``agent_id`` is empty.

    Metrics: ``fod_mqtt_connected``, ``fod_mqtt_reconnects_total``,
    ``fod_mqtt_messages_published_total{kind}`` (alarms counted on acknowledgement),
    ``fod_mqtt_messages_dropped_total{kind,reason}``, ``fod_mqtt_commands_total{result}``,
    ``fod_alarm_outbox_depth``, ``fod_alarm_outbox_dropped_total``, ``fod_alarm_outbox_dead_letter_total``,
    ``fod_alarms_total{state}``.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        agent_id: str,
        on_command: Callable[[Command], dict[str, Any]] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not agent_id:
            raise ValueError("agent_id must be a non-empty string")
        self.config = config
        self.agent_id = agent_id
        self.client_id = config.client_id or f"fod-agent-{agent_id}"
        self.root = config.topic_root
        self.status_topic = f"{self.root}/status"
        self.command_filter = f"{self.root}/cmd/#"
        self.response_topic = f"{self.root}/cmd/response"
        self._password = config.password()
        self._ssl_context = config.tls.ssl_context() if config.tls is not None else None

        self.connected = threading.Event()
        """Set while a broker connection is up (after online status and camera states were published)."""

        self._lock = threading.RLock()  # never taken in paho callbacks
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stop_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._states: dict[str, CameraStatePayload] = {}
        self._state_sent_at: dict[str, float] = {}
        self._backend: str | None = None
        self._model: str | None = None
        self._health: tuple[bool | None, tuple[str, ...]] = (None, ())
        self._result_counts: dict[tuple[str, str], int] = {}
        self._image_last: dict[tuple[str, str], float] = {}
        self._sessions = 0
        self._backlog_lock = threading.Lock()  # never held while calling paho
        self._backlog: dict[int, int] = {}
        self._backlog_bytes = 0
        self._backlog_early: set[int] = set()

        self._init_metrics(registry)
        secret = config.command_secret()
        self._commands = CommandQueue(
            self.root,
            on_command=on_command,
            respond=self._respond,
            counter=self._m_commands,
            auth=CommandAuth(secret, max_age_s=config.command_max_age_s) if secret is not None else None,
        )

        self._outbox = Outbox(
            outbox_dir(config.outbox_dir),
            max_messages=config.outbox_max_messages,
            on_drop=self._on_outbox_drop,
            on_dead_letter=self._on_dead_letter,
        )
        self._m_depth.set(len(self._outbox))
        self._earlier_run_seq = self._outbox.last_seq
        self._cleared_topics = ()
        self._plc_retained = {}
        self._broker_max_packet = None

    def clear_retained_on_start_and_stop(self, topics: list[str]) -> None:
        """Topics whose retained message says nothing true across a restart: cleared at start and on stop.

        On the first connection (after the last will may have left them, before any new alarm) and
        after the outbox flush of a clean stop, each topic gets a zero-length retained message, which
        deletes the retained copy on the broker (subscribers receive one empty payload). Alarms left
        in the outbox by an earlier run are delivered as events (``retain`` false): they are history,
        not the current state. Call before :meth:`start`.

        Args:
            topics: full topic names (``<root>/<camera>/alarm``, PLC topics).
        """
        self._cleared_topics = tuple(topics)

    def start(self) -> None:
        """Start connecting in the background (returns at once; reconnects forever until :meth:`stop`).

        Raises:
            RuntimeError: The link was closed.
        """
        if self._outbox.closed:
            raise RuntimeError("MqttLink.start() after close(): create a new MqttLink")
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._commands.start(f"mqtt-commands-{self.agent_id}")
        self._thread = threading.Thread(target=self._run, name=f"mqtt-link-{self.agent_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Flush the outbox, publish ``offline`` (retained) and disconnect; bounded by ``timeout_s``.

        Alarms not acknowledged within the time stay in the outbox for the next start. The outbox
        stays open (alarms raised after ``stop`` are stored); :meth:`close` releases it.

        Args:
            timeout_s: Time budget for flushing, the offline message and the disconnect (s).
        """
        thread = self._thread
        if thread is None:
            return
        self._stop_deadline = time.monotonic() + max(0.0, timeout_s)
        self._stopping.set()
        self._wake.set()
        thread.join(timeout_s + CONNECT_TIMEOUT_S + 1.0)
        if thread.is_alive():
            log.warning("MQTT link thread did not end within %.1f s; abandoning it", timeout_s)
        self._thread = None
        self._commands.stop()
        depth = len(self._outbox)
        if depth:
            log.warning(
                "%d alarm(s) not yet delivered stay in the outbox %s and are sent at the next start",
                depth,
                self._outbox.path,
            )

    def close(self, timeout_s: float = 5.0) -> None:
        """:meth:`stop`, then close the outbox (idempotent).

        Args:
            timeout_s: Passed to :meth:`stop` (s).
        """
        self.stop(timeout_s)
        self._outbox.close()

    def __enter__(self) -> MqttLink:
        """Start the link and return it."""
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the link (stop, then close the outbox)."""
        self.close()

    @property
    def outbox_epoch(self) -> str:
        """Identity of the outbox database (``alarm_epoch`` of the alarms it numbers)."""
        return self._outbox.epoch

    @property
    def outbox_depth(self) -> int:
        """Alarms stored and not yet acknowledged by the broker."""
        return len(self._outbox)

    def _respond(self, body: bytes, client: mqtt.Client | None, topic: str) -> None:
        """Publish a command response (``client`` None: on the live connection, if any)."""
        if client is None:
            with self._lock:
                client = self._client
            if client is None:
                log.warning("response to command on %s not sent: disconnected", topic)
                self._m_dropped.labels("response", "disconnected").inc()
                return
        self._publish(client, self.response_topic, body, 1, False, "response")
