"""The sections beside cameras and MQTT: ``[model]``, ``[decision]``, ``[pipeline]``, ``[http]``,
``[snapshots]`` and ``[logging]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from agent.config.base import _Section


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

