"""Storing alarms off the event loop: one dedicated thread, submission order kept, drained at stop.

An alarm is either stored or its transition is undone (see :mod:`agent.pipeline`): the event loop
hands :meth:`agent.mqtt.link.MqttLink.publish_alarm` (one sqlite write with fsync) to this store's
single worker thread and keeps feeding the ROI's debounce meanwhile. When a write fails, the ROI goes
back to its last stored state, so the next frames raise the transition again (retry), and every
later write of the same ROI and *chain* already queued is skipped (:class:`AlarmSkipped`): it was
decided on top of the transition that was not stored. Because there is exactly one worker thread,
alarms get their ``alarm_seq`` in the order the loop raised them.

Health: :meth:`AlarmStore.problems` names a write that has been running for more than
``stall_s`` seconds (a frozen disk) and the cause of the last failed write until one succeeds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable

from agent.schemas import AlarmPayload


class AlarmSkipped(Exception):
    """An alarm not written because an earlier alarm of its ROI and chain failed to be stored."""


StoreFn = Callable[[str, AlarmPayload], AlarmPayload]
"""Stores one alarm for a camera and returns it as stored (with its identity); raises on failure."""


class AlarmStore:
    """A one-thread executor for alarm writes, with the state that health needs.

    Args:
        store: The write (usually ``MqttLink.publish_alarm``); called in the store thread.
        stall_s: A write running longer than this is reported as stuck (s).
    """

    def __init__(self, store: StoreFn, *, stall_s: float) -> None:
        self._store = store
        self.stall_s = stall_s
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="alarm-store")
        self._lock = threading.Lock()
        self._busy_since: float | None = None
        self._queued = 0
        self.last_error: str | None = None
        """Cause of the last failed write; None once a write succeeded."""
        self.failures = 0
        self._broken: dict[tuple[str, str], int] = {}

    def submit(self, camera: str, alarm: AlarmPayload, chain: int) -> asyncio.Future[AlarmPayload]:
        """Queue one alarm write (event loop); the future resolves to the stored payload.

        Args:
            camera: Camera name.
            alarm: The transition.
            chain: The ROI's chain number: after a failed write of chain ``c``, queued writes of the
                same ROI with chain ``<= c`` are skipped; the caller starts chain ``c + 1``.

        Raises:
            RuntimeError: The store was drained (agent stopping).
        """
        with self._lock:
            self._queued += 1
        return asyncio.get_running_loop().run_in_executor(self._pool, self._write, camera, alarm, chain)

    def _write(self, camera: str, alarm: AlarmPayload, chain: int) -> AlarmPayload:
        key = (camera, alarm.roi)
        with self._lock:
            if self._broken.get(key, -1) >= chain:
                self._queued -= 1
                raise AlarmSkipped(f"{camera}/{alarm.roi}: an earlier alarm of chain {chain} was not stored")
            self._busy_since = time.monotonic()
        try:
            stored = self._store(camera, alarm)
        except Exception as exc:
            with self._lock:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._broken[key] = chain
            raise
        finally:
            with self._lock:
                self._busy_since = None
                self._queued -= 1
        with self._lock:
            self.last_error = None
        return stored

    @property
    def pending(self) -> int:
        """Alarms submitted and not yet written (or failed)."""
        with self._lock:
            return self._queued

    def problems(self, now: float | None = None) -> list[str]:
        """Health problems of the store (empty when writes complete).

        Args:
            now: ``time.monotonic()`` value (None = now).
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            busy, error, queued = self._busy_since, self.last_error, self._queued
        out = []
        if busy is not None and now - busy > self.stall_s:
            out.append(
                f"alarm store stuck: one write has been running for {now - busy:.1f} s ({queued} alarm(s) waiting); "
                "check the disk holding mqtt.outbox_dir"
            )
        if error is not None:
            out.append(f"alarm store failing, alarms not stored (transitions are retried): {error}")
        return out

    def drain(self) -> None:
        """Wait for every queued write, then stop the thread (blocking; call off the loop)."""
        self._pool.shutdown(wait=True)
