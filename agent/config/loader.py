"""The whole configuration (:class:`AgentConfig`), :func:`load_config` (file + dotted overrides) and
the validation errors that name the key, what is wrong and the fix.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import tomllib
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from agent.config.base import _NAME_RE, _Section
from agent.config.cameras import CameraConfig
from agent.config.sections import DecisionConfig, HttpConfig, LoggingConfig, ModelConfig, PipelineConfig, SnapshotConfig
from agent.errors import ConfigError
from agent.mqtt.config import MqttConfig
from agent.statedir import OUTBOX_SUBDIR, SNAPSHOTS_SUBDIR, default_state_dir


class AgentConfig(_Section):
    """The whole configuration of ``fod-agent`` (``config.toml``)."""

    agent_id: str = Field(
        default="", description="agent id in status messages and MQTT client id; empty = the host name"
    )
    exit_at_end: bool = Field(
        default=False,
        description="stop the agent when every file or folder source has ended (replays, tests)",
    )
    duration_s: float | None = Field(default=None, gt=0, description="stop the agent after this many seconds")
    state_dir: Path | None = Field(
        default=None,
        description="folder of the agent's state (alarm outbox, snapshots); unset = $STATE_DIRECTORY (systemd "
        "StateDirectory=), else $XDG_STATE_HOME/fod-agent, else ~/.local/state/fod-agent",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="[model]")
    cameras: list[CameraConfig] = Field(
        default_factory=lambda: [CameraConfig()],
        min_length=1,
        description="[[cameras]]: one entry per source",
    )
    decision: DecisionConfig = Field(default_factory=DecisionConfig, description="[decision]")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="[pipeline]")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="[mqtt]")
    http: HttpConfig = Field(default_factory=HttpConfig, description="[http]")
    snapshots: SnapshotConfig = Field(default_factory=SnapshotConfig, description="[snapshots]")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="[logging]")

    @field_validator("agent_id")
    @classmethod
    def _default_id(cls, value: str) -> str:
        value = value or socket.gethostname().split(".")[0] or "fod-agent"
        if not _NAME_RE.match(value):
            value = re.sub(r"[^A-Za-z0-9_.-]", "-", value)
        return value

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        names = [camera.name for camera in self.cameras]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"camera names must be unique, repeated: {duplicates}; give each [[cameras]] a name")
        if self.state_dir is None:
            self.state_dir = default_state_dir()
        if self.mqtt.outbox_dir is None:
            self.mqtt = self.mqtt.model_copy(update={"outbox_dir": self.state_dir / OUTBOX_SUBDIR})
        if self.snapshots.dir is None:
            self.snapshots.dir = self.state_dir / SNAPSHOTS_SUBDIR
        return self

    @property
    def snapshots_dir(self) -> Path:
        """The snapshot folder (``snapshots.dir``, resolved against the state directory)."""
        return self.snapshots.dir or (self.state_dir or default_state_dir()) / SNAPSHOTS_SUBDIR

    def camera(self, name: str) -> CameraConfig:
        """The camera called ``name``.

        Raises:
            KeyError: no such camera.
        """
        for camera in self.cameras:
            if camera.name == name:
                return camera
        raise KeyError(name)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Read, merge and validate the configuration.

    Args:
        path: a TOML file; None = defaults only.
        overrides: dotted keys (``"model.path"``, ``"cameras.0.source"``, ``"mqtt.port"``) -> values,
            applied over the file (CLI flags). A list index one past the end appends an entry.

    Returns:
        The validated :class:`AgentConfig`.

    Raises:
        ConfigError: unreadable file, invalid TOML (with line), or a key with an invalid value
            (naming the key, what is wrong and the field's description).
    """
    origin = str(path) if path is not None else "configuration"
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(
                f"{file}: config file not found; pass an existing file with --config (the repository's "
                "config.toml is a commented template)"
            )
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: invalid TOML: {exc}; fix the syntax at that line") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read the config file: {exc}") from exc
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value, origin)
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, origin)) from exc


def _set_dotted(data: dict[str, Any], key: str, value: Any, origin: str) -> None:
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        nxt: Any = value if last else ([] if parts[i + 1].isdigit() else {})
        if isinstance(node, list):
            index = int(part)
            if index == len(node):
                node.append(nxt)
            elif index > len(node):
                raise ConfigError(f"{origin}: override {key!r}: list has {len(node)} entries")
            elif last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, nxt)
        else:
            raise ConfigError(f"{origin}: override {key!r}: {'.'.join(parts[:i])} is not a section")


def _describe(loc: tuple[int | str, ...]) -> str | None:
    model: Any = AgentConfig
    description: str | None = None
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return description
        info = fields[part]
        description = info.description
        annotation = info.annotation
        model = _inner_model(annotation)
    return description


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        inner = _inner_model(arg)
        if inner is not None:
            return inner
    return None


def _explain(exc: ValidationError, origin: str) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged"))))
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            parent = _inner_model_at(loc[:-1])
            valid = sorted(parent.model_fields) if parent is not None else []
            lines.append(f"key '{key}': unknown key; check the spelling (valid keys here: {', '.join(valid)})")
            continue
        text = f"key '{key}': {msg}"
        if error["type"] not in ("value_error", "assertion_error") and "input" in error:
            shown = repr(error["input"])
            text += f" (got {shown[:80]})"
        description = _describe(loc)
        if description and error["type"] != "value_error":
            text += f"; expected: {description}"
        lines.append(text)
    head = f"{origin}: invalid configuration: "
    return head + ("; ".join(lines) if len(lines) == 1 else "\n  " + "\n  ".join(lines))


def _inner_model_at(loc: tuple[int | str, ...]) -> Any:
    model: Any = AgentConfig
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        model = _inner_model(fields[part].annotation)
    return model

