"""Commands the agent accepts on ``<root>/cmd/<command>``: models, parser and error.

A command is a JSON object published on ``<root>/cmd/<name>`` (``name`` is one of
:data:`COMMANDS`). Every command accepts an optional ``request_id`` (string) that is echoed in the
:class:`agent.schemas.CommandResponse` on ``<root>/cmd/response``. An empty payload is the empty
object (handy for ``pause`` / ``resume``). A command that is not valid JSON, names an unknown
command, has unknown keys or out-of-range values raises :class:`CommandError`; the MQTT link
answers ``ok: false`` with the message and applies nothing.
"""

from __future__ import annotations

import json
import math
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
    """Base of every command: strict (unknown keys rejected), immutable, optional ``request_id``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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


def parse_command(name: str, payload: bytes) -> Command:
    """Parse and validate one command.

    Args:
        name: Command name, the last level of the topic ``<root>/cmd/<name>``.
        payload: Raw MQTT payload: a UTF-8 JSON object, or empty (= ``{}``).

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
    try:
        command = cls.model_validate(data)
    except ValidationError as exc:
        raise CommandError(
            f"invalid cmd/{name}: {_format_validation(exc)}; example: {json.dumps(cls.example)}",
            command=name,
            request_id=request_id,
        ) from exc
    return cast(Command, command)
