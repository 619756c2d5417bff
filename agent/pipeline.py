"""The agent's pipeline on asyncio: capture -> ROI preprocessing -> inference -> decision -> publishers.

Stages and hand-offs (each bounded, with a declared policy and a metric):

1. **capture** (one thread per camera, :class:`agent.capture.CameraWorker`) -> a one-frame
   :class:`agent.capture.FrameSlot`: newest-frame policy for live sources (replaced frames counted in
   ``fod_frames_dropped_total{reason="newest_frame"}``), model pace for files and folders;
2. **inference** (one worker thread shared by all cameras, so the runner is never used from two
   threads): every ROI of a frame is cropped, passed through :func:`fod.preprocess.to_model_input`
   and scored in one batch;
3. **decision** (event loop): per-ROI threshold, verdict, N-of-M debounce and hysteresis
   (:mod:`agent.decision`); every scored ROI is published as a result, every alarm transition goes
   straight to :meth:`agent.mqtt.link.MqttLink.publish_alarm` (its on-disk outbox: never dropped);
4. **publish queue** (``pipeline.publish_queue_size``, drop-oldest, ``fod_queue_dropped_total``):
   NG frames (and preview frames while someone watches) wait here for a worker thread that renders
   the mask PNG and overlay JPEG, publishes them and writes snapshots.

Commands arrive from the MQTT link's thread and are handed to the event loop with
``asyncio.run_coroutine_threadsafe``. :meth:`Agent.request_stop` is thread- and signal-safe.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from agent import __version__
from agent.backends import LoadedModel, load_model
from agent.capture import CameraStatus, CameraWorker, Frame
from agent.commands import Command, CommandError, Pause, ReloadModel, Resume, SetThreshold, Snapshot
from agent.config import AgentConfig, CameraConfig
from agent.decision import DecisionRule, RoiDecision, summary_line
from agent.errors import AgentError, CameraError
from agent.http import AgentHttpServer, PreviewHub
from agent.metrics import AgentMetrics
from agent.mqtt.link import MqttLink
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
RECENT_ALARMS = 20  # alarm transitions kept for the status page
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
    plc_alarm: dict[str, str] = field(default_factory=dict)


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
            config.snapshots_dir,
            max_total_mb=config.snapshots.max_total_mb,
            max_age_h=config.snapshots.max_age_h,
            on_pruned=self.metrics.snapshots_pruned.inc,
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
            ]
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
        for runtime in self.cameras.values():
            runtime.worker.stop_event.set()
            runtime.worker.slot.close()
        camera_tasks = [t for t in tasks if t.get_name().startswith("camera-")]
        if camera_tasks:
            await asyncio.wait(camera_tasks, timeout=10.0)
        if self._publish_queue is not None and tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publish_queue.join(), 10.0)
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
            state=status.state,
            connected=status.state == "connected",
            fps=status.fps,
            last_frame_age_s=status.last_frame_age_s,
            frames_captured=status.frames_captured,
            frames_dropped=status.frames_dropped,
            reconnects=status.reconnects,
            error=status.error,
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

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Health of the agent (``/healthz``; thread-safe).

        Returns:
            ``(healthy, details)``: healthy when the model is loaded and every camera is connected
            and produced a frame within its ``stale_after_s``.
        """
        model = self.model
        model_ok = model is not None and model.runner.is_active
        cameras: dict[str, Any] = {}
        healthy = model_ok
        for name, runtime in self.cameras.items():
            status = runtime.worker.status()
            age = status.last_frame_age_s
            ok = status.state == "connected" and age is not None and age <= runtime.config.stale_after_s
            healthy = healthy and ok
            cameras[name] = {
                "healthy": ok,
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
        if not self.cameras:
            healthy = False
        link = self.link
        return healthy, {
            "agent_id": self.config.agent_id,
            "version": __version__,
            "model_loaded": model_ok,
            "backend": model.backend if model is not None else None,
            "backend_reason": model.reason if model is not None else None,
            "model": model.name if model is not None else None,
            "paused": self.paused,
            "mqtt_connected": bool(link is not None and link.connected.is_set()),
            "cameras": cameras,
            "recent_alarms": list(self.recent_alarms),
            "notes": self.status_notes() if self.status_notes is not None else {},
        }

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
            model = self.model
            if model is None:
                raise AgentError("internal error: model used before the agent started (run() sets it up)")
            try:
                scored = await loop.run_in_executor(self._infer_pool, self._score, runtime.config, frame, taken)
            except Exception as exc:
                self.metrics.errors.labels("inference").inc()
                log.error("camera %s: inference failed on frame %s: %s", name, frame.seq, exc)
                continue
            if not scored.rois:
                self.metrics.frame_broken(name, "roi")
                continue
            self.metrics.inference_latency.labels(model.backend).observe(scored.inference_ms / 1e3)
            self.metrics.frames_scored.labels(name).inc()
            try:
                self._decide_and_publish(runtime, frame, scored, model)
            except Exception:
                self.metrics.errors.labels("decision").inc()
                log.exception("camera %s: publishing frame %s failed", name, frame.seq)

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
        """Thresholds, debounce, result and alarm messages, and the NG publish job (event loop)."""
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
        pending: list[tuple[ResultPayload, AlarmPayload | None]] = []
        for roi in scored.rois:
            threshold = runtime.thresholds[roi.name]
            decision = runtime.decisions[roi.name]
            if not math.isfinite(roi.score):
                self.metrics.errors.labels("score").inc()
                log.warning("camera %s/%s: non-finite score %s on frame %s", name, roi.name, roi.score, frame.seq)
                continue
            verdict = decision.rule.verdict(roi.score)
            transition = decision.update(roi.score)
            normalized = normalize_score(roi.score, calibration, threshold)
            verdicts[roi.name] = verdict
            alarm = None
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
            postprocess_ms = (time.perf_counter() - t_post) * 1e3
            total_ms = (time.perf_counter() - frame.capture_mono) * 1e3
            result = ResultPayload(
                seq=seq,
                capture_ts=frame.capture_ts,
                camera=name,
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
            pending.append((result, alarm))
            runtime.last_scores[roi.name] = {
                "score": roi.score,
                "normalized_score": normalized,
                "verdict": verdict,
                "alarm": decision.state,
                "source_frame": frame.source_frame,
            }
        if self.config.mqtt.plc_topics:
            self._publish_plc(runtime, pending)
        for result, alarm in pending:
            link.publish_result(name, result)
            if alarm is not None:
                link.publish_alarm(name, alarm)
                self.metrics.alarm_transitions.labels(name, alarm.roi, alarm.state).inc()
                self.recent_alarms.appendleft(
                    {
                        "ts": alarm.ts,
                        "camera": name,
                        "roi": alarm.roi,
                        "previous": alarm.previous,
                        "state": alarm.state,
                        "score": alarm.score,
                        "threshold": alarm.threshold,
                        "source_frame": alarm.source_frame,
                    }
                )
                log.info(
                    "alarm %s/%s: %s -> %s (score %.4g, threshold %.4g, frame %s)",
                    name,
                    alarm.roi,
                    alarm.previous,
                    alarm.state,
                    alarm.score,
                    alarm.threshold,
                    alarm.source_frame,
                )
            results.append(result.model_dump(mode="json"))
        self.metrics.end_to_end_latency.labels(name).observe(max(0.0, time.perf_counter() - frame.capture_mono))
        self._queue_publish_job(runtime, frame, scored, verdicts, results, model)

    def _publish_plc(self, runtime: CameraRuntime, pending: list[tuple[ResultPayload, AlarmPayload | None]]) -> None:
        """PLC tokens: the debounced alarm state ('1' NG / '0' OK) when it changes (and on the first
        scored frame), and the normalised score of every scored frame (3 decimals).
        """
        link = self.link
        if link is None:
            return
        name = runtime.config.name
        for result, _ in pending:
            state = "1" if runtime.decisions[result.roi].state == "NG" else "0"
            if runtime.plc_alarm.get(result.roi) != state:
                runtime.plc_alarm[result.roi] = state
                link.publish_plc(name, result.roi, "alarm", state)
            link.publish_plc(name, result.roi, "score", f"{result.normalized_score:.3f}")

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
            log.info("command: scoring resumed")
            return {"paused": False}
        if isinstance(command, ReloadModel):
            return await self._reload(command)
        raise CommandError(f"command {type(command).__name__} is not handled by this agent")

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
