"""Commands from the MQTT link applied to the running agent (on the event loop).

The link's command thread hands each command over with ``asyncio.run_coroutine_threadsafe`` and
waits for its answer (:data:`COMMAND_TIMEOUT_S`, :data:`RELOAD_TIMEOUT_S` for a model reload).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
from pathlib import Path
from typing import Any

from agent.backends import LoadedModel, load_model
from agent.commands import Command, CommandError, Pause, ReloadModel, Resume, SetThreshold, Snapshot
from agent.decision import DecisionRule
from agent.errors import AgentError
from agent.pipeline.runtime import AgentState, CameraRuntime

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 5.0
RELOAD_TIMEOUT_S = 120.0


class Commands(AgentState):
    """Part of :class:`agent.pipeline.Agent`: see the module docstring."""

    # ------------------------------------------------------------------ commands
    def _on_command(self, command: Command) -> dict[str, Any]:
        """Apply a command (called from the MQTT link's thread); returns the result dict.

        Raises:
            CommandError: unknown camera / ROI, agent not running, reload failed, or timeout.
        """
        loop = self._loop
        if loop is None or loop.is_closed() or not self.started.is_set():
            raise CommandError("the agent is starting or stopping; retry in a few seconds", command=command.name)
        future = asyncio.run_coroutine_threadsafe(self._apply(command), loop)
        timeout = RELOAD_TIMEOUT_S if isinstance(command, ReloadModel) else COMMAND_TIMEOUT_S
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            raise CommandError(f"{command.name} did not finish within {timeout} s", command=command.name) from exc

    async def _apply(self, command: Command) -> dict[str, Any]:
        if isinstance(command, SetThreshold):
            runtime = self._runtime(command.camera, command.name)
            names = list(runtime.thresholds) if command.roi is None else [command.roi]
            unknown = [n for n in names if n not in runtime.thresholds]
            if unknown:
                raise CommandError(
                    f"camera {command.camera!r} has no ROI {unknown[0]!r}; ROIs: {sorted(runtime.thresholds)}",
                    command=command.name,
                )
            limit = self._threshold_limit()
            if command.threshold > limit:
                raise CommandError(
                    f"threshold {command.threshold:g} is above {limit:g} (1000 x the calibrated threshold): "
                    "it would switch detection off; send a value in model score units",
                    command=command.name,
                )
            for roi in names:
                runtime.thresholds[roi] = command.threshold
                rule = runtime.decisions[roi].rule
                runtime.decisions[roi].set_rule(DecisionRule(command.threshold, rule.hysteresis, rule.n, rule.m))
            log.info("command: camera %s threshold of %s set to %g", command.camera, names, command.threshold)
            return {"camera": command.camera, "thresholds": {n: runtime.thresholds[n] for n in names}}
        if isinstance(command, Snapshot):
            runtime = self._runtime(command.camera, command.name)
            runtime.snapshot_requested = True
            return {
                "camera": command.camera,
                "requested": True,
                "dir": str(Path(self.snapshots.root) / command.camera),
            }
        if isinstance(command, Pause):
            self.paused = True
            self.metrics.paused.set(1)
            log.info("command: scoring paused")
            return {"paused": True}
        if isinstance(command, Resume):
            self.paused = False
            self.metrics.paused.set(0)
            for runtime in self.cameras.values():
                runtime.work.restart_window()
            log.info("command: scoring resumed")
            return {"paused": False}
        if isinstance(command, ReloadModel):
            return await self._reload(command)
        raise CommandError(f"command {type(command).__name__} is not handled by this agent")

    def _confined(self, path: Path, command: str) -> Path:
        """``path`` resolved, when it lies inside ``model.reload_dir``; else CommandError."""
        allowed = self.config.model.reload_dir
        if allowed is None:
            raise CommandError(
                f"loading {path} refused: model.reload_dir is not set, so reload_model may only reload the "
                "current model (send it without path), or set model.reload_dir in config.toml",
                command=command,
            )
        resolved, root = path.resolve(), allowed.resolve()
        if not resolved.is_relative_to(root):
            raise CommandError(
                f"loading {path} refused: it is outside model.reload_dir {root}; copy the package there",
                command=command,
            )
        return resolved

    def _threshold_limit(self) -> float:
        """Highest threshold a command may set: 1000 x the calibrated image threshold."""
        model = self.model
        return 1000.0 * model.calibration.image_threshold if model is not None else math.inf

    def _runtime(self, camera: str, command: str) -> CameraRuntime:
        runtime = self.cameras.get(camera)
        if runtime is None:
            raise CommandError(f"unknown camera {camera!r}; cameras: {sorted(self.cameras)}", command=command)
        return runtime

    async def _reload(self, command: ReloadModel) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        path = Path(command.path) if command.path is not None else None
        if path is None and self.model is not None and self.config.model.path is None:
            raise CommandError('no model path to reload from; pass {"path": ...}', command=command.name)
        if path is not None:
            path = self._confined(path, command.name)

        def swap() -> LoadedModel:
            new = load_model(self.config.model, path=path)
            old, self.model = self.model, new
            if old is not None and old is not new and (self._owns_model or old.runner is not new.runner):
                old.close()
            self._owns_model = True
            return new

        try:
            new = await loop.run_in_executor(self._infer_pool, swap)
        except AgentError as exc:
            raise CommandError(f"reload refused, the current model keeps running: {exc}", command=command.name) from exc
        if path is not None:
            self.config.model.path = path
        for runtime in self.cameras.values():
            self._reset_thresholds(runtime)
        if self.link is not None:
            self.link.set_status_info(backend=new.backend, model=new.name)
        log.info("command: model reloaded: %s (%s)", new.name, new.backend)
        return {"backend": new.backend, "model": new.name, "reason": new.reason}
