"""What the capture thread reports: the frame check, the camera status snapshot and the metrics protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from agent.schemas import CameraState
from fod.errors import InputError
from fod.preprocess import as_bgr

MIN_FRAME_SIDE_PX = 8
"""Frames smaller than this on either side are broken (reason ``size``), px."""


TOO_LARGE = "too_large"
"""What a folder source reads for a file refused by its header size (counted as ``too_large``)."""


def check_frame(image: Any, *, source: str) -> tuple[np.ndarray | None, str | None]:
    """Validate a frame and convert it to ``[H, W, 3]`` uint8 BGR.

    Args:
        image: what the source returned.
        source: camera name for messages.

    Returns:
        ``(frame, None)`` for a usable frame (grayscale, ``[H, W, 1]`` and BGRA are converted),
        else ``(None, reason)`` with reason ``empty``, ``dtype``, ``shape`` or ``size``; a string from
        the source is its reason (``too_large``: a file refused by its header, never decoded).
    """
    if isinstance(image, str) and image == TOO_LARGE:  # a file refused by its header, never decoded
        return None, TOO_LARGE
    if image is None or not isinstance(image, np.ndarray) or image.size == 0:
        return None, "empty"
    if image.dtype != np.uint8:
        return None, "dtype"
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        return None, "shape"
    if min(image.shape[0], image.shape[1]) < MIN_FRAME_SIDE_PX:
        return None, "size"
    try:
        return as_bgr(image, source=source), None
    except InputError:
        return None, "shape"


@dataclass(frozen=True)
class CameraStatus:
    """A snapshot of a camera's counters and state (what ``<camera>/state`` publishes).

    Attributes:
        camera: camera name.
        state: see :data:`agent.schemas.CameraState`.
        fps: measured capture rate over the last frames, frames/s.
        last_frame_age_s: seconds since the last good frame, None before the first.
        frames_captured, frames_dropped, frames_broken, reconnects: counters since start.
        error: the last open/read error, None when connected.
        stalls: times the watchdog found the source silent for ``stale_after_s``.
    """

    camera: str
    state: CameraState
    fps: float
    last_frame_age_s: float | None
    frames_captured: int
    frames_dropped: int
    frames_broken: int
    reconnects: int
    error: str | None
    stalls: int = 0


class CaptureMetrics(Protocol):
    """What the capture thread reports (implemented by :class:`agent.metrics.AgentMetrics`)."""

    def frame_captured(self, camera: str) -> None:
        """A good frame was read."""
        ...

    def frame_dropped(self, camera: str, reason: str) -> None:
        """A frame was dropped before scoring."""
        ...

    def frame_broken(self, camera: str, reason: str) -> None:
        """A frame was unusable (or a live read failed)."""
        ...

    def camera_reconnect(self, camera: str) -> None:
        """The source is being reopened after a failure."""
        ...

    def camera_connected(self, camera: str, connected: bool) -> None:
        """The source is (not) delivering."""
        ...
