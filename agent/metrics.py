"""Prometheus metrics of the agent, updated where each event happens.

One :class:`AgentMetrics` owns the agent's collectors on a ``CollectorRegistry`` (the same
registry is given to :class:`agent.mqtt.link.MqttLink`, which adds its ``fod_mqtt_*`` / ``fod_alarm*``
collectors, and ``/metrics`` serves it). The status page and ``/healthz`` read the same objects;
nothing is re-parsed from text.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class AgentMetrics:
    """The agent's Prometheus collectors.

    Args:
        registry: where to register; None creates a fresh ``CollectorRegistry``.

    Attributes:
        registry: the registry served on ``/metrics``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Long on purpose: the catalogue of every collector (name, help, labels), one declaration each and
        # nothing else; split up, the list of what /metrics serves would no longer read in one place.
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.frames_captured = Counter(
            "fod_frames_captured_total", "Good frames read from the source", ["camera"], registry=r
        )
        self.frames_dropped = Counter(
            "fod_frames_dropped_total",
            "Frames not scored: replaced by a newer one (reason=newest_frame) or skipped while paused",
            ["camera", "reason"],
            registry=r,
        )
        self.frames_broken = Counter(
            "fod_frames_broken_total",
            "Unusable frames or failed reads (reason=empty|dtype|shape|size|read_failed|roi)",
            ["camera", "reason"],
            registry=r,
        )
        self.frames_scored = Counter("fod_frames_scored_total", "Frames scored by the model", ["camera"], registry=r)
        self.camera_reconnects = Counter(
            "fod_camera_reconnects_total",
            "Times a source was reopened after a failure",
            ["camera"],
            registry=r,
        )
        self.camera_up = Gauge("fod_camera_connected", "1 while the source delivers frames", ["camera"], registry=r)
        self.camera_stalls = Counter(
            "fod_camera_stalls_total",
            "Times the watchdog found a live source silent for stale_after_s and reopened it",
            ["camera"],
            registry=r,
        )
        self.inference_latency = Histogram(
            "fod_inference_latency_seconds",
            "Backend inference time of one batch (all ROIs of a frame), s",
            ["backend"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.end_to_end_latency = Histogram(
            "fod_end_to_end_latency_seconds",
            "Frame capture to result publish, s",
            ["camera"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.frame_age = Histogram(
            "fod_frame_age_at_inference_seconds",
            "Age of a frame when the pipeline took it for inference, s",
            ["camera"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_depth = Gauge("fod_queue_depth", "Items waiting in a pipeline queue", ["queue"], registry=r)
        self.queue_dropped = Counter(
            "fod_queue_dropped_total",
            "Items dropped from a full queue (drop-oldest policy)",
            ["queue"],
            registry=r,
        )
        self.alarm_transitions = Counter(
            "fod_alarm_transitions_total",
            "Debounced alarm state changes",
            ["camera", "roi", "state"],
            registry=r,
        )
        self.model_loaded = Gauge("fod_model_loaded", "1 while a model is loaded", registry=r)
        self.paused = Gauge("fod_paused", "1 while scoring is paused by command", registry=r)
        self.snapshots_saved = Counter("fod_snapshots_saved_total", "Snapshots written", ["camera"], registry=r)
        self.snapshots_pruned = Counter("fod_snapshots_pruned_total", "Snapshots deleted by retention", registry=r)
        self.healthy = Gauge("fod_healthy", "1 while the derived health is good, else 0 (see /healthz)", registry=r)
        self.health_problems = Gauge(
            "fod_health_problems", "Number of health problems (their text is in /healthz and the status)", registry=r
        )
        self.alarm_store_failures = Counter(
            "fod_alarm_store_failures_total",
            "Alarm writes to the outbox that failed (the transition is not taken and is retried)",
            registry=r,
        )
        self.alarms_pending = Gauge("fod_alarm_store_pending", "Alarms waiting to be written to the outbox", registry=r)
        self.errors = Counter("fod_pipeline_errors_total", "Errors caught in the pipeline", ["stage"], registry=r)

    # CaptureMetrics protocol (agent.capture) -------------------------------------------------
    def frame_captured(self, camera: str) -> None:
        """Count a good frame read from ``camera``."""
        self.frames_captured.labels(camera).inc()

    def frame_dropped(self, camera: str, reason: str) -> None:
        """Count a frame of ``camera`` that was not scored."""
        self.frames_dropped.labels(camera, reason).inc()

    def frame_broken(self, camera: str, reason: str) -> None:
        """Count an unusable frame or failed read of ``camera``."""
        self.frames_broken.labels(camera, reason).inc()

    def camera_reconnect(self, camera: str) -> None:
        """Count a reopen of ``camera``'s source."""
        self.camera_reconnects.labels(camera).inc()

    def camera_connected(self, camera: str, connected: bool) -> None:
        """Set whether ``camera`` delivers frames."""
        self.camera_up.labels(camera).set(1 if connected else 0)

    def camera_stalled(self, camera: str) -> None:
        """Count a watchdog stall of ``camera`` (no frame for ``stale_after_s``)."""
        self.camera_stalls.labels(camera).inc()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Read one sample from the registry (tests, status page).

        Args:
            name: sample name, e.g. ``fod_frames_captured_total``.
            labels: label values that must match; None = the sum over all label values.

        Returns:
            The value, 0.0 when the sample does not exist yet.
        """
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += sample.value
        return total
