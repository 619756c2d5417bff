"""Commands the agent accepts on ``<root>/cmd/<command>``: models, parser and error.

A command is a JSON object published on ``<root>/cmd/<name>`` (``name`` is one of
:data:`COMMANDS`). Every command accepts an optional ``request_id`` (string) that is echoed in the
:class:`agent.schemas.CommandResponse` on ``<root>/cmd/response``. An empty payload is the empty
object (handy for ``pause`` / ``resume``). A command that is not valid JSON, names an unknown
command, has unknown keys or out-of-range values raises :class:`CommandError`; the MQTT link
answers ``ok: false`` with the message and applies nothing.

Authentication (:class:`CommandAuth`): commands are off unless ``mqtt.commands = true``, and then
every command carries an ``auth`` object ``{"ts": <unix s>, "nonce": "<8-64 chars>", "hmac": "<hex>"}``
where ``hmac`` is HMAC-SHA256, keyed with the shared secret from the environment variable named by
``mqtt.command_secret_env``, of ``"<name>\n<ts>\n<nonce>\n<canonical JSON of the other keys>"``
(canonical: sorted keys, no spaces; :func:`sign_command` builds it). A command older or newer than
``mqtt.command_max_age_s``, or whose nonce was already used, is refused: a retained command (which
the broker delivers again on every reconnection, with the retain flag cleared when it arrives live)
and the empty message that clears it can never act twice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any, ClassVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import AgentError


class CommandError(AgentError):
    """A command is malformed, unknown, out of range or cannot be applied.

    Raised by :func:`parse_command` and by the agent's command handler (e.g. an unknown camera).
    The message is sent to the operator as ``error`` in the command response.

    Attributes:
        command: Command name (last topic level), when known.
        request_id: ``request_id`` from the payload, when it could be read.
    """

    def __init__(self, message: str, *, command: str | None = None, request_id: str | None = None) -> None:
        """Create the error.

        Args:
            message: What is wrong and how to fix it.
            command: Command name, when known.
            request_id: ``request_id`` of the request, when it could be read.
        """
        super().__init__(message)
        self.command = command
        self.request_id = request_id


class BaseCommand(BaseModel):
    """Base of every command: strict (unknown keys, wrong JSON types rejected), immutable, optional ``request_id``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: ClassVar[str]
    """Command name: the last level of the topic ``<root>/cmd/<name>``."""
    example: ClassVar[dict[str, Any]]
    """A valid example payload (for docs and error messages)."""

    request_id: str | None = Field(
        default=None, max_length=200, description="Echoed in the response so the caller can match it."
    )


class SetThreshold(BaseCommand):
    """Set the raw decision threshold of one camera (all its ROIs, or one ROI) at run time."""

    name: ClassVar[str] = "set_threshold"
    example: ClassVar[dict[str, Any]] = {
        "camera": "cam0",
        "roi": "full",
        "threshold": 1.25,
        "request_id": "r1",
    }

    camera: str = Field(min_length=1, description="Camera name.")
    roi: str | None = Field(default=None, min_length=1, description="ROI name; null or absent = every ROI.")
    threshold: float = Field(gt=0.0, description="New raw threshold (model score units, > 0, finite).")

    @field_validator("threshold")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("threshold must be a finite number")
        return value


class Snapshot(BaseCommand):
    """Save the next frame of a camera (frame, mask, overlay, result JSON) as a snapshot."""

    name: ClassVar[str] = "snapshot"
    example: ClassVar[dict[str, Any]] = {"camera": "cam0"}

    camera: str = Field(min_length=1, description="Camera name.")


class ReloadModel(BaseCommand):
    """Reload the model package (or engine) from disk; ``path`` switches to another one."""

    name: ClassVar[str] = "reload_model"
    example: ClassVar[dict[str, Any]] = {"path": "/opt/fod/models/mt"}

    path: str | None = Field(
        default=None,
        min_length=1,
        description="Model package folder or engine file; null = reload the current one.",
    )


class Pause(BaseCommand):
    """Stop scoring (capture keeps running, status stays online) until ``resume``."""

    name: ClassVar[str] = "pause"
    example: ClassVar[dict[str, Any]] = {}


class Resume(BaseCommand):
    """Resume scoring after ``pause``."""

    name: ClassVar[str] = "resume"
    example: ClassVar[dict[str, Any]] = {}


Command = SetThreshold | Snapshot | ReloadModel | Pause | Resume
"""Any parsed command."""

COMMANDS: dict[str, type[BaseCommand]] = {
    cls.name: cls for cls in (SetThreshold, Snapshot, ReloadModel, Pause, Resume)
}
"""Command name (topic level) -> model."""


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<payload>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


AUTH_KEY = "auth"
"""Key of the authentication object in a command payload."""


def _mac(secret: bytes, name: str, ts: float, nonce: str, data: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in data.items() if k != AUTH_KEY}, sort_keys=True, separators=(",", ":"))
    message = f"{name}\n{ts!r}\n{nonce}\n{body}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign_command(
    name: str, data: dict[str, Any], secret: str, *, now: float | None = None, nonce: str | None = None
) -> dict[str, Any]:
    """Return ``data`` with an ``auth`` object that :class:`CommandAuth` accepts.

    Args:
        name: Command name (topic level).
        data: The command's keys (without ``auth``).
        secret: The shared secret (the value of the variable named by ``mqtt.command_secret_env``).
        now: Unix time (s) to sign with; None = now.
        nonce: Unique string (8-64 chars); None = random.

    Example:
        >>> signed = sign_command("pause", {}, "s3cret", now=1.0, nonce="abcdefgh")
        >>> sorted(signed["auth"])
        ['hmac', 'nonce', 'ts']
    """
    ts = float(time.time() if now is None else now)
    nonce = nonce if nonce is not None else secrets.token_hex(8)
    body = {k: v for k, v in data.items() if k != AUTH_KEY}
    mac = _mac(secret.encode(), name, ts, nonce, body)
    return {**body, AUTH_KEY: {"ts": ts, "nonce": nonce, "hmac": mac}}


class CommandAuth:
    """Checks the ``auth`` object of commands: HMAC with a shared secret, freshness, no replay. Thread-safe.

    Args:
        secret: The shared secret (non-empty).
        max_age_s: A command whose ``ts`` differs from the agent's clock by more is refused (s).

    Raises:
        ValueError: Empty secret or ``max_age_s <= 0``.
    """

    MAX_NONCES = 10_000

    def __init__(self, secret: str, *, max_age_s: float) -> None:
        if not secret:
            raise ValueError("the command secret is empty")
        if not max_age_s > 0:
            raise ValueError(f"max_age_s must be > 0, got {max_age_s}")
        self._secret = secret.encode()
        self.max_age_s = max_age_s
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, name: str, data: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        """Verify ``data["auth"]`` and return the command's keys without it.

        Raises:
            CommandError: Missing or malformed ``auth``, wrong HMAC, stale or future ``ts``, reused nonce.
        """
        now = time.time() if now is None else now
        auth = data.get(AUTH_KEY)
        hint = "sign it with agent.commands.sign_command (see docs/mqtt.md, Commands)"
        if not isinstance(auth, dict) or set(auth) != {"ts", "nonce", "hmac"}:
            raise CommandError(f"cmd/{name} is not authenticated: it needs an auth object; {hint}", command=name)
        ts, nonce, mac = auth["ts"], auth["nonce"], auth["hmac"]
        if (
            not isinstance(ts, int | float)
            or isinstance(ts, bool)
            or not math.isfinite(ts)
            or not isinstance(nonce, str)
            or not 8 <= len(nonce) <= 64
            or not isinstance(mac, str)
        ):
            raise CommandError(f"cmd/{name}: malformed auth object; {hint}", command=name)
        expected = _mac(self._secret, name, float(ts), nonce, data)
        if not hmac.compare_digest(expected, mac):
            raise CommandError(f"cmd/{name}: authentication failed (wrong secret or altered payload)", command=name)
        if abs(now - ts) > self.max_age_s:
            raise CommandError(
                f"cmd/{name}: stale command (signed {now - ts:.0f} s from now, limit {self.max_age_s:g} s): "
                "retained or replayed commands never run; check the sender's clock",
                command=name,
            )
        with self._lock:
            horizon = now - 2 * self.max_age_s
            while self._seen and (len(self._seen) >= self.MAX_NONCES or next(iter(self._seen.values())) < horizon):
                self._seen.popitem(last=False)
            if nonce in self._seen:
                raise CommandError(
                    f"cmd/{name}: nonce already used (a replayed command never runs twice)", command=name
                )
            self._seen[nonce] = now
        return {k: v for k, v in data.items() if k != AUTH_KEY}


def parse_command(name: str, payload: bytes, *, auth: CommandAuth | None = None) -> Command:
    """Parse and validate one command.

    Args:
        name: Command name, the last level of the topic ``<root>/cmd/<name>``.
        payload: Raw MQTT payload: a UTF-8 JSON object, or empty (= ``{}``).
        auth: When given, the payload must carry a valid ``auth`` object (see :class:`CommandAuth`).

    Returns:
        The validated command model (immutable).

    Raises:
        CommandError: Unknown command, payload not UTF-8 JSON, not an object, unknown keys or
            values out of range. The message names the command, the key and a valid example;
            ``request_id`` is filled in when the payload had a readable one.
    """
    cls = COMMANDS.get(name)
    if cls is None:
        raise CommandError(
            f"unknown command {name!r} (topic cmd/{name}); known commands: {', '.join(sorted(COMMANDS))}",
            command=name,
        )
    text = payload.strip()
    if not text:
        data: Any = {}
    else:
        try:
            data = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CommandError(
                f"payload of cmd/{name} is not valid UTF-8 JSON ({exc}); "
                f"send an object such as {json.dumps(cls.example)}",
                command=name,
            ) from exc
    if not isinstance(data, dict):
        raise CommandError(
            f"payload of cmd/{name} must be a JSON object, got {type(data).__name__}; "
            f"send an object such as {json.dumps(cls.example)}",
            command=name,
        )
    raw_id = data.get("request_id")
    request_id = raw_id if isinstance(raw_id, str) else None
    if auth is not None:
        try:
            data = auth.check(name, data)
        except CommandError as exc:
            exc.request_id = request_id
            raise
    try:
        command = cls.model_validate(data)
    except ValidationError as exc:
        raise CommandError(
            f"invalid cmd/{name}: {_format_validation(exc)}; example: {json.dumps(cls.example)}",
            command=name,
            request_id=request_id,
        ) from exc
    return cast(Command, command)
