"""The agent's pipeline on asyncio: capture -> ROI preprocessing -> inference -> decision -> publishers.

Stages and hand-offs (each bounded, with a declared policy and a metric):

1. **capture** (one thread per camera, :class:`agent.capture.CameraWorker`) -> a one-frame
   :class:`agent.capture.FrameSlot`: newest-frame policy for live sources (replaced frames counted in
   ``fod_frames_dropped_total{reason="newest_frame"}``), model pace for files and folders;
2. **inference** (one worker thread shared by all cameras, so the runner is never used from two
   threads): every ROI of a frame is cropped, passed through :func:`fod.preprocess.to_model_input`
   and scored in one batch;
3. **decision** (event loop): per-ROI threshold, verdict, N-of-M debounce and hysteresis
   (:mod:`agent.decision`); every scored ROI is published as a result, every alarm transition is
   written to the on-disk outbox by :class:`agent.alarms.AlarmStore` (one dedicated thread, order
   kept, never on the event loop); the transition is committed only once the alarm is stored, so a
   failed write is retried on the next frame instead of being lost;
4. **publish queue** (``pipeline.publish_queue_size``, drop-oldest, ``fod_queue_dropped_total``):
   NG frames (and preview frames while someone watches) wait here for a worker thread that renders
   the mask PNG and overlay JPEG, publishes them and writes snapshots.

Commands arrive from the MQTT link's thread and are handed to the event loop with
``asyncio.run_coroutine_threadsafe``. :meth:`Agent.request_stop` is thread- and signal-safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from agent import __version__
from agent.alarms import AlarmSkipped, AlarmStore
from agent.backends import LoadedModel, load_model
from agent.capture import CameraStatus, CameraWorker, Frame
from agent.commands import Command, CommandError, Pause, ReloadModel, Resume, SetThreshold, Snapshot
from agent.config import AgentConfig, CameraConfig
from agent.decision import DecisionRule, RoiDecision
from agent.errors import AgentError
from agent.health import WorkLog
from agent.http import AgentHttpServer, PreviewHub
from agent.metrics import AgentMetrics
from agent.mqtt.link import MqttLink
from agent.redact import redact
from agent.render import (
    Box,
    MapScale,
    encode_jpeg,
    encode_png,
    frame_map,
    mask_image,
    overlay_image,
    resize_to_width,
)
from agent.schemas import AlarmPayload, CameraStatePayload, LatencyMs, ResultPayload, Verdict
from agent.snapshots import SnapshotFiles, SnapshotStore
from fod.normalization import normalize_score
from fod.preprocess import crop_box, to_model_input

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 5.0
RELOAD_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RoiScore:
    """Model output for one ROI of a frame.

    Attributes:
        name: ROI name.
        box: ``(x, y, w, h)`` in frame px, clipped to the frame.
        score: raw image score.
        anomaly_map: ``[h, w]`` float32 at model resolution.
    """

    name: str
    box: Box
    score: float
    anomaly_map: np.ndarray


@dataclass(frozen=True)
class ScoredFrame:
    """All ROIs of one frame after inference.

    Attributes:
        rois: one :class:`RoiScore` per ROI (ROIs outside the frame are left out).
        preprocess_ms: crop + resize of every ROI, ms.
        inference_ms: backend time of the batch, ms.
        taken_mono: ``time.perf_counter()`` when the pipeline took the frame, s.
    """

    rois: list[RoiScore]
    preprocess_ms: float
    inference_ms: float
    taken_mono: float


@dataclass
class PublishJob:
    """An NG or preview frame waiting for rendering, image publishing and snapshots."""

    camera: str
    seq: int
    frame: Frame
    scored: ScoredFrame
    verdicts: dict[str, str]
    results: list[dict[str, Any]]
    images: bool
    snapshot: bool
    preview: bool
    scale: MapScale


@dataclass
class CameraRuntime:
    """Per-camera state of the pipeline (thresholds, decisions, counters, capture worker)."""

    config: CameraConfig
    worker: CameraWorker
    thresholds: dict[str, float] = field(default_factory=dict)
    decisions: dict[str, RoiDecision] = field(default_factory=dict)
    scored: int = 0
    snapshot_requested: bool = False
    last_snapshot_mono: float = -math.inf
    last_preview_mono: float = -math.inf
    last_scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    work: WorkLog = field(default_factory=WorkLog)
    committed: dict[str, RoiDecision] = field(default_factory=dict)
    """ROI -> its decision right after its last stored alarm (restored when a write fails)."""
    chains: dict[str, int] = field(default_factory=dict)
    """ROI -> alarm chain number, bumped when a write fails (see :mod:`agent.alarms`)."""


class Agent:
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
            config.snapshots.dir,
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
        return 0

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

    def _reset_thresholds(self, runtime: CameraRuntime) -> None:
        if self.model is None:
            raise AgentError("internal error: model used before the agent started (run() sets it up)")
        decision = self.config.decision
        for roi in runtime.config.rois:
            threshold = roi.threshold if roi.threshold is not None else self.model.calibration.image_threshold
            runtime.thresholds[roi.name] = threshold
            rule = DecisionRule(threshold, decision.hysteresis, decision.debounce_n, decision.debounce_m)
            if roi.name in runtime.decisions:
                runtime.decisions[roi.name].set_rule(rule)
            else:
                runtime.decisions[roi.name] = RoiDecision(rule)

    # ------------------------------------------------------------------ state and health
    def _publish_state(self, status: CameraStatus) -> None:
        """Publish a camera's retained state (from any thread)."""
        if self.link is None:
            return
        payload = CameraStatePayload(
            camera=status.camera,
            state=status.state,  # type: ignore[arg-type]
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
                "error": status.error,
                "thresholds": dict(runtime.thresholds),
                "last": dict(runtime.last_scores),
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

    def _decide_and_publish(
        self, runtime: CameraRuntime, frame: Frame, scored: ScoredFrame, model: LoadedModel
    ) -> None:
        """Thresholds, debounce, result messages, alarm writes and the NG publish job (event loop).

        A transition's alarm is written off the loop (:meth:`_write_alarm`); when the write fails,
        the ROI goes back to its last stored state and the transition is raised again (retry).
        """
        t_post = time.perf_counter()
        name = runtime.config.name
        link = self.link
        if link is None:
            raise AgentError("internal error: link used before the agent started (run() sets it up)")
        calibration = model.calibration
        seq = runtime.scored
        runtime.scored += 1
        verdicts: dict[str, str] = {}
        results: list[dict[str, Any]] = []
        for roi in scored.rois:
            threshold = runtime.thresholds[roi.name]
            decision = runtime.decisions[roi.name]
            if not math.isfinite(roi.score):
                self.metrics.errors.labels("score").inc()
                runtime.work.failed(f"ROI {roi.name}: non-finite score {roi.score}")
                log.warning("camera %s/%s: non-finite score %s on frame %s", name, roi.name, roi.score, frame.seq)
                continue
            verdict = decision.rule.verdict(roi.score)
            transition = decision.update(roi.score)
            normalized = normalize_score(roi.score, calibration, threshold)
            verdicts[roi.name] = verdict
            result = self._result(name, roi, seq, frame, scored, normalized, threshold, verdict, t_post)
            link.publish_result(name, result)
            runtime.work.scored(roi.name)
            if transition is not None:
                alarm = AlarmPayload(
                    camera=name,
                    roi=roi.name,
                    state=transition.state,
                    previous=transition.previous,
                    ts=frame.capture_ts,
                    score=roi.score,
                    normalized_score=normalized,
                    threshold=threshold,
                    source_frame=frame.source_frame,
                )
                self._write_alarm(runtime, decision.copy(), alarm)
            runtime.last_scores[roi.name] = {
                "score": roi.score,
                "normalized_score": normalized,
                "verdict": verdict,
                "alarm": runtime.decisions[roi.name].state,
                "source_frame": frame.source_frame,
            }
            results.append(result.model_dump(mode="json"))
        self.metrics.end_to_end_latency.labels(name).observe(max(0.0, time.perf_counter() - frame.capture_mono))
        self._queue_publish_job(runtime, frame, scored, verdicts, results, model)

    @staticmethod
    def _result(
        camera: str,
        roi: RoiScore,
        seq: int,
        frame: Frame,
        scored: ScoredFrame,
        normalized: float,
        threshold: float,
        verdict: str,
        t_post: float,
    ) -> ResultPayload:
        postprocess_ms = (time.perf_counter() - t_post) * 1e3
        total_ms = (time.perf_counter() - frame.capture_mono) * 1e3
        return ResultPayload(
            seq=seq,
            capture_ts=frame.capture_ts,
            camera=camera,
            roi=roi.name,
            source_frame=frame.source_frame,
            score=roi.score,
            normalized_score=normalized,
            threshold=threshold,
            verdict=verdict,  # type: ignore[arg-type]
            latency_ms=LatencyMs(
                capture=round((scored.taken_mono - frame.capture_mono) * 1e3, 3),
                preprocess=round(scored.preprocess_ms, 3),
                inference=round(scored.inference_ms, 3),
                postprocess=round(postprocess_ms, 3),
                total=round(total_ms, 3),
            ),
        )

    def _write_alarm(self, runtime: CameraRuntime, after: RoiDecision, alarm: AlarmPayload) -> None:
        """Hand one alarm to the store thread; ``after`` is the ROI's decision right after the transition."""
        if self.alarms is None:
            raise AgentError("internal error: alarm store used before the agent started (run() sets it up)")
        chain = runtime.chains.get(alarm.roi, 0)
        future = self.alarms.submit(runtime.config.name, alarm, chain)
        future.add_done_callback(functools.partial(self._alarm_written, runtime, after, alarm, chain))

    def _alarm_written(
        self,
        runtime: CameraRuntime,
        after: RoiDecision,
        alarm: AlarmPayload,
        chain: int,
        future: asyncio.Future[AlarmPayload],
    ) -> None:
        """Record a stored alarm, or send the ROI back to its last stored state (event loop)."""
        name, roi = runtime.config.name, alarm.roi
        if future.cancelled() or chain != runtime.chains.get(roi, 0):
            return
        exc = future.exception()
        if isinstance(exc, AlarmSkipped):
            return
        current = runtime.decisions[roi]
        if exc is not None:
            self.metrics.alarm_store_failures.inc()
            runtime.chains[roi] = chain + 1
            base = runtime.committed.get(roi)
            restored = base.copy() if base is not None else RoiDecision(current.rule)
            restored.set_rule(current.rule)
            runtime.decisions[roi] = restored
            now = time.monotonic()
            quiet = now - self._store_error_logged < 10.0  # retried every frame: one error line per 10 s
            self._store_error_logged = now if not quiet else self._store_error_logged
            (log.debug if quiet else log.error)(
                "alarm %s/%s %s -> %s NOT stored; the ROI is back to %s and the transition is retried: %s",
                name,
                roi,
                alarm.previous,
                alarm.state,
                restored.state,
                exc,
            )
            return
        runtime.committed[roi] = after
        stored = future.result()
        self.metrics.alarm_transitions.labels(name, roi, alarm.state).inc()
        log.info(
            "alarm %s/%s: %s -> %s (score %.4g, threshold %.4g, frame %s, alarm_id %s)",
            name,
            roi,
            alarm.previous,
            alarm.state,
            alarm.score,
            alarm.threshold,
            alarm.source_frame,
            stored.alarm_id,
        )

    def _queue_publish_job(
        self,
        runtime: CameraRuntime,
        frame: Frame,
        scored: ScoredFrame,
        verdicts: dict[str, str],
        results: list[dict[str, Any]],
        model: LoadedModel,
    ) -> None:
        now = time.perf_counter()
        name = runtime.config.name
        ng = "NG" in verdicts.values()
        link = self.link
        verdict: Verdict = "NG" if ng else "OK"
        images = link is not None and (
            link.image_wanted(name, "mask", verdict) or link.image_wanted(name, "overlay", verdict)
        )
        snapshot = runtime.snapshot_requested or (
            ng
            and self.config.snapshots.enabled
            and now - runtime.last_snapshot_mono >= self.config.snapshots.min_interval_s
        )
        preview = self.preview.watching(name) and now - runtime.last_preview_mono >= 1.0 / self.config.http.preview_fps
        if not (images or snapshot or preview):
            return
        if snapshot:
            runtime.snapshot_requested = False
            runtime.last_snapshot_mono = now
        if preview:
            runtime.last_preview_mono = now
        cal = model.calibration
        scale = MapScale(
            low=min(cal.norm_min, 0.0),
            threshold=cal.pixel_threshold,
            high=max(cal.norm_max, cal.pixel_threshold),
        )
        job = PublishJob(name, runtime.scored - 1, frame, scored, verdicts, results, images, snapshot, preview, scale)
        queue = self._publish_queue
        if queue is None:
            raise AgentError("internal error: queue used before the agent started (run() sets it up)")
        if queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
                queue.task_done()
                self.metrics.queue_dropped.labels("publish").inc()
        queue.put_nowait(job)
        self.metrics.queue_depth.labels("publish").set(queue.qsize())

    async def _publisher(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._publish_queue
        if queue is None:
            raise AgentError("internal error: queue used before the agent started (run() sets it up)")
        while True:
            job = await queue.get()
            try:
                await loop.run_in_executor(self._io_pool, self._render_job, job)
            except Exception:
                self.metrics.errors.labels("publish").inc()
                log.exception("camera %s: rendering or saving frame %s failed", job.camera, job.frame.seq)
            finally:
                queue.task_done()
                self.metrics.queue_depth.labels("publish").set(queue.qsize())

    def _render_job(self, job: PublishJob) -> None:
        """Render mask and overlay, publish images, save the snapshot, feed the preview (publish thread)."""
        image = job.frame.image
        amap = frame_map(image.shape[:2], [(r.box, r.anomaly_map) for r in job.scored.rois])
        boxes = [(r.name, r.box, job.verdicts.get(r.name, "OK")) for r in job.scored.rois]
        overlay = overlay_image(image, amap, job.scale, boxes=boxes)
        mask_png = encode_png(mask_image(amap, job.scale.threshold)) if job.images or job.snapshot else b""
        overlay_jpeg = encode_jpeg(overlay) if job.images or job.snapshot else b""
        if job.images and self.link is not None:
            self.link.publish_image(job.camera, "mask", mask_png)
            self.link.publish_image(job.camera, "overlay", overlay_jpeg)
        if job.snapshot:
            files = SnapshotFiles(encode_jpeg(image, 92), mask_png, overlay_jpeg, {"results": job.results})
            try:
                path = self.snapshots.save(job.camera, job.seq, job.frame.capture_ts, files)
                self.metrics.snapshots_saved.labels(job.camera).inc()
                log.debug("camera %s: snapshot %s", job.camera, path)
            except OSError as exc:
                self.metrics.errors.labels("snapshot").inc()
                log.error("camera %s: cannot write snapshot to %s: %s", job.camera, self.snapshots.root, exc)
        if job.preview:
            self.preview.publish(
                job.camera, encode_jpeg(resize_to_width(overlay, self.config.http.preview_width_px), 75)
            )

    async def _end_watcher(self, camera_tasks: list[asyncio.Task[Any]]) -> None:
        await asyncio.gather(*camera_tasks, return_exceptions=True)
        if self.config.exit_at_end:
            if self._publish_queue is None:
                raise AgentError("internal error: _publish_queue used before the agent started (run() sets it up)")
            await self._publish_queue.join()
            self.request_stop("every source ended (exit_at_end)")

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
