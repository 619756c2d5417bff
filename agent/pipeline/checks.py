"""Health of the agent derived from work done: per camera and ROI, alarm store, workers, pause.

The rules and their texts: :mod:`agent.health`. ``health()`` is called from the HTTP thread and the
health ticker on the loop; it only reads state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from agent import __version__
from agent.pipeline.runtime import AgentState
from agent.redact import redact

log = logging.getLogger(__name__)


class HealthChecks(AgentState):
    """Part of :class:`agent.pipeline.Agent`: see the module docstring."""

    async def _health_ticker(self) -> None:
        """Derive health every second: metrics, and the ``online`` status when it changed."""
        while True:
            healthy, details = self.health()
            self.metrics.healthy.set(1 if healthy else 0)
            self.metrics.health_problems.set(len(details["problems"]))
            if self.alarms is not None:
                self.metrics.alarms_pending.set(self.alarms.pending)
            if self.link is not None:
                self.link.set_health(healthy, details["problems"])
            await asyncio.sleep(1.0)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Health of the agent, derived from work done (``/healthz``, status topic; thread-safe).

        Returns:
            ``(healthy, details)``: healthy when ``details["problems"]`` is empty. Problems: model not
            loaded, scoring paused, a camera not connected or stale (``stale_after_s``), a ROI with no
            frame scored within ``pipeline.health_window_s`` (with the last error), the alarm store
            stuck or failing, a worker task that died.
        """
        model = self.model
        model_ok = model is not None and model.runner.is_active
        problems: list[str] = [] if model_ok else ["model not loaded"]
        if self.paused:
            problems.append("scoring paused by command (send cmd/resume)")
        if not self.cameras:
            problems.append("no camera running")
        cameras: dict[str, Any] = {}
        for name, runtime in self.cameras.items():
            status = runtime.worker.status()
            age = status.last_frame_age_s
            ok = status.state == "connected" and age is not None and age <= runtime.config.stale_after_s
            why = status.error or "no error"
            mine = [] if ok else [f"camera {name}: {status.state}, last frame age {age} s ({why})"]
            if ok and not self.paused and self.started.is_set():
                rois = [r.name for r in runtime.config.rois]
                mine += runtime.work.problems(name, rois, self.config.pipeline.health_window_s)
            problems += mine
            cameras[name] = {
                "healthy": not mine,
                "problems": mine,
                "state": status.state,
                "fps": status.fps,
                "last_frame_age_s": age,
                "frames_captured": status.frames_captured,
                "frames_dropped": status.frames_dropped,
                "frames_broken": status.frames_broken,
                "reconnects": status.reconnects,
                "stalls": status.stalls,
                "error": status.error,
                "thresholds": dict(runtime.thresholds),
                "last": dict(runtime.last_scores),
                "tally": {roi: dataclasses.asdict(d.tally) for roi, d in runtime.decisions.items()},
            }
        if self.alarms is not None:
            problems += self.alarms.problems()
        problems += self._dead_workers()
        problems = [redact(p) for p in problems]
        link = self.link
        return not problems, {
            "problems": problems,
            "agent_id": self.config.agent_id,
            "version": __version__,
            "model_loaded": model_ok,
            "backend": model.backend if model is not None else None,
            "backend_reason": model.reason if model is not None else None,
            "model": model.name if model is not None else None,
            "paused": self.paused,
            "mqtt_connected": bool(link is not None and link.connected.is_set()),
            "alarm_outbox_depth": link.outbox_depth if link is not None else None,
            "cameras": cameras,
            "recent_alarms": list(self.recent_alarms),
            "notes": self.status_notes() if self.status_notes is not None else {},
        }

    def _dead_workers(self) -> list[str]:
        """Worker tasks that ended with an exception (a camera loop that returned normally ended its source)."""
        if self._stopping:
            return []
        out = []
        for task in list(self._tasks):
            if task.done() and not task.cancelled() and task.exception() is not None:
                out.append(f"worker {task.get_name()} died: {task.exception()!r}")
            elif task.done() and not task.get_name().startswith(("camera-", "end-watcher")):
                out.append(f"worker {task.get_name()} ended")
        return out
