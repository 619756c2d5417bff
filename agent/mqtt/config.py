"""The ``[mqtt]`` section of the agent's configuration: broker, topics, TLS, QoS, outbox.

Pure pydantic models and their validation; imports no runtime module (no paho, no outbox), so
:mod:`agent.config` can load and check a configuration without starting anything.
"""


from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from agent.errors import BrokerError

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

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

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

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

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
    max_packet_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="Largest MQTT packet the broker accepts, bytes (AWS IoT and many managed brokers: 131072); "
        "null = the broker's CONNACK Maximum Packet Size with protocol 5, else no limit. A larger image is "
        "shrunk, or skipped and counted; no publish may exceed it (the broker would drop the connection).",
    )
    protocol: Literal["3.1.1", "5"] = Field(
        default="3.1.1",
        description="MQTT protocol version; 5 lets the agent learn the broker's maximum packet size.",
    )
    state_expiry_s: float = Field(
        default=60.0,
        ge=0.0,
        le=86400.0,
        description="With protocol 5: Message Expiry Interval of the retained <camera>/state (s); the agent "
        "republishes each state every third of it, so after a crash the broker drops a state within this "
        "time instead of keeping 'connected' forever. 0 = never expires. No effect with 3.1.1 (read "
        "<camera>/state together with <root>/status there).",
    )
    plc_topics: bool = Field(
        default=False,
        description="Also publish short tokens for PLCs that read little: <root>/plc/<camera>/<roi>/alarm "
        "('1' NG, '0' OK, retained, QoS 1) and <root>/plc/<camera>/<roi>/score (normalised score, '0.734', QoS 0).",
    )
    reconnect_min_s: float = Field(
        default=0.5, gt=0.0, le=3600.0, description="First reconnect delay (s, at most 3600); doubles per failure."
    )
    reconnect_max_s: float = Field(
        default=30.0, gt=0.0, le=3600.0, description="Cap of the reconnect delay (s, at most 3600)."
    )
    outbox_dir: Path | None = Field(
        default=None,
        description="Folder of the on-disk alarm outbox (one per agent); unset = <state_dir>/outbox. "
        "A relative path is relative to the working directory.",
    )
    outbox_max_messages: int = Field(
        default=10_000,
        ge=1,
        description="Outbox capacity; when full the OLDEST alarm is dropped and counted.",
    )

    commands: bool = Field(
        default=False,
        description=(
            "Accept commands on <root>/cmd/# (off by default: the agent does not subscribe). When on, "
            "command_secret_env is required and every command must be signed (docs/mqtt.md, Commands)."
        ),
    )
    command_secret_env: str | None = Field(
        default=None,
        description="NAME of the environment variable holding the shared command secret (never the secret itself).",
    )
    command_max_age_s: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description="Signed commands older (or newer) than this by the agent's clock are refused (s).",
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

    @field_validator("password_env", "command_secret_env")
    @classmethod
    def _check_env_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(
                f"mqtt.{info.field_name} must be the NAME of an environment variable (like 'FOD_MQTT_SECRET'), "
                f"got {value!r}; never put the secret itself in the config"
            )
        return value

    @model_validator(mode="after")
    def _check_cross(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"mqtt.reconnect_max_s ({self.reconnect_max_s}) must be >= mqtt.reconnect_min_s "
                f"({self.reconnect_min_s})"
            )
        if self.commands and self.command_secret_env is None:
            raise ValueError(
                "mqtt.commands is on but mqtt.command_secret_env is not set: commands must be authenticated; "
                "set command_secret_env to the NAME of a variable holding a long random secret, or commands = false"
            )
        if self.password_env is not None and self.username is None:
            raise ValueError(
                "mqtt.password_env is set but mqtt.username is not: MQTT sends a password only with a user"
            )
        return self

    def command_secret(self) -> str | None:
        """Read the shared command secret from ``command_secret_env`` (None when commands are off).

        Raises:
            BrokerError: The variable is not set or shorter than 16 characters.
        """
        if not self.commands or self.command_secret_env is None:
            return None
        value = os.environ.get(self.command_secret_env, "")
        if len(value) < 16:
            raise BrokerError(
                f"mqtt.commands is on but the environment variable {self.command_secret_env} "
                f"(mqtt.command_secret_env) is {'unset' if not value else 'shorter than 16 characters'}; "
                "export a long random secret, e.g. `openssl rand -hex 32`"
            )
        return value

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
            if self.tls is not None:
                raise BrokerError(
                    f"--broker {scheme}://{parts.hostname} is plain MQTT but config.toml has an [mqtt.tls] section; "
                    f"use --broker mqtts://{parts.hostname} to keep TLS, or remove [mqtt.tls] to connect without it"
                )
            update["tls"] = None
            update["port"] = port or 1883
        if parts.username:
            update["username"] = parts.username
        return MqttConfig.model_validate({**self.model_dump(), **update})

