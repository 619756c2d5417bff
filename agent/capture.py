"""Frame sources and the per-camera capture thread.

Sources (all with the ``cv2.VideoCapture`` reading shape ``read() -> (ok, frame)`` / ``release()``):

* a camera index (``0``), a video file, an RTSP/HTTP URL, a GStreamer pipeline (``... ! appsink``)
  through :class:`VideoCaptureSource` (OpenCV, ``cv2.CAP_GSTREAMER`` for pipelines);
* a folder of images, read in sorted file-name order, through :class:`FolderSource`;
* any object with ``read()`` / ``release()`` (or a zero-argument callable returning one), wrapped in
  :class:`ObjectSource`; it is live unless it has ``is_live = False``, and paced at its ``fps``
  attribute when it has one (the demo's synthetic conveyor is one).

:class:`CameraWorker` is the capture thread of one camera. It opens the source (again and again
with capped exponential back-off when that fails or a live source stops delivering), checks every
frame (broken ones are counted and skipped, grayscale / BGRA ones are converted to BGR) and hands it
to a :class:`FrameSlot`:

* **newest-frame policy** (live sources, and file/folder sources with ``realtime``): the slot holds
  one frame; a new frame replaces an unconsumed one and the replaced one is counted as dropped, so a
  slow model never builds a backlog;
* **model pace** (file/folder sources by default): the thread waits until the pipeline has taken
  the previous frame, so every frame is scored and none is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from agent.config import CameraConfig, SourceKind
from agent.errors import CameraError
from fod.errors import InputError
from fod.preprocess import as_bgr

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
MIN_FRAME_SIDE_PX = 8
FOLDER_DEFAULT_FPS = 10.0
VIDEO_DEFAULT_FPS = 25.0


@runtime_checkable
class FrameReader(Protocol):
    """Anything that reads frames like ``cv2.VideoCapture``."""

    def read(self) -> tuple[bool, Any]:
        """Return ``(ok, frame)``: ``frame`` is a ``[H, W, 3]`` uint8 BGR array when ``ok``."""
        ...

    def release(self) -> None:
        """Free the device or file."""
        ...


@dataclass(frozen=True)
class Frame:
    """One captured frame on its way through the pipeline.

    Attributes:
        image: ``[H, W, 3]`` uint8 BGR.
        seq: per-camera sequence number, 1 for the first frame of the run (gaps = dropped frames).
        capture_ts: wall-clock time the frame was read, unix s.
        capture_mono: ``time.perf_counter()`` when the frame was read, s (for latencies).
        source_frame: file name (folder sources), frame index (video files) or None (live sources).
    """

    image: np.ndarray
    seq: int
    capture_ts: float
    capture_mono: float
    source_frame: str | int | None


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


class VideoCaptureSource(Source):
    """A camera index, video file, URL or GStreamer pipeline opened with ``cv2.VideoCapture``.

    Args:
        target: camera index or the string OpenCV opens.
        kind: ``camera``, ``file``, ``url`` or ``gstreamer``.
        width_px, height_px, fps: requested from camera drivers (ignored for other kinds).

    Raises:
        CameraError: OpenCV cannot open it (the message names the source and what to check).
    """

    def __init__(
        self,
        target: int | str,
        kind: str,
        *,
        width_px: int | None = None,
        height_px: int | None = None,
        fps: float | None = None,
    ) -> None:
        self.kind = kind
        self.live = kind != "file"
        api = cv2.CAP_GSTREAMER if kind == "gstreamer" else cv2.CAP_ANY
        if kind == "file" and not Path(str(target)).is_file():
            raise CameraError(f"video file {target} not found; check cameras.source or --source")
        self._cap = cv2.VideoCapture(target, api)
        if not self._cap.isOpened():
            self._cap.release()
            hints = {
                "camera": "check that the camera is plugged in, not used by another program, and the index "
                "(ls /dev/video*)",
                "file": "check that it is a video OpenCV can decode (ffmpeg backend)",
                "url": "check the URL, credentials and that the stream is reachable from this box",
                "gstreamer": "check the pipeline with gst-launch-1.0 and that OpenCV was built with "
                "GStreamer "
                "(cv2.getBuildInformation()); it must end in appsink",
            }
            raise CameraError(f"cannot open {kind} source {target!r}; {hints.get(kind, '')}")
        if kind == "camera":
            if width_px:
                self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, width_px)
            if height_px:
                self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height_px)
            if fps:
                self._cap.set(cv2.CAP_PROP_FPS, fps)
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

    Args:
        folder: the folder; files with an image suffix (png, jpg, bmp, tif, webp) are read.

    Raises:
        CameraError: the folder is missing or holds no image.
    """

    live = False

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CameraError(f"image folder {self.folder} not found; check cameras.source or --source")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise CameraError(
                f"image folder {self.folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "check cameras.source"
            )
        self._next = 0

    def read(self) -> tuple[bool, Any]:
        """Decode the next file: ``(True, None)`` when it cannot be decoded, ``(False, None)`` at the end."""
        if self._next >= len(self.files):
            return False, None
        path = self.files[self._next]
        self._next += 1
        self.last_id = path.name
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError:
            return True, None
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if image is not None and image.dtype == np.uint16:
            image = (image // 256).astype(np.uint8)
        return True, image


class ObjectSource(Source):
    """Wrap a user object that reads like ``cv2.VideoCapture``.

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
        source: camera index, path, URL or GStreamer pipeline.

    Returns:
        ``camera`` (an int or digits), ``gstreamer`` (contains ``!``), ``url`` (has a scheme),
        ``folder`` (an existing folder), else ``file``.
    """
    if isinstance(source, int) or str(source).strip().isdigit():
        return "camera"
    text = str(source).strip()
    if "!" in text:
        return "gstreamer"
    if "://" in text:
        return "url"
    if Path(text).is_dir():
        return "folder"
    return "file"


def open_source(config: CameraConfig, override: Any = None) -> Source:
    """Open the source of a camera.

    Args:
        config: the camera's configuration (``source``, ``kind``, driver settings).
        override: a reader object or a zero-argument factory of one, used instead of ``config.source``.

    Returns:
        An opened :class:`Source`.

    Raises:
        CameraError: it cannot be opened (names the source and what to check).
    """
    if override is not None:
        reader = override() if callable(override) and not hasattr(override, "read") else override
        return reader if isinstance(reader, Source) else ObjectSource(reader)
    kind = config.kind if config.kind != "auto" else guess_kind(config.source)
    if kind == "folder":
        return FolderSource(str(config.source))
    target: int | str = int(config.source) if kind == "camera" else str(config.source)
    return VideoCaptureSource(target, kind, width_px=config.width_px, height_px=config.height_px, fps=config.fps)


def check_frame(image: Any, *, source: str) -> tuple[np.ndarray | None, str | None]:
    """Validate a frame and convert it to ``[H, W, 3]`` uint8 BGR.

    Args:
        image: what the source returned.
        source: camera name for messages.

    Returns:
        ``(frame, None)`` for a usable frame (grayscale, ``[H, W, 1]`` and BGRA are converted),
        else ``(None, reason)`` with reason ``empty``, ``dtype``, ``shape`` or ``size``.
    """
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


class FrameSlot:
    """A one-frame hand-off between a capture thread and the asyncio pipeline.

    ``put(block=False)`` replaces an unconsumed frame (newest-frame policy; ``dropped`` counts the
    replaced ones), ``put(block=True)`` waits until the consumer has taken the previous one (model
    pace). The consumer awaits :meth:`get` on the event loop given to :meth:`attach`.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._closed = False
        self.dropped = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind the consumer side to ``loop`` (call from that loop before :meth:`get`)."""
        self._loop = loop
        self._event = asyncio.Event()

    @property
    def depth(self) -> int:
        """Frames waiting: 0 or 1."""
        return 0 if self._frame is None else 1

    def put(self, frame: Frame, *, block: bool, stop: threading.Event | None = None) -> bool:
        """Hand over a frame (from the capture thread).

        Args:
            frame: the frame.
            block: wait until the previous frame was taken (model pace) instead of replacing it.
            stop: while blocking, give up when this event is set.

        Returns:
            True when a waiting frame was replaced (dropped).
        """
        replaced = False
        with self._cond:
            while block and self._frame is not None and not self._closed and not (stop and stop.is_set()):
                self._cond.wait(0.1)
            if self._closed or (block and stop is not None and stop.is_set()):
                return False
            if self._frame is not None:
                replaced = True
                self.dropped += 1
            self._frame = frame
        self._wake()
        return replaced

    def take(self) -> Frame | None:
        """Take the waiting frame, if any, without waiting."""
        with self._cond:
            frame, self._frame = self._frame, None
            self._cond.notify_all()
        return frame

    def close(self) -> None:
        """No more frames will come (the source ended); wakes both sides."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._wake()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    async def get(self) -> Frame | None:
        """Wait for the next frame; None once the slot is closed and empty."""
        if self._event is None:
            raise RuntimeError("FrameSlot.attach(loop) must be called before get()")
        while True:
            frame = self.take()
            if frame is not None:
                return frame
            if self._closed:
                return None
            await self._event.wait()
            self._event.clear()

    def _wake(self) -> None:
        loop, event = self._loop, self._event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
                loop.call_soon_threadsafe(event.set)


@dataclass(frozen=True)
class CameraStatus:
    """A snapshot of a camera's counters and state (what ``<camera>/state`` publishes).

    Attributes:
        camera: camera name.
        state: ``connecting``, ``connected``, ``reconnecting``, ``ended`` or ``failed``.
        fps: measured capture rate over the last frames, frames/s.
        last_frame_age_s: seconds since the last good frame, None before the first.
        frames_captured, frames_dropped, frames_broken, reconnects: counters since start.
        error: the last open/read error, None when connected.
    """

    camera: str
    state: str
    fps: float
    last_frame_age_s: float | None
    frames_captured: int
    frames_dropped: int
    frames_broken: int
    reconnects: int
    error: str | None


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


class CameraWorker:
    """The capture thread of one camera.

    Args:
        config: the camera's configuration.
        metrics: where events are counted.
        override: a reader object / factory used instead of ``config.source``.
        on_state: called (from the capture thread) with the new :class:`CameraStatus` on every state change.
        realtime: force the newest-frame policy and recorded-speed replay for file/folder sources.
    """

    def __init__(
        self,
        config: CameraConfig,
        *,
        metrics: CaptureMetrics,
        override: Any = None,
        on_state: Callable[[CameraStatus], None] | None = None,
        realtime: bool | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.metrics = metrics
        self.override = override
        self.on_state = on_state
        self.realtime = config.realtime or config.fps is not None if realtime is None else realtime
        self.slot = FrameSlot()
        self.stop_event = threading.Event()
        self.ended = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._state = "connecting"
        self._error: str | None = None
        self._seq = 0
        self._captured = 0
        self._broken = 0
        self._reconnects = 0
        self._last_frame_mono: float | None = None
        self._times: deque[float] = deque(maxlen=30)
        self.source: Source | None = None
        # a reader object (not a factory) is reused across reconnects and released only at the end
        self._reused_object = override is not None and hasattr(override, "read")

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the capture thread (daemon, named ``capture-<camera>``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"capture-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread and release the source.

        Args:
            timeout_s: how long to wait for a read in progress to return, s.
        """
        self.stop_event.set()
        self.slot.close()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("camera %s: capture thread still blocked in read() after %.1f s", self.name, timeout_s)

    def __enter__(self) -> CameraWorker:
        """Start the capture thread."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the thread and release the source."""
        self.stop()

    @property
    def alive(self) -> bool:
        """True while the capture thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- state -----------------------------------------------------------------------------------
    def status(self) -> CameraStatus:
        """The current :class:`CameraStatus` (thread-safe)."""
        with self._lock:
            now = time.perf_counter()
            age = None if self._last_frame_mono is None else now - self._last_frame_mono
            fps = 0.0
            if len(self._times) >= 2 and self._times[-1] > self._times[0]:
                fps = (len(self._times) - 1) / (self._times[-1] - self._times[0])
            if age is not None and fps and age > 5.0 / fps:
                fps = 0.0
            return CameraStatus(
                camera=self.name,
                state=self._state,
                fps=round(fps, 2),
                last_frame_age_s=None if age is None else round(age, 3),
                frames_captured=self._captured,
                frames_dropped=self.slot.dropped,
                frames_broken=self._broken,
                reconnects=self._reconnects,
                error=self._error,
            )

    def _set_state(self, state: str, error: str | None = None) -> None:
        with self._lock:
            changed = state != self._state or error != self._error
            self._state, self._error = state, error
        self.metrics.camera_connected(self.name, state == "connected")
        if changed:
            if state in ("failed", "reconnecting"):
                log.warning("camera %s: %s (%s)", self.name, state, error)
            else:
                log.info("camera %s: %s", self.name, state)
            if self.on_state is not None:
                try:
                    self.on_state(self.status())
                except Exception:
                    log.exception("camera %s: state callback failed", self.name)

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.config.reconnect_min_s
        first = True
        while not self.stop_event.is_set():
            if not first:
                self._reconnects += 1
                self.metrics.camera_reconnect(self.name)
            first = False
            try:
                source = open_source(self.config, self.override)
            except CameraError as exc:
                self._set_state("failed", str(exc))
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, self.config.reconnect_max_s)
                continue
            except Exception as exc:  # OpenCV and user factories can raise anything
                self._set_state("failed", f"cannot open source: {type(exc).__name__}: {exc}")
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, self.config.reconnect_max_s)
                continue
            self.source = source
            self._set_state("connected")
            try:
                outcome = self._read_loop(source)
            finally:
                if not self._reused_object:
                    source.release()
            if outcome == "stopped":
                break
            if outcome == "ended":
                if self.config.loop and not self.stop_event.is_set():
                    log.info("camera %s: end of source, looping", self.name)
                    backoff = self.config.reconnect_min_s
                    first = True
                    continue
                self._set_state("ended")
                break
            if outcome == "good":
                backoff = self.config.reconnect_min_s
            self._set_state("reconnecting", self._error or "the source stopped delivering frames")
            self.stop_event.wait(backoff)
            backoff = min(backoff * 2, self.config.reconnect_max_s)
        if self._reused_object and self.source is not None:
            self.source.release()
        if self._state != "ended":  # stopped by the agent: the retained state must not say "connected"
            self._set_state("ended", None)
        self.ended.set()
        self.slot.close()

    def _read_loop(self, source: Source) -> str:
        """Read until the end, a failure or stop; returns ``ended``, ``good``, ``failed`` or ``stopped``."""
        paced = not source.live and not self.realtime
        rate = None
        if not paced:
            if source.live:
                rate = source.fps if isinstance(source, ObjectSource) else None
            else:
                default = FOLDER_DEFAULT_FPS if isinstance(source, FolderSource) else VIDEO_DEFAULT_FPS
                rate = self.config.fps or source.fps or default
        period = 1.0 / rate if rate else 0.0
        next_due = time.perf_counter()
        failures = 0
        delivered = False
        while not self.stop_event.is_set():
            if period:
                delay = next_due - time.perf_counter()
                if delay > 0 and self.stop_event.wait(delay):
                    return "stopped"
                next_due = max(next_due + period, time.perf_counter() - period)
            ok, raw = source.read()
            if self.stop_event.is_set():
                return "stopped"
            if not ok:
                if not source.live:
                    return "ended"
                failures += 1
                self._count_broken("read_failed")
                if failures >= self.config.max_read_failures:
                    with self._lock:
                        self._error = f"{failures} consecutive reads failed"
                    return "good" if delivered else "failed"
                self.stop_event.wait(min(0.05 * failures, 0.5))
                continue
            failures = 0
            image, reason = check_frame(raw, source=self.name)
            if image is None:
                self._count_broken(reason or "empty")
                continue
            now = time.perf_counter()
            with self._lock:
                self._seq += 1
                self._captured += 1
                self._last_frame_mono = now
                self._times.append(now)
                seq = self._seq
            delivered = True
            self.metrics.frame_captured(self.name)
            frame = Frame(image, seq, time.time(), now, source.last_id)
            if self.slot.put(frame, block=paced, stop=self.stop_event):
                self.metrics.frame_dropped(self.name, "newest_frame")
        return "stopped"

    def _count_broken(self, reason: str) -> None:
        with self._lock:
            self._broken += 1
        self.metrics.frame_broken(self.name, reason)
