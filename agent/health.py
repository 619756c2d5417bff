"""Health derived from work actually done: per camera and ROI, frames scored within a window.

A camera that is connected but whose frames all fail inference, score NaN or have a ROI outside
the frame is not healthy: health asks, for each ROI, when a frame was last scored and its result
published, and names the last error when that is longer ago than ``pipeline.health_window_s``.
The agent's other rules (model loaded, not paused, camera connected and fresh, alarm store
writing, no worker died) add their own problems. The list of problems goes to ``/healthz``, the
``online`` status message and ``/metrics`` (``fod_healthy``, ``fod_health_problems``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class WorkLog:
    """What one camera's scoring loop achieved (written on the loop, read from the HTTP thread).

    Attributes:
        since_mono: ``time.monotonic()`` when scoring began (the window counts from here at first).
        last_scored_mono: ROI name -> ``time.monotonic()`` of its last scored and published frame.
        last_error: The last reason a frame or ROI was not scored (inference error, NaN score,
            ROI outside the frame), with its time.
    """

    since_mono: float = field(default_factory=time.monotonic)
    last_scored_mono: dict[str, float] = field(default_factory=dict)
    last_error: tuple[float, str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def scored(self, roi: str, now: float | None = None) -> None:
        """Record a scored and published ROI result."""
        with self._lock:
            self.last_scored_mono[roi] = time.monotonic() if now is None else now

    def failed(self, reason: str, now: float | None = None) -> None:
        """Record why a frame or ROI was not scored."""
        with self._lock:
            self.last_error = (time.monotonic() if now is None else now, reason)

    def restart_window(self) -> None:
        """Count the window from now (after a resume, so a pause does not read as a failure)."""
        with self._lock:
            self.since_mono = time.monotonic()

    def problems(self, camera: str, rois: list[str], window_s: float, now: float | None = None) -> list[str]:
        """ROIs with no scored frame within ``window_s`` seconds (s), with the last error.

        Args:
            camera: Camera name (in the messages).
            rois: The camera's ROI names.
            window_s: Health window (s).
            now: ``time.monotonic()`` value (None = now).
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            since, last, error = self.since_mono, dict(self.last_scored_mono), self.last_error
        out = []
        for roi in rois:
            ref = max(last.get(roi, since), since)
            if now - ref > window_s:
                why = f"; last error: {error[1]}" if error is not None else ""
                seen = f"{now - last[roi]:.1f} s ago" if roi in last else "never"
                out.append(
                    f"camera {camera} ROI {roi}: no frame scored within {window_s:g} s (last scored: {seen}){why}"
                )
        return out
