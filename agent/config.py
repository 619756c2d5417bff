"""The agent's configuration: ``config.toml`` parsed into strict pydantic models.

Every section forbids unknown keys, every field has a description (``docs/config.md`` is generated
from them by :func:`config_reference_markdown`) and units are in the field names. Errors name the
file, the key (``cameras.0.rois.1.box_px``) and the fix. CLI flags override the file through
:func:`load_config`'s ``overrides`` (dotted keys). Relative paths are relative to the working
directory of the agent; unset state paths (outbox, snapshots) go to the state directory
(:mod:`agent.statedir`), never into the working directory.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ConfigError
from agent.mqtt.config import MqttConfig
from agent.statedir import OUTBOX_SUBDIR, SNAPSHOTS_SUBDIR, default_state_dir

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_NAME_HINT = "use letters, digits, '_', '-' or '.' (it becomes an MQTT topic level)"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)  # inf/NaN never valid


class RoiConfig(_Section):
    """One region of interest of a camera, cropped, scored and thresholded on its own."""

    name: str = Field(default="full", description="ROI name, unique per camera; appears in result and alarm payloads")
    box_px: tuple[int, int, int, int] | None = Field(
        default=None,
        description="x, y, width, height of the ROI in px of the frame; omit for the whole frame. "
        "A box reaching past the frame is clipped to it",
    )
    threshold: float | None = Field(
        default=None,
        gt=0,
        description="raw score threshold of this ROI; omit to use model.threshold or the package calibration",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"invalid ROI name {value!r}: {_NAME_HINT}")
        return value

    @field_validator("box_px")
    @classmethod
    def _check_box(cls, value: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if value is not None:
            x, y, w, h = value
            if x < 0 or y < 0 or w <= 0 or h <= 0:
                raise ValueError(f"box_px {list(value)} needs x >= 0, y >= 0, width > 0, height > 0")
        return value


SourceKind = Literal["auto", "camera", "file", "folder", "url", "gstreamer"]


class CameraConfig(_Section):
    """One frame source (``[[cameras]]``) and its ROIs."""

    name: str = Field(default="cam0", description="camera name, unique; the MQTT topic level <root>/<name>/...")
    source: str | int = Field(
        default=0,
        description="camera index (0) or device path (/dev/video0, or the reboot-stable "
        "/dev/v4l/by-id/... link), video file, folder of images, rtsp:// or http:// URL, "
        "or a GStreamer pipeline ending in appsink",
    )
    kind: SourceKind = Field(
        default="auto",
        description="how to open source: auto guesses from its form (digits or a /dev/ path = camera, folder, "
        "existing file, URL scheme, '!' = GStreamer); set it when the guess is wrong",
    )
    realtime: bool = Field(
        default=False,
        description="file and folder sources: replay at recorded speed (video fps, or fps below) "
        "and keep only "
        "the newest frame like a live camera; false = every frame is scored at the model's pace",
    )
    fps: float | None = Field(
        default=None,
        gt=0,
        description="file and folder sources: replay rate in frames/s (implies realtime); "
        "folders default to 10 "
        "when realtime is on; for cameras it is requested from the driver",
    )
    loop: bool = Field(default=False, description="file and folder sources: start again at the end instead of ending")
    width_px: int | None = Field(default=None, gt=0, description="cameras only: frame width requested from the driver")
    height_px: int | None = Field(
        default=None, gt=0, description="cameras only: frame height requested from the driver"
    )
    reconnect_min_s: float = Field(
        default=0.5, gt=0, le=3600, description="first wait before reopening a failed source, s (at most 3600)"
    )
    reconnect_max_s: float = Field(
        default=30.0, gt=0, le=3600, description="cap of the exponential reopen back-off, s (at most 3600)"
    )
    max_read_failures: int = Field(
        default=5, ge=1, description="consecutive failed reads of a live source before it is reopened"
    )
    max_frame_side_px: int = Field(
        default=8192,
        ge=16,
        le=65536,
        description="frames wider or taller than this (px) are dropped and counted "
        "(fod_frames_broken_total{reason=\"too_large\"}) before any crop, render or snapshot allocates for them",
    )
    stale_after_s: float = Field(
        default=5.0,
        gt=0,
        description="live sources: no frame for this long moves the camera to 'stalled' (MQTT state, /healthz "
        "503) and the watchdog reopens it, abandoning a read that never returns, s",
    )
    open_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="cameras and URLs: give up opening the source after this long (OpenCV FFmpeg/V4L2), s",
    )
    read_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="cameras and URLs: a read that returns no frame for this long fails (counted, then the "
        "source is reopened after max_read_failures), s",
    )
    rois: list[RoiConfig] = Field(
        default_factory=lambda: [RoiConfig()],
        min_length=1,
        description="regions of interest ([[cameras.rois]])",
    )

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str | int) -> str | int:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"camera index {value} is negative: use 0 for the first camera (/dev/video0)")
        if isinstance(value, str) and value.strip().lstrip("-").isdigit() and int(value) < 0:
            raise ValueError(f"camera index {value} is negative: use 0 for the first camera (/dev/video0)")
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value) or value in ("cmd", "status", "plc"):
            raise ValueError(f"invalid camera name {value!r}: {_NAME_HINT}, and not 'cmd', 'status' or 'plc'")
        return value

    @model_validator(mode="after")
    def _check(self) -> CameraConfig:
        names = [roi.name for roi in self.rois]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"camera {self.name!r}: ROI names must be unique, repeated: {duplicates}")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"camera {self.name!r}: reconnect_max_s ({self.reconnect_max_s}) must be >= reconnect_min_s "
                f"({self.reconnect_min_s})"
            )
        return self


class ModelConfig(_Section):
    """The model package (or engine) and how to run it."""

    path: Path | None = Field(
        default=None,
        description="model package folder made by `fod export` (or a TensorRT .engine file inside one); "
        "required to run, also settable with --model",
    )
    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        default="auto",
        description="inference backend: auto = TensorRT when it is installed and the package has an engine, "
        "else ONNX Runtime",
    )
    precision: Literal["fp32", "fp16", "int8"] = Field(
        default="fp32", description="which ONNX variant (model.<precision>.onnx) or engine precision to run"
    )
    threshold: float | None = Field(
        default=None,
        gt=0,
        description="raw image-score threshold for every ROI; overrides the package calibration, and is "
        "required when the package has none (else run `fod calibrate`)",
    )
    pixel_threshold: float | None = Field(
        default=None,
        gt=0,
        description="raw anomaly-map value at or above which a pixel is in the published mask; default: the "
        "package calibration, else the image threshold",
    )
    max_input_side_px: int = Field(
        default=2048,
        ge=16,
        le=16384,
        description="largest graph input (height or width, px) a model package may declare; checked before any "
        "buffer is allocated (a 20000 px manifest would need tens of GB)",
    )
    reload_dir: Path | None = Field(
        default=None,
        description="the reload_model command may load packages only inside this folder (symlinks resolved); "
        "unset = reload_model can only reload the current model.path",
    )
    onnx_threads: int | None = Field(
        default=None,
        ge=1,
        description="ONNX Runtime intra-op threads; omit to let ONNX Runtime use every core",
    )


class DecisionConfig(_Section):
    """How scores become alarms (see agent/decision.py)."""

    debounce_n: int = Field(
        default=2,
        ge=1,
        description="frames out of the last debounce_m that must agree before an alarm changes state",
    )
    debounce_m: int = Field(default=3, ge=1, description="length of the debounce window, frames")
    hysteresis: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="NG -> OK needs scores below threshold * (1 - hysteresis); 0 = same threshold both ways",
    )

    @model_validator(mode="after")
    def _check(self) -> DecisionConfig:
        if self.debounce_n > self.debounce_m:
            raise ValueError(
                f"debounce_n ({self.debounce_n}) must be <= debounce_m ({self.debounce_m}); "
                "for no debounce set both to 1"
            )
        return self


class PipelineConfig(_Section):
    """Queues and periodic work of the pipeline."""

    publish_queue_size: int = Field(
        default=8,
        ge=1,
        description="NG frames waiting for image encoding and snapshots; when full the oldest is dropped and "
        'counted (fod_queue_dropped_total{queue="publish"}); results and alarms never wait here',
    )
    state_interval_s: float = Field(
        default=5.0, gt=0, description="period of the retained camera-state messages (fps, frame age), s"
    )
    broker_wait_s: float = Field(
        default=5.0,
        ge=0,
        description="at start, wait this long for the MQTT broker before capture begins, so that a replay's "
        "first results are not lost; the agent scores anyway when the broker is down, s",
    )
    health_window_s: float = Field(
        default=30.0,
        gt=0,
        le=86400,
        description="unhealthy when a ROI of a running camera has had no frame scored and published for this "
        "long (inference errors, NaN scores, ROI outside the frame, stuck publishing), s",
    )
    store_stall_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="unhealthy when one alarm write to the outbox has been running this long (frozen disk), s",
    )


class HttpConfig(_Section):
    """The HTTP server: /metrics, /healthz, / (status page), /preview.mjpg."""

    host: str = Field(
        default="127.0.0.1",
        description="address to listen on: 127.0.0.1 (default) keeps it local to the box; 0.0.0.0 = every interface "
        "(set token_env then, see docs/deployment.md, Security)",
    )
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port; 0 disables the HTTP server")
    token_env: str | None = Field(
        default=None,
        description="NAME of the environment variable holding an access token; when set, /, /metrics and "
        "/preview.mjpg need 'Authorization: Bearer <token>' or ?token=<token> (/healthz stays open)",
    )
    max_connections: int = Field(
        default=16, ge=1, le=1024, description="open connections served at once; more are answered 503 and closed"
    )
    request_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="a connection idle for this long (no request, or a preview client not reading) is closed, s",
    )
    preview_fps: float = Field(default=5.0, gt=0, le=60, description="frame rate of /preview.mjpg, frames/s")
    preview_width_px: int = Field(default=640, ge=64, description="width of the preview frames in px (aspect kept)")


class SnapshotConfig(_Section):
    """Snapshots of NG frames on disk: frame, mask, overlay and result JSON."""

    enabled: bool = Field(default=True, description="save a snapshot for NG frames")
    dir: Path | None = Field(
        default=None,
        description="folder of the snapshots (one sub-folder per camera); unset = <state_dir>/snapshots. "
        "A relative path is relative to the working directory",
    )
    max_total_mb: float = Field(
        default=500.0, gt=0, description="delete the oldest snapshots above this total size, MB"
    )
    max_age_h: float = Field(default=168.0, gt=0, description="delete snapshots older than this, hours")
    min_free_mb: float = Field(
        default=1000.0,
        ge=0,
        description="free space a snapshot must leave on its disk, MB; the oldest snapshots are deleted first, "
        "else the snapshot is skipped, so snapshots never starve the alarm outbox (0 = no check)",
    )
    min_interval_s: float = Field(
        default=1.0, ge=0, description="at most one automatic snapshot per camera in this interval, s"
    )


class LoggingConfig(_Section):
    """Log output (stderr)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="minimum log level")
    format: Literal["text", "json"] = Field(default="text", description="text lines, or one JSON object per line")


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


def config_reference_markdown() -> str:
    """Render the configuration reference (``docs/config.md``) from the field descriptions.

    Returns:
        Markdown text: one table per section with key, type, default and description.
    """
    out = [
        "# fod-agent configuration reference",
        "",
        "Generated from the field descriptions in `agent/config.py` by",
        "`python -m agent.config > docs/config.md` (a test checks that it is up to date).",
        "The commented template is `config.toml` at the repository root; `fod-agent --check-config`",
        "validates a file and exits non-zero naming the first invalid key.",
        "",
    ]
    _render_section(out, AgentConfig, "", "top level")
    return "\n".join(out).rstrip() + "\n"


def _render_section(out: list[str], model: type[BaseModel], prefix: str, title: str) -> None:
    doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
    out += [f"## {title}", "", doc, "", "| key | type | default | description |", "| --- | --- | --- | --- |"]
    nested: list[tuple[str, type[BaseModel], bool]] = []
    for name, info in model.model_fields.items():
        inner = _inner_model(info.annotation)
        if inner is not None:
            is_list = "list" in str(info.annotation)
            nested.append((name, inner, is_list))
            continue
        type_text = _type_text(info.annotation)
        default = info.get_default(call_default_factory=True)
        default_text = "(host name)" if name == "agent_id" else _default_text(default)
        description = (info.description or "").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        out.append(f"| `{prefix}{name}` | {type_text} | {default_text} | {description} |")
    out.append("")
    for name, inner, is_list in nested:
        section = f"{prefix}{name}"
        header = f"[[{section}]]" if is_list else f"[{section}]"
        _render_section(out, inner, f"{section}.", f"`{header}`")


def _type_text(annotation: Any) -> str:
    args = getattr(annotation, "__args__", None)
    if getattr(annotation, "__origin__", None) is Literal and args:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    text = str(annotation).replace("typing.", "").replace("pathlib.", "").replace("<class '", "")
    text = text.replace("'>", "").replace("NoneType", "None")
    return text.replace("|", "\\|")


def _default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, Path):
        return f'`"{value}"`'
    return f"`{value}`"


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
