"""Frame sources and the per-camera capture thread (one module per concept).

* :mod:`agent.capture.sources`: what is opened and read: cameras (index, ``/dev/video0``, stable
  ``/dev/v4l/by-id/...`` links), video files, RTSP/HTTP URLs, GStreamer pipelines, image folders,
  user objects; all read like ``cv2.VideoCapture`` (``read() -> (ok, frame)`` / ``release()``);
* :mod:`agent.capture.slot`: :class:`Frame` and the one-frame :class:`FrameSlot` hand-off to the
  asyncio pipeline (newest-frame policy or model pace);
* :mod:`agent.capture.status`: :func:`check_frame`, :class:`CameraStatus` and the metrics protocol;
* :mod:`agent.capture.worker`: :class:`CameraWorker`, the capture thread of one camera (open,
  reopen with back-off, frame checks) and its watchdog (``stale_after_s`` -> ``stalled``, reopen).
"""

from agent.capture.slot import Frame, FrameSlot
from agent.capture.sources import (
    IMAGE_SUFFIXES,
    LIVE_KINDS,
    FolderSource,
    FrameReader,
    ObjectSource,
    Source,
    VideoCaptureSource,
    guess_kind,
    is_device_path,
    open_source,
    source_kind,
)
from agent.capture.status import CameraStatus, CaptureMetrics, check_frame
from agent.capture.worker import CameraWorker

__all__ = [
    "IMAGE_SUFFIXES",
    "LIVE_KINDS",
    "CameraStatus",
    "CameraWorker",
    "CaptureMetrics",
    "FolderSource",
    "Frame",
    "FrameReader",
    "FrameSlot",
    "ObjectSource",
    "Source",
    "VideoCaptureSource",
    "check_frame",
    "guess_kind",
    "is_device_path",
    "open_source",
    "source_kind",
]
