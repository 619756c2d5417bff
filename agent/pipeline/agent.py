"""The agent's lifecycle and its per-camera loop: start, capture -> inference -> decisions, stop.

The stages and hand-offs are described in :mod:`agent.pipeline`; the decisions, images, health checks
and commands live in their own modules and are mixed into :class:`Agent`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from agent.alarms import AlarmStore
from agent.backends import LoadedModel, load_model
from agent.capture import CameraStatus, CameraWorker, Frame
from agent.config import AgentConfig, CameraConfig
from agent.decision import summary_line
from agent.errors import AgentError, CameraError
from agent.http import AgentHttpServer, PreviewHub
from agent.metrics import AgentMetrics
from agent.mqtt.link import MqttLink
from agent.pipeline.checks import HealthChecks
from agent.pipeline.control import Commands
from agent.pipeline.decisions import Decisions
from agent.pipeline.runtime import CameraRuntime, PublishJob, RoiScore, ScoredFrame
from agent.redact import redact
from agent.render import (
    Box,
)
from agent.schemas import CameraStatePayload
from agent.snapshots import SnapshotStore
from fod.preprocess import crop_box, to_model_input

log = logging.getLogger(__name__)


RECENT_ALARMS = 20  # alarm transitions kept for the status page

class Agent(HealthChecks, Decisions, Commands):
    """The running agent: model, cameras, MQTT link, HTTP server, snapshots.

    Args:
        config: the validated configuration.
        sources: camera name -> reader object (or factory) used instead of ``cameras.source``
            (the demo's synthetic conveyor, tests).
        model: an already loaded model (tests, benchmarks); None loads ``config.model``.
        registry: Prometheus registry; None creates one.
        link: an MQTT link (tests); None creates :class:`agent.mqtt.link.MqttLink` from ``config.mqtt``.

    Example:
        >>> agent = Agent(load_config("config.toml"))  # doctest: +SKIP
        >>> asyncio.run(agent.run())  # doctest: +SKIP
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        sources: dict[str, Any] | None = None,
        model: LoadedModel | None = None,
        registry: CollectorRegistry | None = None,
        link: MqttLink | None = None,
    ) -> None:
        self.config = config
        self.sources = dict(sources or {})
        unknown = sorted(set(self.sources) - {c.name for c in config.cameras})
        if unknown:
            raise AgentError(
                f"source objects given for unknown cameras {unknown}; camera names: {[c.name for c in config.cameras]}"
            )
        self.model = model
        self.metrics = AgentMetrics(registry)
        self.registry = self.metrics.registry
        self.link = link
        self.preview = PreviewHub()
        self.http = AgentHttpServer(
            config.http,
            registry=self.registry,
            health=self.health,
            cameras=[c.name for c in config.cameras],
            preview=self.preview,
        )
        self.snapshots = SnapshotStore(
            config.snapshots_dir,
            max_total_mb=config.snapshots.max_total_mb,
            max_age_h=config.snapshots.max_age_h,
            on_pruned=self.metrics.snapshots_pruned.inc,
            min_free_mb=config.snapshots.min_free_mb,
        )
        self.cameras: dict[str, CameraRuntime] = {}
        self.paused = False
        self.started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_reason = "stopped"
        self._infer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._io_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="publish")
        self._publish_queue: asyncio.Queue[PublishJob] | None = None
        self._owns_model = model is None
        #: the last alarm transitions, newest first (status page, ``/healthz``)
        self.recent_alarms: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_ALARMS)
        #: extra lines for the status page, ``label -> text`` (the demo's tally against ground truth)
        self.status_notes: Callable[[], dict[str, str]] | None = None
        self.alarms: AlarmStore | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self._store_error_logged = -math.inf
        self._log_times: dict[tuple[str, str], float] = {}

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        """Run until stopped (signal, command, ``duration_s``, or every source ended with ``exit_at_end``).

        Returns:
            0.

        Raises:
            CameraError: with ``exit_at_end``, a file or folder source could not be opened or held
                no frame (after a clean shutdown).
            AgentError: startup failed (HTTP port in use, model refused, no threshold, ...); whatever
                was started is stopped again before it propagates.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        self._publish_queue = asyncio.Queue(self.config.pipeline.publish_queue_size)
        tasks: list[asyncio.Task[Any]] = []
        try:
            self.http.start()
            if self.model is None:
                self.model = await loop.run_in_executor(self._infer_pool, load_model, self.config.model)
            self.metrics.model_loaded.set(1)
            self._init_cameras()
            if self.link is None:
                self.link = MqttLink(
                    self.config.mqtt,
                    agent_id=self.config.agent_id,
                    on_command=self._on_command,
                    registry=self.registry,
                )
            self.link.set_status_info(backend=self.model.backend, model=self.model.name)
            self.alarms = AlarmStore(self.link.publish_alarm, stall_s=self.config.pipeline.store_stall_s)
            self.link.clear_retained_on_start_and_stop(self._restart_cleared_topics())
            for runtime in self.cameras.values():  # the retained state says "connecting" from the start
                self._publish_state(runtime.worker.status())
            self.link.start()
            wait_s = self.config.pipeline.broker_wait_s
            if wait_s and not await loop.run_in_executor(None, self.link.connected.wait, wait_s):
                log.warning(
                    "MQTT broker not reachable after %.1f s; scoring anyway (alarms wait in the outbox)",
                    wait_s,
                )
            for runtime in self.cameras.values():
                runtime.worker.slot.attach(loop)
                runtime.worker.start()
            camera_tasks = [
                asyncio.create_task(self._camera_loop(rt), name=f"camera-{name}") for name, rt in self.cameras.items()
            ]
            tasks = [
                *camera_tasks,
                asyncio.create_task(self._publisher(), name="publisher"),
                asyncio.create_task(self._state_ticker(), name="state"),
                asyncio.create_task(self._end_watcher(camera_tasks), name="end-watcher"),
                asyncio.create_task(self._health_ticker(), name="health"),
            ]
            self._tasks = tasks
            for runtime in self.cameras.values():
                runtime.work.restart_window()
            self.started.set()
            log.info(
                "agent %s running: %d camera(s), backend %s, MQTT %s:%d root %s",
                self.config.agent_id,
                len(self.cameras),
                self.model.backend,
                self.config.mqtt.host,
                self.config.mqtt.port,
                self.config.mqtt.topic_root,
            )
            timeout = self.config.duration_s
            try:
                await asyncio.wait_for(self._stop.wait(), timeout)
            except TimeoutError:
                self._stop_reason = f"duration_s {timeout} elapsed"
            log.info("stopping: %s", self._stop_reason)
        finally:
            await self._shutdown(tasks)
        self._check_replays()
        return 0

    def _check_replays(self) -> None:
        """With ``exit_at_end``, a replay that could not be read is an error (a non-zero exit).

        Raises:
            CameraError: a file or folder source could not be opened or held no frame (named, with why).
        """
        if not self.config.exit_at_end:
            return
        failed = []
        for name, runtime in self.cameras.items():
            status = runtime.worker.status()
            if status.state == "failed" and not runtime.worker.live_kind:
                failed.append(f"camera {name}: {status.error}")
        if failed:
            raise CameraError("replay could not be read: " + "; ".join(failed))

    def _restart_cleared_topics(self) -> list[str]:
        """Retained topics whose content is void after a restart or stop: each camera's alarm, PLC alarms."""
        root = self.config.mqtt.topic_root
        topics = [f"{root}/{camera.name}/alarm" for camera in self.config.cameras]
        if self.config.mqtt.plc_topics:
            topics += [f"{root}/plc/{c.name}/{roi.name}/alarm" for c in self.config.cameras for roi in c.rois]
        return topics

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask the agent to stop; safe from any thread and from signal handlers."""
        loop, stop = self._loop, self._stop
        if loop is None or stop is None or loop.is_closed():
            return
        self._stop_reason = reason
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stop.set)

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = True
        for runtime in self.cameras.values():
            runtime.worker.stop_event.set()
            runtime.worker.slot.close()
        camera_tasks = [t for t in tasks if t.get_name().startswith("camera-")]
        if camera_tasks:
            await asyncio.wait(camera_tasks, timeout=10.0)
        if self._publish_queue is not None and tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publish_queue.join(), 10.0)
        if self.alarms is not None:
            await loop.run_in_executor(None, self.alarms.drain)  # every raised alarm is stored before close
            await asyncio.sleep(0)  # let the write callbacks commit their transitions
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.run_in_executor(None, self._stop_cameras)  # each publishes its final state
        if self.link is not None:
            await loop.run_in_executor(None, self.link.close)  # offline, flush the outbox, release it
        self.http.stop()
        if self.model is not None and self._owns_model:
            await loop.run_in_executor(self._infer_pool, self.model.close)
        self.metrics.model_loaded.set(0)
        self._infer_pool.shutdown(wait=True)
        self._io_pool.shutdown(wait=True)
        log.info("agent %s stopped", self.config.agent_id)
        for line in self.summary_lines():
            log.info("summary: %s", line)

    def summary_lines(self) -> list[str]:
        """The run's tally per ``camera/roi``: frames, NG verdicts, alarms, NG frames the debounce held back."""
        return [
            summary_line(f"{name}/{roi}", decision.tally, decision.rule)
            for name, runtime in self.cameras.items()
            for roi, decision in runtime.decisions.items()
        ]

    def _stop_cameras(self) -> None:
        for runtime in self.cameras.values():
            runtime.worker.stop()

    def _init_cameras(self) -> None:
        for camera in self.config.cameras:
            worker = CameraWorker(
                camera,
                metrics=self.metrics,
                override=self.sources.get(camera.name),
                on_state=self._publish_state,
            )
            runtime = CameraRuntime(config=camera, worker=worker)
            self._reset_thresholds(runtime)
            self.cameras[camera.name] = runtime

    # ------------------------------------------------------------------ state and health
    def _publish_state(self, status: CameraStatus) -> None:
        """Publish a camera's retained state (from any thread)."""
        if self.link is None:
            return
        payload = CameraStatePayload(
            camera=status.camera,
            state=status.state,
            connected=status.state == "connected",
            fps=status.fps,
            last_frame_age_s=status.last_frame_age_s,
            frames_captured=status.frames_captured,
            frames_dropped=status.frames_dropped,
            reconnects=status.reconnects,
            error=redact(status.error) if status.error is not None else None,
        )
        try:
            self.link.publish_camera_state(status.camera, payload)
        except Exception:
            log.exception("camera %s: publishing the state failed", status.camera)

    async def _state_ticker(self) -> None:
        while True:
            await asyncio.sleep(self.config.pipeline.state_interval_s)
            for name, runtime in self.cameras.items():
                self._publish_state(runtime.worker.status())
                self.metrics.queue_depth.labels(f"frames_{name}").set(runtime.worker.slot.depth)
            if self._publish_queue is None:
                raise AgentError("internal error: _publish_queue used before the agent started (run() sets it up)")
            self.metrics.queue_depth.labels("publish").set(self._publish_queue.qsize())

    # ------------------------------------------------------------------ the per-camera loop
    async def _camera_loop(self, runtime: CameraRuntime) -> None:
        loop = asyncio.get_running_loop()
        name = runtime.config.name
        slot = runtime.worker.slot
        while True:
            frame = await slot.get()
            if frame is None:
                log.info("camera %s: no more frames", name)
                return
            taken = time.perf_counter()
            self.metrics.frame_age.labels(name).observe(max(0.0, taken - frame.capture_mono))
            if self.paused:
                self.metrics.frame_dropped(name, "paused")
                continue
            if not self._frame_fits(runtime, frame):
                continue
            model = self.model
            if model is None:
                raise AgentError("internal error: model used before the agent started (run() sets it up)")
            try:
                scored = await loop.run_in_executor(self._infer_pool, self._score, runtime.config, frame, taken)
            except Exception as exc:
                self.metrics.errors.labels("inference").inc()
                runtime.work.failed(f"inference failed: {exc}")
                log.error("camera %s: inference failed on frame %s: %s", name, frame.seq, exc)
                continue
            if not scored.rois:
                self.metrics.frame_broken(name, "roi")
                runtime.work.failed(f"every ROI lies outside the {frame.image.shape[1]}x{frame.image.shape[0]} frame")
                continue
            self.metrics.inference_latency.labels(model.backend).observe(scored.inference_ms / 1e3)
            self.metrics.frames_scored.labels(name).inc()
            try:
                self._decide_and_publish(runtime, frame, scored, model)
            except Exception:
                self.metrics.errors.labels("decision").inc()
                log.exception("camera %s: publishing frame %s failed", name, frame.seq)

    def _frame_fits(self, runtime: CameraRuntime, frame: Frame) -> bool:
        """False (frame counted as broken, reason ``too_large``) when a side exceeds ``max_frame_side_px``."""
        limit = runtime.config.max_frame_side_px
        height, width = frame.image.shape[:2]
        if height <= limit and width <= limit:
            return True
        name = runtime.config.name
        self.metrics.frame_broken(name, "too_large")
        reason = f"frame of {width}x{height} px is larger than cameras.max_frame_side_px = {limit}"
        runtime.work.failed(reason)
        now = time.monotonic()
        if now - self._log_times.get(("too_large", name), -math.inf) >= 10.0:  # one line per 10 s per camera
            self._log_times[("too_large", name)] = now
            log.warning("camera %s: %s: dropped (frame %s; further ones counted quietly)", name, reason, frame.seq)
        return False

    def _score(self, camera: CameraConfig, frame: Frame, taken: float) -> ScoredFrame:
        """Crop, preprocess and score every ROI of a frame as one batch (inference thread)."""
        model = self.model
        if model is None:
            raise AgentError("internal error: model used before the agent started (run() sets it up)")
        t0 = time.perf_counter()
        boxes: list[tuple[str, Box]] = []
        crops = []
        for roi in camera.rois:
            cropped = crop_box(frame.image, roi.box_px)
            if cropped is None:
                continue
            box, crop = cropped
            boxes.append((roi.name, box))
            crops.append(to_model_input(crop, model.image_size, source=f"{camera.name}/{roi.name}"))
        if not crops:
            return ScoredFrame([], 0.0, 0.0, taken)
        batch = np.stack(crops)
        t1 = time.perf_counter()
        out = model.runner.infer(batch)
        rois = [
            RoiScore(name, box, float(score), amap[0])
            for (name, box), score, amap in zip(boxes, out.score.tolist(), out.anomaly_map)
        ]
        return ScoredFrame(rois, (t1 - t0) * 1e3, out.inference_ms, taken)

    async def _end_watcher(self, camera_tasks: list[asyncio.Task[Any]]) -> None:
        await asyncio.gather(*camera_tasks, return_exceptions=True)
        if self.config.exit_at_end:
            if self._publish_queue is None:
                raise AgentError("internal error: _publish_queue used before the agent started (run() sets it up)")
            await self._publish_queue.join()
            self.request_stop("every source ended (exit_at_end)")
