"""The agent's MQTT link: configuration, connection supervisor, publishers and command handling.

:class:`MqttLink` owns one broker connection (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``,
network loop in paho's thread via ``loop_start``) and a supervisor thread that connects, reconnects
forever with capped exponential back-off (``reconnect_min_s`` doubling up to ``reconnect_max_s``)
and delivers alarms from the on-disk outbox (:mod:`agent.outbox`).

On every (re)connection, in this order: subscribe ``<root>/cmd/#``; publish ``online`` on
``<root>/status`` (retained); republish the latest state of every camera (retained); deliver the
outbox from its oldest entry, in order, at most :data:`ALARM_WINDOW` unacknowledged at a time. An
alarm leaves the outbox only when the broker acknowledged it (PUBACK for QoS 1, PUBCOMP for QoS 2).

Each connection uses a fresh paho client (paho's own auto-reconnect is off). That is deliberate:
paho would re-send its in-memory copies of unacknowledged messages after a reconnect, *after*
anything published from ``on_connect``, which can reorder alarms and resurrect stale retained
camera states. With a fresh client the outbox is the only source of alarms and the order on the
wire is always the outbox order. Delivery is at-least-once: an alarm whose PUBACK was lost with the
connection is sent again on the next connection; consumers drop repeats by ``alarm_seq``.

The Last Will is a retained ``offline`` :class:`~agent.schemas.StatusPayload` on ``<root>/status``;
:meth:`MqttLink.stop` flushes the outbox (bounded by its timeout), publishes ``offline`` itself and
disconnects cleanly.

Threads: ``publish_*`` are thread-safe and never wait for the network (``publish_alarm`` waits for
one sqlite fsync). ``on_command`` runs in the link's own command thread, one command at a time in
arrival order (neither paho's network thread, whose keep-alive must go on during a slow model
reload, nor the caller's event loop); at most :data:`COMMAND_QUEUE_SIZE` commands wait, more are
answered ``ok: false`` at once. paho's callbacks here only set events, enqueue or publish, and
never take the link's lock, so no lock-order deadlock with paho's internal locks is possible.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent import __version__
from agent.commands import Command, CommandError, parse_command
from agent.errors import BrokerError
from agent.outbox import Outbox, OutboxEntry
from agent.schemas import (
    AlarmPayload,
    CameraStatePayload,
    CommandResponse,
    ResultPayload,
    StatusPayload,
    Verdict,
)

log = logging.getLogger(__name__)

ALARM_WINDOW = 20
"""Most alarms handed to the connection and not yet acknowledged."""
CONNECT_TIMEOUT_S = 5.0
"""TCP/TLS connect and CONNACK wait per attempt (s)."""
COMMAND_QUEUE_SIZE = 16
"""Commands waiting for the command thread; further ones are refused with ``ok: false``."""

ImageKind = Literal["mask", "overlay"]
"""Binary image topics: ``mask`` (PNG, binary mask at frame size) and ``overlay`` (JPEG heatmap)."""

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def validate_topic_level(name: str, what: str = "camera name") -> str:
    """Check that ``name`` can be one MQTT topic level.

    Args:
        name: Candidate level (e.g. a camera name).
        what: What it is, for the error message (``"camera name"``, ``"ROI name"``).

    Returns:
        ``name`` unchanged.

    Raises:
        ValueError: Empty, or contains ``/``, ``+``, ``#`` or a NUL character.
    """
    if not name or any(c in name for c in "/+#\x00"):
        raise ValueError(
            f"{what} {name!r} cannot be an MQTT topic level: use a non-empty name without '/', '+', '#'"
        )
    return name


class MqttTlsConfig(BaseModel):
    """TLS settings of the broker connection (``[mqtt.tls]``); present = TLS on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: Path | None = Field(
        default=None,
        description="CA certificate (PEM) that signed the broker's certificate; null = the system CA store.",
    )
    cert_file: Path | None = Field(
        default=None, description="Client certificate (PEM) for mutual TLS; set together with key_file."
    )
    key_file: Path | None = Field(
        default=None, description="Private key (PEM, unencrypted) of cert_file; set together with cert_file."
    )
    insecure: bool = Field(
        default=False,
        description="Skip the broker host-name check (commissioning only; the chain is still verified).",
    )

    @model_validator(mode="after")
    def _check_files(self) -> MqttTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "mqtt.tls.cert_file and mqtt.tls.key_file go together: "
                "set both (client certificate) or neither"
            )
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ValueError(
                    f"mqtt.tls.{key} = {str(path)!r} is not a file; fix the path or remove the key"
                )
        return self

    def ssl_context(self) -> ssl.SSLContext:
        """Build the client TLS context (TLS 1.2+, certificate verification on).

        Returns:
            A context for ``paho.mqtt.client.Client.tls_set_context``.

        Raises:
            BrokerError: A certificate or key file cannot be loaded (names the file).
        """
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(
                f"cannot load mqtt.tls.ca_file {self.ca_file}: {exc}; give a PEM CA file"
            ) from exc
        if self.cert_file is not None and self.key_file is not None:
            try:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
            except (OSError, ssl.SSLError) as exc:
                raise BrokerError(
                    f"cannot load client certificate mqtt.tls.cert_file {self.cert_file} with key "
                    f"{self.key_file}: {exc}; give a PEM certificate and its unencrypted PEM key"
                ) from exc
        if self.insecure:
            ctx.check_hostname = False
        return ctx


class MqttConfig(BaseModel):
    """MQTT settings of the agent (the ``[mqtt]`` section of ``config.toml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="localhost", min_length=1, description="Broker host name or IP address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker TCP port (1883 plain, 8883 TLS).")
    topic_root: str = Field(
        default="fod/site/line/agent",
        description="Prefix of every topic, e.g. fod/<site>/<line>/<agent_id>; no wildcards, no leading '/'.",
    )
    client_id: str | None = Field(
        default=None,
        description="MQTT client id, unique per broker; null = 'fod-agent-<agent_id>'.",
    )
    keepalive_s: int = Field(
        default=30,
        ge=5,
        le=3600,
        description="Keep-alive interval (s); the broker sends the will after ~1.5x.",
    )
    username: str | None = Field(default=None, description="User name; null = anonymous.")
    password_env: str | None = Field(
        default=None,
        description="NAME of the environment variable holding the password (never the password itself).",
    )
    tls: MqttTlsConfig | None = Field(default=None, description="TLS settings; absent = plain TCP.")
    qos_result: Literal[0, 1, 2] = Field(default=0, description="QoS of <camera>/result messages.")
    qos_alarm: Literal[1, 2] = Field(
        default=1, description="QoS of <camera>/alarm messages (>= 1: the outbox needs acknowledgements)."
    )
    qos_state: Literal[0, 1, 2] = Field(default=1, description="QoS of <camera>/state messages.")
    result_every_k: int = Field(
        default=1,
        ge=1,
        description="Publish every k-th scored frame per camera and ROI on <camera>/result (1 = all).",
    )
    images: Literal["ng", "all", "never"] = Field(
        default="ng", description="Which frames get <camera>/mask and <camera>/overlay: ng | all | never."
    )
    image_min_interval_s: float = Field(
        default=1.0, ge=0.0, description="Minimum time between two images of one kind per camera (s)."
    )
    reconnect_min_s: float = Field(
        default=0.5, gt=0.0, description="First reconnect delay (s); doubles per failure."
    )
    reconnect_max_s: float = Field(default=30.0, gt=0.0, description="Cap of the reconnect delay (s).")
    outbox_dir: Path = Field(
        default=Path("var/outbox"),
        description="Folder of the on-disk alarm outbox (one per agent); relative to the working directory.",
    )
    outbox_max_messages: int = Field(
        default=10_000,
        ge=1,
        description="Outbox capacity; when full the OLDEST alarm is dropped and counted.",
    )

    @field_validator("topic_root")
    @classmethod
    def _check_root(cls, value: str) -> str:
        levels = value.split("/")
        if (
            not value
            or value.startswith("$")
            or any(not level for level in levels)
            or any(c in value for c in "+#\x00")
        ):
            raise ValueError(
                f"mqtt.topic_root {value!r} is not a valid topic prefix: use levels separated by '/', "
                "no empty level (no leading/trailing '/'), no '+', '#' or leading '$', "
                "e.g. 'fod/site1/line2/agent1'"
            )
        return value

    @field_validator("password_env")
    @classmethod
    def _check_env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(
                f"mqtt.password_env must be the NAME of an environment variable (like 'FOD_MQTT_PASSWORD'), "
                f"got {value!r}; never put the password itself in the config"
            )
        return value

    @model_validator(mode="after")
    def _check_cross(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"mqtt.reconnect_max_s ({self.reconnect_max_s}) must be >= mqtt.reconnect_min_s "
                f"({self.reconnect_min_s})"
            )
        if self.password_env is not None and self.username is None:
            raise ValueError(
                "mqtt.password_env is set but mqtt.username is not: MQTT sends a password only with a user"
            )
        return self

    def password(self) -> str | None:
        """Read the password from the environment variable named by ``password_env``.

        Returns:
            The password, or None when ``password_env`` is not set.

        Raises:
            BrokerError: ``password_env`` names a variable that is not set (the message names it).
        """
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if value is None:
            raise BrokerError(
                f"mqtt.password_env is {self.password_env!r} but the environment variable "
                f"{self.password_env} "
                f"is not set; export {self.password_env}=<password> before starting fod-agent "
                "(systemd: Environment= or EnvironmentFile=), or remove mqtt.password_env"
            )
        return value

    def with_broker_url(self, url: str) -> MqttConfig:
        """Copy of this config pointing at ``mqtt://[user@]host[:port]`` or ``mqtts://`` (``--broker``).

        ``mqtts`` turns TLS on (system CA store unless ``tls`` is already configured) and defaults
        the port to 8883; ``mqtt`` turns TLS off and defaults the port to 1883.

        Args:
            url: Broker URL. A password in the URL is refused (use ``password_env``).

        Returns:
            A new, validated config.

        Raises:
            BrokerError: Unknown scheme, missing host, bad port or a password in the URL.
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise BrokerError(
                f"--broker {url!r}: {exc}; expected mqtt://host:port or mqtts://host:port"
            ) from exc
        scheme = parts.scheme.lower()
        if scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise BrokerError(f"--broker {url!r} is not mqtt://host[:port] or mqtts://host[:port]")
        if parts.password is not None:
            raise BrokerError(
                f"--broker {parts.scheme}://{parts.username}:***@{parts.hostname}: "
                "do not put the password in the "
                "URL; set mqtt.password_env to the name of an environment variable that holds it"
            )
        update: dict[str, Any] = {"host": parts.hostname}
        if scheme == "mqtts":
            update["tls"] = self.tls or MqttTlsConfig()
            update["port"] = port or 8883
        else:
            update["tls"] = None
            update["port"] = port or 1883
        if parts.username:
            update["username"] = parts.username
        return MqttConfig.model_validate({**self.model_dump(), **update})


class _Session:
    """Per-connection state shared with paho's callbacks (events only)."""

    def __init__(self) -> None:
        self.connack = threading.Event()
        self.reason: Any = None
        self.lost = threading.Event()
        self.lost_reason: Any = None


class MqttLink:
    """The agent's connection to the MQTT broker: status, camera states, results, alarms, images, commands.

    Args:
        config: MQTT settings.
        agent_id: Agent identifier (in the status payload; default client id ``fod-agent-<agent_id>``).
        on_command: Called with each valid command, in the link's command thread (one at a time);
            returns the ``result`` dict of the response or raises
            :class:`~agent.commands.CommandError`. None = every command is answered ``ok: false``.
        registry: Prometheus registry for the link's metrics; None = a private one.

    Raises:
        BrokerError: ``password_env`` names an unset variable, or a TLS file cannot be loaded.
        agent.outbox.OutboxError: ``outbox_dir`` is not writable or used by another agent.
        ValueError: ``agent_id`` is empty.

    Metrics: ``fod_mqtt_connected``, ``fod_mqtt_reconnects_total``,
    ``fod_mqtt_messages_published_total{kind}`` (alarms counted on acknowledgement),
    ``fod_mqtt_messages_dropped_total{kind,reason}``, ``fod_mqtt_commands_total{result}``,
    ``fod_alarm_outbox_depth``, ``fod_alarm_outbox_dropped_total``, ``fod_alarms_total{state}``.
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
        self._cmd_prefix = f"{self.root}/cmd/"
        self._password = config.password()
        self._ssl_context = config.tls.ssl_context() if config.tls is not None else None
        self._on_command = on_command

        self.connected = threading.Event()
        """Set while a broker connection is up (after online status and camera states were published)."""

        self._lock = threading.RLock()  # never taken in paho callbacks
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stop_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._states: dict[str, CameraStatePayload] = {}
        self._backend: str | None = None
        self._model: str | None = None
        self._result_counts: dict[tuple[str, str], int] = {}
        self._image_last: dict[tuple[str, str], float] = {}
        self._sessions = 0
        self._commands: queue.Queue[tuple[str, str, bytes, bool] | None] = queue.Queue(COMMAND_QUEUE_SIZE)
        self._command_thread: threading.Thread | None = None

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
            "Messages not published: reason=disconnected (results, images) or rate_limit (images)",
            ["kind", "reason"],
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
        self._m_alarms = Counter(
            "fod_alarms_total", "Alarms raised, by new state (NG | OK)", ["state"], registry=reg
        )

        self._outbox = Outbox(
            Path(config.outbox_dir), max_messages=config.outbox_max_messages, on_drop=self._on_outbox_drop
        )
        self._m_depth.set(len(self._outbox))

    # ------------------------------------------------------------------ lifecycle

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
        self._commands = queue.Queue(COMMAND_QUEUE_SIZE)
        self._command_thread = threading.Thread(
            target=self._command_worker,
            args=(self._commands,),
            name=f"mqtt-commands-{self.agent_id}",
            daemon=True,
        )
        self._command_thread.start()
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
        self._stop_command_worker()
        if self._command_thread is not None:
            self._command_thread.join(1.0)  # a handler stuck in a slow command is abandoned (daemon)
            self._command_thread = None
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
    def outbox_depth(self) -> int:
        """Alarms stored and not yet acknowledged by the broker."""
        return len(self._outbox)

    # ------------------------------------------------------------------ publishers

    def set_status_info(self, *, backend: str | None = None, model: str | None = None) -> None:
        """Set the backend / model named in the status payload; republishes ``online`` when connected.

        Args:
            backend: Inference backend (``tensorrt`` | ``onnxruntime``), or None to keep the current one.
            model: Model package or engine (name or path), or None to keep the current one.
        """
        with self._lock:
            if backend is not None:
                self._backend = backend
            if model is not None:
                self._model = model
            if self._client is not None:
                self._publish_status(self._client, "online")

    def publish_status_online(self) -> bool:
        """Publish the retained ``online`` status now (it is also sent on every connection).

        Returns:
            True when handed to a live connection, False when disconnected.
        """
        with self._lock:
            if self._client is None:
                return False
            return self._publish_status(self._client, "online")

    def publish_camera_state(self, camera: str, state: CameraStatePayload) -> bool:
        """Publish the retained state of a camera on ``<root>/<camera>/state`` (QoS ``qos_state``).

        The latest state per camera is kept and republished on every reconnection, so it is never
        lost while the broker is away.

        Args:
            camera: Camera name (one topic level, equal to ``state.camera``).
            state: The state payload.

        Returns:
            True when handed to a live connection, False when disconnected (sent on reconnection).

        Raises:
            ValueError: Invalid camera name, or it differs from ``state.camera``.
        """
        self._check_camera(camera, state.camera)
        with self._lock:
            self._states[camera] = state
            if self._client is None:
                return False
            return self._publish_state(self._client, camera, state)

    def publish_result(self, camera: str, result: ResultPayload) -> bool:
        """Publish a scored frame on ``<root>/<camera>/result`` (QoS ``qos_result``, not retained).

        Only every ``result_every_k``-th call per camera and ROI publishes (the 1st, the k+1-th,
        ...). Dropped (and counted) while disconnected.

        Args:
            camera: Camera name (equal to ``result.camera``).
            result: The result payload.

        Returns:
            True when handed to a live connection.

        Raises:
            ValueError: Invalid camera name, or it differs from ``result.camera``.
        """
        self._check_camera(camera, result.camera)
        with self._lock:
            key = (camera, result.roi)
            n = self._result_counts.get(key, 0)
            self._result_counts[key] = n + 1
            client = self._client
        if n % self.config.result_every_k:
            return False
        if client is None:
            self._m_dropped.labels("result", "disconnected").inc()
            return False
        return self._publish(
            client, f"{self.root}/{camera}/result", result.to_json(), self.config.qos_result, False, "result"
        )

    def publish_alarm(self, camera: str, alarm: AlarmPayload) -> AlarmPayload:
        """Store an alarm in the on-disk outbox, then deliver it in order (QoS ``qos_alarm``, retained).

        The outbox assigns ``alarm_seq`` (any value in ``alarm`` is replaced). The alarm is durable
        when this returns (one fsync); it is delivered as soon as the broker is reachable, after
        every earlier alarm, and never dropped unless the outbox overflows (see :mod:`agent.outbox`).

        Args:
            camera: Camera name (equal to ``alarm.camera``).
            alarm: The transition.

        Returns:
            The payload as published, with its ``alarm_seq``.

        Raises:
            ValueError: Invalid camera name, or it differs from ``alarm.camera``.
            agent.outbox.OutboxError: The outbox cannot be written (disk full).
        """
        self._check_camera(camera, alarm.camera)
        stored: list[AlarmPayload] = []

        def make(seq: int) -> bytes:
            stored.append(alarm.model_copy(update={"alarm_seq": seq}))
            return stored[-1].to_json()

        self._outbox.add(f"{self.root}/{camera}/alarm", make)
        self._m_alarms.labels(alarm.state).inc()
        self._m_depth.set(len(self._outbox))
        self._wake.set()
        return stored[-1]

    def image_wanted(self, camera: str, kind: ImageKind, verdict: Verdict) -> bool:
        """Whether :meth:`publish_image` would publish now (check before encoding a PNG/JPEG).

        Args:
            camera: Camera name.
            kind: ``mask`` or ``overlay``.
            verdict: Verdict of the frame (``images = "ng"`` publishes NG frames only).

        Returns:
            False for ``images = "never"``, an OK frame with ``images = "ng"``, while disconnected,
            or within ``image_min_interval_s`` of the last image of this kind and camera.
        """
        policy = self.config.images
        if policy == "never" or (policy == "ng" and verdict != "NG"):
            return False
        with self._lock:
            if self._client is None:
                return False
            last = self._image_last.get((camera, kind))
        return last is None or time.monotonic() - last >= self.config.image_min_interval_s

    def publish_image(self, camera: str, kind: ImageKind, data: bytes) -> bool:
        """Publish raw image bytes on ``<root>/<camera>/<kind>`` (QoS 0, not retained), rate-limited.

        The caller decides which frames qualify (see :meth:`image_wanted`); this method enforces
        ``images = "never"``, ``image_min_interval_s`` per camera and kind, and drops the image
        while disconnected.

        Args:
            camera: Camera name.
            kind: ``mask`` (PNG) or ``overlay`` (JPEG).
            data: Encoded image bytes.

        Returns:
            True when handed to a live connection.

        Raises:
            ValueError: Invalid camera name or kind.
        """
        validate_topic_level(camera)
        if kind not in ("mask", "overlay"):
            raise ValueError(f"image kind must be 'mask' or 'overlay', got {kind!r}")
        if self.config.images == "never":
            return False
        now = time.monotonic()
        with self._lock:
            last = self._image_last.get((camera, kind))
            if last is not None and now - last < self.config.image_min_interval_s:
                self._m_dropped.labels(kind, "rate_limit").inc()
                return False
            client = self._client
            if client is None:
                self._m_dropped.labels(kind, "disconnected").inc()
                return False
            self._image_last[(camera, kind)] = now
        return self._publish(client, f"{self.root}/{camera}/{kind}", data, 0, False, kind)

    # ------------------------------------------------------------------ internals: publishing

    @staticmethod
    def _check_camera(camera: str, in_payload: str) -> None:
        validate_topic_level(camera)
        if camera != in_payload:
            raise ValueError(f"camera {camera!r} differs from the payload's camera {in_payload!r}")

    def _publish(
        self, client: mqtt.Client, topic: str, payload: bytes, qos: int, retain: bool, kind: str
    ) -> bool:
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._m_published.labels(kind).inc()
            return True
        self._m_dropped.labels(kind, "disconnected").inc()
        return False

    def _status_payload(self, state: Literal["online", "offline"]) -> StatusPayload:
        return StatusPayload(
            agent_id=self.agent_id,
            state=state,
            ts=time.time(),
            version=__version__,
            backend=self._backend,
            model=self._model,
        )

    def _publish_status(self, client: mqtt.Client, state: Literal["online", "offline"]) -> bool:
        return self._publish(
            client, self.status_topic, self._status_payload(state).to_json(), 1, True, "status"
        )

    def _publish_state(self, client: mqtt.Client, camera: str, state: CameraStatePayload) -> bool:
        return self._publish(
            client, f"{self.root}/{camera}/state", state.to_json(), self.config.qos_state, True, "state"
        )

    def _on_outbox_drop(self, entry: OutboxEntry) -> None:
        self._m_outbox_dropped.inc()

    # ------------------------------------------------------------------ internals: connection supervisor

    def _new_client(self, session: _Session) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            reconnect_on_failure=False,
        )
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.max_inflight_messages_set(ALARM_WINDOW + 80)
        client.max_queued_messages_set(1000)
        client.enable_logger(logging.getLogger("agent.mqtt.paho"))
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self._password)
        if self._ssl_context is not None:
            client.tls_set_context(self._ssl_context)
        with self._lock:
            will = self._status_payload("offline").to_json()
        client.will_set(self.status_topic, will, qos=1, retain=True)

        def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            session.reason = reason
            session.connack.set()

        def on_disconnect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            session.lost_reason = reason
            session.lost.set()
            session.connack.set()
            self._wake.set()

        def on_publish(c: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            self._wake.set()

        def on_message(c: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            try:
                self._enqueue_command(c, message)
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
            client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        except (OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
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
        delay = self.config.reconnect_min_s
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
                if self._stopping.wait(delay):
                    break
                delay = min(delay * 2, self.config.reconnect_max_s)
                continue
            failing = False
            delay = self.config.reconnect_min_s
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
            if self._stopping.wait(delay):
                break

    def _session(self, client: mqtt.Client, session: _Session) -> bool:
        """Run one connection; return True when it ended because of :meth:`stop` (still connected)."""
        with self._lock:  # held until _client is set, so a command response never finds it unset
            client.subscribe(self.command_filter, qos=1)
            self._publish_status(client, "online")
            for camera, state in self._states.items():
                self._publish_state(client, camera, state)
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
                    info = client.publish(entry.topic, entry.payload, qos=self.config.qos_alarm, retain=True)
                    inflight.append((entry.seq, info))
                    last_seq = entry.seq
                    if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
            self._wake.wait(0.05 if self._stopping.is_set() else 0.5)
        return False

    def _offline_reserve_s(self) -> float:
        return 0.5

    def _end_session(self, client: mqtt.Client, graceful: bool) -> None:
        with self._lock:
            self._client = None
            self.connected.clear()
            self._m_connected.set(0)
        try:
            if graceful:
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

    # ------------------------------------------------------------------ internals: commands

    def _enqueue_command(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        """In paho's thread: hand a command to the command thread, or refuse it at once when too many wait."""
        topic = message.topic
        if not topic.startswith(self._cmd_prefix) or topic == self.response_topic:
            return
        name = topic[len(self._cmd_prefix) :]
        try:
            self._commands.put_nowait((topic, name, bytes(message.payload), bool(message.retain)))
        except queue.Full:
            log.warning("command on %s refused: %d commands already waiting", topic, COMMAND_QUEUE_SIZE)
            self._m_commands.labels("error").inc()
            body = CommandResponse(
                command=name,
                ok=False,
                error=f"agent busy: {COMMAND_QUEUE_SIZE} commands are waiting; retry later",
            ).to_json()
            self._publish(client, self.response_topic, body, 1, False, "response")

    def _stop_command_worker(self) -> None:
        """Discard commands still waiting (nobody can receive their response) and end the worker."""
        discarded = 0
        while True:
            try:
                if self._commands.get_nowait() is not None:
                    discarded += 1
            except queue.Empty:
                break
        if discarded:
            log.warning("%d command(s) received before stop were not applied", discarded)
        self._commands.put_nowait(None)

    def _command_worker(self, commands: queue.Queue[tuple[str, str, bytes, bool] | None]) -> None:
        """Command thread: apply commands in arrival order and publish each response."""
        while True:
            item = commands.get()
            if item is None:
                return
            topic, name, payload, retain = item
            try:
                body = self._apply_command(topic, name, payload, retain)
            except Exception:  # the response itself failed to serialise; keep the thread alive
                log.exception("command on %s failed", topic)
                continue
            with self._lock:
                client = self._client
            if client is None:
                log.warning("response to command on %s not sent: disconnected", topic)
                self._m_dropped.labels("response", "disconnected").inc()
            else:
                self._publish(client, self.response_topic, body, 1, False, "response")

    def _apply_command(self, topic: str, name: str, payload: bytes, retain: bool) -> bytes:
        """Validate and apply one command; return the JSON of its :class:`CommandResponse`."""
        request_id: str | None = None
        try:
            if retain:
                raise CommandError(
                    f"retained command on {topic} ignored: commands act once, "
                    "publish them without the retain "
                    f"flag; clear it with: mosquitto_pub -r -n -t '{topic}'",
                    command=name,
                )
            command = parse_command(name, payload)
            request_id = command.request_id
            if self._on_command is None:
                raise CommandError("this agent does not accept commands (no command handler)", command=name)
            result = self._on_command(command)
            body = CommandResponse(
                request_id=request_id, command=name, ok=True, result=dict(result or {})
            ).to_json()
            log.info("command %s applied: %s", name, command)
            self._m_commands.labels("ok").inc()
        except CommandError as exc:
            log.warning("command on %s rejected: %s", topic, exc)
            rid = exc.request_id if exc.request_id is not None else request_id
            body = CommandResponse(request_id=rid, command=name, ok=False, error=str(exc)).to_json()
            self._m_commands.labels("error").inc()
        except Exception as exc:
            log.exception("command %s failed", name)
            body = CommandResponse(
                request_id=request_id,
                command=name,
                ok=False,
                error=f"internal error while applying {name}: {type(exc).__name__}: {exc}",
            ).to_json()
            self._m_commands.labels("error").inc()
        return body
