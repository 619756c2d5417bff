"""The ``[[cameras]]`` section and its ``[[cameras.rois]]``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.config.base import _NAME_HINT, _NAME_RE, _Section


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
        "(fod_frames_broken_total{reason=\"too_large\"}) before any crop, render or snapshot allocates for them; "
        "image files of a folder source are checked from their header before decoding, video sources from the frame "
        "size they announce when opened",
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
