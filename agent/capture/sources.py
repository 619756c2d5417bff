"""Frame sources: what the capture thread opens and reads (one class per kind of source).

* a camera (an index ``0``, a device path ``/dev/video0`` or a stable link such as
  ``/dev/v4l/by-id/usb-...-video-index0``), a video file, an RTSP/HTTP URL or a GStreamer pipeline
  (``... ! appsink``) through :class:`VideoCaptureSource` (OpenCV);
* a folder of images, read in sorted file-name order, through :class:`FolderSource`, decoded by
  :func:`fod.preprocess.decode_image` like training and ``fod eval`` do;
* any object with ``read()`` / ``release()`` (or a zero-argument callable returning one), wrapped in
  :class:`ObjectSource`.

Live sources (cameras, URLs, pipelines, objects) are reopened forever with back-off; replays (files,
folders) are opened once: one that cannot open or holds nothing is a :class:`CameraError`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2

from agent.capture.status import TOO_LARGE
from agent.config import CameraConfig, SourceKind
from agent.errors import CameraError
from fod.errors import ImageTooLarge, InputError
from fod.preprocess import IMAGE_SUFFIXES, read_image

log = logging.getLogger("agent.capture")

LIVE_KINDS = frozenset({"camera", "url", "gstreamer"})
"""Source kinds that deliver at their own pace and are reopened forever (files and folders are replays)."""


@runtime_checkable
class FrameReader(Protocol):
    """Anything that reads frames like ``cv2.VideoCapture``."""

    def read(self) -> tuple[bool, Any]:
        """Return ``(ok, frame)``: ``frame`` is a ``[H, W, 3]`` uint8 BGR array when ``ok``."""
        ...

    def release(self) -> None:
        """Free the device or file."""
        ...


class Source:
    """Base of the opened sources: a :class:`FrameReader` plus what the capture thread needs to know.

    Attributes:
        live: frames come at the source's pace (camera, stream); False for files and folders,
            where ``read()`` returning ``ok=False`` means the end.
        fps: the source's own frame rate in frames/s when known (video file, object attribute).
        last_id: identity of the frame just read (file name, frame index) or None.
    """

    live: bool = True
    fps: float | None = None
    last_id: str | int | None = None

    def read(self) -> tuple[bool, Any]:
        """Read the next frame; ``(True, None)`` is a broken frame, ``(False, _)`` a failure or the end."""
        raise NotImplementedError

    def release(self) -> None:
        """Free the device or file. Idempotent."""


def follow_log_level() -> None:
    """Make OpenCV's own log lines follow the agent's log level (call before opening sources).

    OpenCV prints a warning of its own at every failed open (``can't open camera by index``, FFmpeg
    stream timeouts); the agent already logs each state change once. At DEBUG those lines are shown,
    otherwise only OpenCV errors.
    """
    debug = log.isEnabledFor(logging.DEBUG)
    level = cv2.utils.logging.LOG_LEVEL_WARNING if debug else cv2.utils.logging.LOG_LEVEL_ERROR
    cv2.utils.logging.setLogLevel(level)


def is_device_path(text: str) -> bool:
    """Whether ``text`` names a camera device: a path under ``/dev/`` or a link to a character device.

    ``/dev/video0`` and the stable ``/dev/v4l/by-id/...`` / ``by-path/...`` links count even while the
    camera is unplugged (the path is reopened with back-off until it appears).
    """
    if text.startswith("/dev/"):
        return True
    path = Path(text)
    try:
        return path.is_symlink() and Path(os.path.realpath(path)).is_char_device()
    except OSError:
        return False


class VideoCaptureSource(Source):
    """A camera (index or device path), video file, URL or GStreamer pipeline opened with ``cv2.VideoCapture``.

    Args:
        target: camera index, device path, or the string OpenCV opens.
        kind: ``camera``, ``file``, ``url`` or ``gstreamer``.
        width_px, height_px, fps: requested from camera drivers (ignored for other kinds).
        open_timeout_s, read_timeout_s: limits of opening and of one read for cameras and URLs, s
            (OpenCV's FFmpeg and V4L2 back-ends honour them; a read past it returns ``ok=False``).
        max_side_px: refuse a source whose announced frame size (``CAP_PROP_FRAME_WIDTH/HEIGHT``)
            has a larger side, before any frame is read (``cameras.max_frame_side_px``); None = no limit.

    Raises:
        CameraError: OpenCV cannot open it, or its frames are over ``max_side_px`` (the message names
            the source and what to check).
    """

    def __init__(
        self,
        target: int | str,
        kind: str,
        *,
        width_px: int | None = None,
        height_px: int | None = None,
        fps: float | None = None,
        open_timeout_s: float | None = None,
        read_timeout_s: float | None = None,
        max_side_px: int | None = None,
    ) -> None:
        self.kind = kind
        self.live = kind != "file"
        if kind == "file" and not Path(str(target)).is_file():
            raise CameraError(f"video file {target} not found; check cameras.source or --source")
        if kind == "camera" and isinstance(target, str) and not Path(target).exists():
            raise CameraError(
                f"camera device {target} is not present; check that the camera is plugged in "
                "(ls -l /dev/v4l/by-id/ /dev/video*); it is reopened when it appears"
            )
        api = {"gstreamer": cv2.CAP_GSTREAMER, "url": cv2.CAP_FFMPEG}.get(kind, cv2.CAP_ANY)
        params: list[int] = []
        if self.live and kind != "gstreamer":
            if open_timeout_s:
                params += [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, round(open_timeout_s * 1000)]
            if read_timeout_s:
                params += [cv2.CAP_PROP_READ_TIMEOUT_MSEC, round(read_timeout_s * 1000)]
        if kind == "camera" and isinstance(target, str):
            target = os.path.realpath(target)  # a by-id link opens the device it points to today
        self._cap = cv2.VideoCapture(target, api, params) if params else cv2.VideoCapture(target, api)
        if not self._cap.isOpened():
            self._cap.release()
            hints = {
                "camera": "check that the camera is plugged in, not used by another program, and the index "
                "or device path (ls -l /dev/v4l/by-id/ /dev/video*)",
                "file": "check that it is a video OpenCV can decode (ffmpeg backend)",
                "url": "check the URL, credentials and that the stream is reachable from this box",
                "gstreamer": "check the pipeline with gst-launch-1.0 and that OpenCV was built with "
                "GStreamer (cv2.getBuildInformation()); it must end in appsink",
            }
            raise CameraError(f"cannot open {kind} source {target!r}; {hints.get(kind, '')}")
        if kind == "camera":
            if width_px:
                self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, width_px)
            if height_px:
                self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height_px)
            if fps:
                self._cap.set(cv2.CAP_PROP_FPS, fps)
        width, height = (int(self._cap.get(p) or 0) for p in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT))
        if max_side_px is not None and max(width, height) > max_side_px:
            self._cap.release()
            raise CameraError(
                f"{kind} source {target!r} delivers {width}x{height} px frames, larger than "
                f"cameras.max_frame_side_px = {max_side_px}; set a smaller width_px/height_px or raise the limit"
            )
        reported = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = reported if math.isfinite(reported) and reported > 0 else None
        self._index = -1

    def read(self) -> tuple[bool, Any]:
        """Read the next frame (``last_id`` = its index for video files)."""
        ok, frame = self._cap.read()
        if ok:
            self._index += 1
            self.last_id = self._index if self.kind == "file" else None
        return bool(ok), frame

    def release(self) -> None:
        """Release the OpenCV capture."""
        self._cap.release()


class FolderSource(Source):
    """The images of a folder, in sorted file-name order (a replay for tests and commissioning).

    Files are decoded by :func:`fod.preprocess.decode_image` (EXIF orientation applied, 16-bit to
    8-bit), the same function training, ``fod eval`` and calibration use.

    Args:
        folder: the folder; files with an image suffix (png, jpg, bmp, tif, webp) are read.
        max_side_px: a file whose header announces a larger side is skipped before it is decoded
            (``cameras.max_frame_side_px``) and read as :data:`TOO_LARGE`; None = no limit.

    Raises:
        CameraError: the folder is missing or holds no image.
    """

    live = False

    def __init__(self, folder: str | Path, *, max_side_px: int | None = None) -> None:
        self.folder = Path(folder)
        self.max_side_px = max_side_px
        if not self.folder.is_dir():
            raise CameraError(f"image folder {self.folder} not found; check cameras.source or --source")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise CameraError(
                f"image folder {self.folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "check cameras.source"
            )
        self._next = 0
        self._warned: set[Path] = set()

    def read(self) -> tuple[bool, Any]:
        """Decode the next file: ``(True, None)`` when it cannot be decoded, ``(True, TOO_LARGE)`` when its
        header is over ``max_side_px``, ``(False, None)`` at the end.
        """
        if self._next >= len(self.files):
            return False, None
        path = self.files[self._next]
        self._next += 1
        self.last_id = path.name
        try:
            return True, read_image(str(path), max_side_px=self.max_side_px)
        except InputError as exc:
            if path not in self._warned:  # named once per file and pass over the folder
                self._warned.add(path)
                log.warning("skipped: %s", exc)  # the message names the file
            return True, TOO_LARGE if isinstance(exc, ImageTooLarge) else None


class ObjectSource(Source):
    """Wrap a user object that reads like ``cv2.VideoCapture``.

    It is live unless it has ``is_live = False``, and paced at its ``fps`` attribute when it has one.

    Args:
        reader: the object (it is not released on reconnect, only at the end).

    Raises:
        CameraError: the object has no ``read()`` method.
    """

    def __init__(self, reader: Any) -> None:
        if not callable(getattr(reader, "read", None)):
            raise CameraError(f"source object {reader!r} has no read() method; it must read like cv2.VideoCapture")
        self.reader = reader
        self.live = bool(getattr(reader, "is_live", True))
        fps = getattr(reader, "fps", None)
        self.fps = float(fps) if isinstance(fps, int | float) and fps > 0 else None

    def read(self) -> tuple[bool, Any]:
        """Call the object's ``read()``; an exception counts as a failed read."""
        try:
            ok, frame = self.reader.read()
        except Exception as exc:  # a user object may raise anything: a failed read, not a crash
            log.warning("source object read() raised %s: %s", type(exc).__name__, exc)
            return False, None
        self.last_id = getattr(self.reader, "last_id", None)
        return bool(ok), frame

    def release(self) -> None:
        """Call the object's ``release()`` when it has one."""
        release = getattr(self.reader, "release", None)
        if callable(release):
            with contextlib.suppress(Exception):
                release()


def guess_kind(source: str | int) -> SourceKind:
    """Guess the kind of a source description.

    Args:
        source: camera index, device path, file or folder path, URL or GStreamer pipeline.

    Returns:
        ``camera`` (an int, digits, a path under ``/dev/`` or a link to a device), ``gstreamer``
        (contains ``!``), ``url`` (has a scheme), ``folder`` (an existing folder), else ``file``.
    """
    if isinstance(source, int) or str(source).strip().isdigit():
        return "camera"
    text = str(source).strip()
    if "!" in text:
        return "gstreamer"
    if "://" in text:
        return "url"
    if is_device_path(text):
        return "camera"
    if Path(text).is_dir():
        return "folder"
    return "file"


def source_kind(config: CameraConfig) -> SourceKind:
    """The kind of a camera's source: ``config.kind``, or :func:`guess_kind` for ``auto``."""
    return config.kind if config.kind != "auto" else guess_kind(config.source)


def open_source(config: CameraConfig, override: Any = None) -> Source:
    """Open the source of a camera.

    Args:
        config: the camera's configuration (``source``, ``kind``, driver settings, timeouts).
        override: a reader object or a zero-argument factory of one, used instead of ``config.source``.

    Returns:
        An opened :class:`Source`.

    Raises:
        CameraError: it cannot be opened (names the source and what to check).
    """
    if override is not None:
        reader = override() if callable(override) and not hasattr(override, "read") else override
        return reader if isinstance(reader, Source) else ObjectSource(reader)
    kind = source_kind(config)
    if kind == "folder":
        return FolderSource(str(config.source), max_side_px=config.max_frame_side_px)
    text = str(config.source).strip()
    target: int | str = int(text) if kind == "camera" and text.isdigit() else text
    return VideoCaptureSource(
        target,
        kind,
        width_px=config.width_px,
        height_px=config.height_px,
        fps=config.fps,
        open_timeout_s=config.open_timeout_s,
        read_timeout_s=config.read_timeout_s,
        max_side_px=config.max_frame_side_px,
    )
