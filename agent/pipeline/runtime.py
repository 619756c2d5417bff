"""Per-camera state of the pipeline, the values handed between its stages, and the agent's shared state.

:class:`AgentState` declares what the parts of :class:`agent.pipeline.Agent` (decisions, images,
health checks, commands) share; :class:`agent.pipeline.agent.Agent` sets it up in ``__init__``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from agent.alarms import AlarmStore
from agent.backends import LoadedModel
from agent.capture import CameraWorker, Frame
from agent.config import AgentConfig, CameraConfig
from agent.decision import DecisionRule, RoiDecision
from agent.errors import AgentError
from agent.health import WorkLog
from agent.http import AgentHttpServer, PreviewHub
from agent.metrics import AgentMetrics
from agent.mqtt.link import MqttLink
from agent.render import (
    Box,
    MapScale,
)
from agent.snapshots import SnapshotStore

log = logging.getLogger(__name__)



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
    work: WorkLog = field(default_factory=WorkLog)
    committed: dict[str, RoiDecision] = field(default_factory=dict)
    """ROI -> its decision right after its last stored alarm (restored when a write fails)."""
    chains: dict[str, int] = field(default_factory=dict)
    """ROI -> alarm chain number, bumped when a write fails (see :mod:`agent.alarms`)."""


class AgentState:
    """Attributes shared by the parts of :class:`agent.pipeline.Agent` (set in its ``__init__``)."""

    config: AgentConfig
    sources: dict[str, Any]
    model: LoadedModel | None
    metrics: AgentMetrics
    registry: CollectorRegistry
    link: MqttLink | None
    preview: PreviewHub
    http: AgentHttpServer
    snapshots: SnapshotStore
    cameras: dict[str, CameraRuntime]
    paused: bool
    started: threading.Event
    alarms: AlarmStore | None
    _loop: asyncio.AbstractEventLoop | None
    _stop: asyncio.Event | None
    _stop_reason: str
    _infer_pool: concurrent.futures.ThreadPoolExecutor
    _io_pool: concurrent.futures.ThreadPoolExecutor
    _publish_queue: asyncio.Queue[PublishJob] | None
    _owns_model: bool
    _tasks: list[asyncio.Task[Any]]
    _stopping: bool
    _store_error_logged: float
    _log_times: dict[tuple[str, str], float]
    recent_alarms: collections.deque[dict[str, Any]]
    status_notes: Callable[[], dict[str, str]] | None

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
