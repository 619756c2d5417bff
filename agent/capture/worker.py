"""The capture thread of one camera, and its watchdog.

:class:`CameraWorker` opens the source (live sources again and again with capped exponential
back-off when that fails or the source stops delivering; replays once), checks every frame (broken
ones are counted and skipped, grayscale / BGRA ones are converted to BGR) and hands it to a
:class:`~agent.capture.slot.FrameSlot`.

The watchdog (thread ``watchdog-<camera>``) guards live sources against reads that never return:
when the newest frame (or the opening of the source) is older than ``stale_after_s`` (plus
``open_timeout_s`` while opening), the camera goes to ``stalled`` (published on MQTT and in
/healthz), the blocked reader is abandoned (it releases its source and exits whenever its call
returns, touching nothing else) and a fresh reader thread reopens the source. A thread stuck in a
driver therefore never stops the agent from shutting down (the threads are daemons and are joined
with a timeout) nor from serving the other cameras.

States (:data:`agent.schemas.CameraState`): ``connecting`` (first open) -> ``connected`` (first
frame) -> ``stalled`` (watchdog) / ``reconnecting`` (read failures, reopen) -> ``connected`` ...;
``ended`` (replay finished, or stopped); ``failed`` (a live source cannot be opened and is retried,
or a replay cannot be opened or holds no frame: it is not retried).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from agent.backoff import Backoff
from agent.capture.slot import Frame, FrameSlot
from agent.capture.sources import (
    LIVE_KINDS,
    FolderSource,
    ObjectSource,
    Source,
    follow_log_level,
    open_source,
    source_kind,
)
from agent.capture.status import CameraStatus, CaptureMetrics, check_frame
from agent.config import CameraConfig
from agent.errors import CameraError
from agent.schemas import CameraState

log = logging.getLogger("agent.capture")

FOLDER_DEFAULT_FPS = 10.0
VIDEO_DEFAULT_FPS = 25.0
STOP_JOIN_S = 2.0
"""How long :meth:`CameraWorker.stop` waits for a read in progress, s (then the thread is abandoned)."""

Outcome = Literal["ended", "good", "failed", "stopped", "abandoned"]


class CameraWorker:
    """The capture thread of one camera (plus its watchdog for live sources).

    Args:
        config: the camera's configuration.
        metrics: where events are counted (``camera_stalled(camera)`` is called too when it has one).
        override: a reader object / factory used instead of ``config.source``.
        on_state: called (from a capture thread) with the new :class:`CameraStatus` on every state change.
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
        self._watchdog: threading.Thread | None = None
        self._lock = threading.Lock()
        self._state: CameraState = "connecting"
        self._error: str | None = None
        self._seq = 0
        self._captured = 0
        self._broken = 0
        self._reconnects = 0
        self._stalls = 0
        self._abandoned = 0
        self._gen = 0
        self._busy: tuple[str, float] | None = None  # ("open" | "read", since perf_counter) of the reader
        self._last_frame_mono: float | None = None
        self._times: deque[float] = deque(maxlen=30)
        self.source: Source | None = None
        # a reader object (not a factory) is reused across reconnects and released only at the end
        self._reused_object = override is not None and hasattr(override, "read")
        self.live_kind = override is not None or source_kind(config) in LIVE_KINDS

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the capture thread (daemon, ``capture-<camera>``) and, for live sources, the watchdog."""
        if self._thread is None:
            if self.override is None:
                follow_log_level()
            self._spawn_reader(reopen=False)
            if self.live_kind:
                self._watchdog = threading.Thread(target=self._watch, name=f"watchdog-{self.name}", daemon=True)
                self._watchdog.start()

    def stop(self, timeout_s: float = STOP_JOIN_S) -> None:
        """Stop the threads and release the source; a reader blocked in a driver is abandoned after ``timeout_s``.

        Args:
            timeout_s: how long to wait for a read in progress to return, s.
        """
        self.stop_event.set()
        self.slot.close()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning(
                    "camera %s: capture thread still blocked in the source after %.1f s; abandoned",
                    self.name,
                    timeout_s,
                )
                with self._lock:
                    self._gen += 1
                self._final_state()
        if self._watchdog is not None:
            self._watchdog.join(timeout_s)

    def __enter__(self) -> CameraWorker:
        """Start the capture thread."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the thread and release the source."""
        self.stop()

    @property
    def alive(self) -> bool:
        """True while the current capture thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def abandoned_threads(self) -> int:
        """Reader threads given up by the watchdog or :meth:`stop` while blocked in the source."""
        return self._abandoned

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
                stalls=self._stalls,
            )

    def _set_state(self, state: CameraState, error: str | None = None, *, gen: int | None = None) -> None:
        with self._lock:
            if gen is not None and gen != self._gen:
                return  # an abandoned reader: it no longer speaks for the camera
            changed = state != self._state or error != self._error
            self._state, self._error = state, error
        self.metrics.camera_connected(self.name, state == "connected")
        if changed:
            if state in ("failed", "reconnecting", "stalled"):
                log.warning("camera %s: %s (%s)", self.name, state, error)
            else:
                log.info("camera %s: %s", self.name, state)
            if self.on_state is not None:
                try:
                    self.on_state(self.status())
                except Exception:
                    log.exception("camera %s: state callback failed", self.name)

    def _final_state(self) -> None:
        if self._state not in ("ended", "failed"):  # stopped by the agent: retained state must not say "connected"
            self._set_state("ended", None)
        self.ended.set()
        self.slot.close()

    # -- the watchdog ----------------------------------------------------------------------------
    def _spawn_reader(self, *, reopen: bool) -> None:
        with self._lock:
            self._gen += 1
            gen = self._gen
            self._busy = None
        self._thread = threading.Thread(
            target=self._run, args=(gen, reopen), name=f"capture-{self.name}", daemon=True
        )
        self._thread.start()

    def _watch(self) -> None:
        stale = self.config.stale_after_s
        period = min(0.5, stale / 4)
        while not self.stop_event.wait(period):
            with self._lock:
                busy = self._busy
                last = self._last_frame_mono
            if busy is None:
                continue
            phase, since = busy
            now = time.perf_counter()
            reference = max(since, last or since)
            limit = stale + (self.config.open_timeout_s if phase == "open" else 0.0)
            if now - reference <= limit or self.stop_event.is_set():
                continue
            with self._lock:
                self._stalls += 1
                self._abandoned += 1
            stalled = getattr(self.metrics, "camera_stalled", None)
            if callable(stalled):
                stalled(self.name)
            what = "opening the source" if phase == "open" else "no frame"
            self._set_state("stalled", f"{what} for {now - reference:.1f} s (stale_after_s {stale:g}); reopening")
            self._spawn_reader(reopen=True)

    # -- the reader thread -----------------------------------------------------------------------
    def _run(self, gen: int, reopen: bool) -> None:
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        first = not reopen
        opened_once = False
        while not self.stop_event.is_set() and gen == self._gen:
            if not first:
                with self._lock:
                    self._reconnects += 1
                self.metrics.camera_reconnect(self.name)
            first = False
            with self._lock:
                self._busy = ("open", time.perf_counter())
            try:
                source = open_source(self.config, self.override)
            except Exception as exc:  # OpenCV and user factories can raise anything
                with self._lock:
                    self._busy = None
                error = str(exc) if isinstance(exc, CameraError) else f"cannot open source: {type(exc).__name__}: {exc}"
                if gen != self._gen:
                    return
                self._set_state("failed", error, gen=gen)
                if not self.live_kind and not opened_once:  # a replay that cannot open never will
                    break
                backoff.wait(self.stop_event)
                continue
            opened_once = True
            self.source = source
            if not source.live:
                with self._lock:
                    self._busy = None
            try:
                outcome = self._read_loop(source, gen)
            finally:
                if not self._reused_object:
                    source.release()
            if outcome == "abandoned" or gen != self._gen:
                log.info("camera %s: abandoned reader returned from the source; released it", self.name)
                return
            with self._lock:
                self._busy = None
            if outcome == "stopped":
                break
            if outcome == "ended":
                if self._captured == 0:
                    self._set_state("failed", f"source {self.config.source} has no frame to read", gen=gen)
                    break
                if self.config.loop and not self.stop_event.is_set():
                    log.info("camera %s: end of source, looping", self.name)
                    backoff.reset()
                    first = True
                    continue
                self._set_state("ended", gen=gen)
                break
            if outcome == "good":
                backoff.reset()
            self._set_state("reconnecting", self._error or "the source stopped delivering frames", gen=gen)
            backoff.wait(self.stop_event)
        if gen != self._gen:
            return
        if self._reused_object and self.source is not None:
            self.source.release()
        self._final_state()

    def _read_loop(self, source: Source, gen: int) -> Outcome:
        """Read until the end, a failure, stop or abandonment."""
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
        if source.live:
            with self._lock:
                self._busy = ("read", time.perf_counter())
        while not self.stop_event.is_set():
            if period:
                delay = next_due - time.perf_counter()
                if delay > 0 and self.stop_event.wait(delay):
                    return "stopped"
                next_due = max(next_due + period, time.perf_counter() - period)
            ok, raw = source.read()
            if gen != self._gen:
                return "abandoned"
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
                state = self._state
            if state != "connected":
                self._set_state("connected", gen=gen)
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
