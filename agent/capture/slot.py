"""The one-frame hand-off between a capture thread and the asyncio pipeline, and the frame it carries.

* **newest-frame policy** (live sources, and file/folder sources with ``realtime``): the slot holds
  one frame; a new frame replaces an unconsumed one and the replaced one is counted as dropped, so a
  slow model never builds a backlog;
* **model pace** (file/folder sources by default): the capture thread waits until the pipeline has
  taken the previous frame, so every frame is scored and none is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass

import numpy as np


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
