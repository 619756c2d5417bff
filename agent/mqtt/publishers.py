"""The link's public publishing API: status, camera states, results, alarms (via the outbox), images.

Called from the agent's threads and event loop; thread-safe, never waits for the network
(``publish_alarm`` waits for one sqlite fsync: call it off the event loop).
"""


from __future__ import annotations

import logging
import time
from typing import Literal

from agent.mqtt.base import LinkState
from agent.mqtt.config import validate_topic_level
from agent.mqtt.size import publish_packet_bytes, shrink_image
from agent.outbox import OutboxEntry
from agent.schemas import (
    AlarmPayload,
    CameraStatePayload,
    ResultPayload,
    Verdict,
)

log = logging.getLogger("agent.mqtt")

PlcKind = Literal["alarm", "score"]
"""PLC token topics: ``alarm`` (``1`` / ``0``, retained) and ``score`` (normalised score, 3 decimals)."""

ImageKind = Literal["mask", "overlay"]
"""Binary image topics: ``mask`` (PNG, binary mask at frame size) and ``overlay`` (JPEG heatmap)."""



class Publishers(LinkState):
    """``publish_*`` methods of :class:`agent.mqtt.link.MqttLink`."""

    def set_status_info(self, *, backend: str | None = None, model: str | None = None) -> None:
        """Set the backend / model named in the status payload; republishes ``online`` when connected.

        Args:
            backend: Inference backend (``tensorrt`` | ``onnxruntime``), or None to keep the current one.
            model: Model package or engine (name or path), or None to keep the current one.
        """
        with self._lock:
            if backend is not None:
                self._backend = backend
            if model is not None:
                self._model = model
            if self._client is not None:
                self._publish_status(self._client, "online")

    def publish_camera_state(self, camera: str, state: CameraStatePayload) -> bool:
        """Publish the retained state of a camera on ``<root>/<camera>/state`` (QoS ``qos_state``).

        The latest state per camera is kept and republished on every reconnection, so it is never
        lost while the broker is away.

        Args:
            camera: Camera name (one topic level, equal to ``state.camera``).
            state: The state payload.

        Returns:
            True when handed to a live connection, False when disconnected (sent on reconnection).

        Raises:
            ValueError: Invalid camera name, or it differs from ``state.camera``.
        """
        self._check_camera(camera, state.camera)
        with self._lock:
            self._states[camera] = state
            if self._client is None:
                return False
            return self._publish_state(self._client, camera, state)

    def publish_result(self, camera: str, result: ResultPayload) -> bool:
        """Publish a scored frame on ``<root>/<camera>/result`` (QoS ``qos_result``, not retained).

        Only every ``result_every_k``-th call per camera and ROI publishes (the 1st, the k+1-th,
        ...). Dropped (and counted) while disconnected.

        Args:
            camera: Camera name (equal to ``result.camera``).
            result: The result payload.

        Returns:
            True when handed to a live connection.

        Raises:
            ValueError: Invalid camera name, or it differs from ``result.camera``.
        """
        self._check_camera(camera, result.camera)
        with self._lock:
            key = (camera, result.roi)
            n = self._result_counts.get(key, 0)
            self._result_counts[key] = n + 1
            client = self._client
        if n % self.config.result_every_k:
            return False
        if client is None:
            self._m_dropped.labels("result", "disconnected").inc()
            return False
        return self._publish(
            client, f"{self.root}/{camera}/result", result.to_json(), self.config.qos_result, False, "result"
        )

    def publish_alarm(self, camera: str, alarm: AlarmPayload) -> AlarmPayload:
        """Store an alarm in the on-disk outbox, then deliver it in order (QoS ``qos_alarm``, retained).

        The outbox assigns ``alarm_seq``, ``alarm_epoch`` and ``alarm_id`` and the link sets
        ``agent_id`` (any value in ``alarm`` is replaced). The alarm is durable
        when this returns (one fsync); it is delivered as soon as the broker is reachable, after
        every earlier alarm, and never dropped unless the outbox overflows (see :mod:`agent.outbox`).

        Args:
            camera: Camera name (equal to ``alarm.camera``).
            alarm: The transition.

        Returns:
            The payload as published, with its ``alarm_seq``.

        Raises:
            ValueError: Invalid camera name, or it differs from ``alarm.camera``.
            agent.outbox.OutboxError: The outbox cannot be written (disk full).
        """
        self._check_camera(camera, alarm.camera)
        stored: list[AlarmPayload] = []

        def make(seq: int) -> bytes:
            epoch = self._outbox.epoch
            identity = {
                "alarm_seq": seq,
                "agent_id": self.agent_id,
                "alarm_epoch": epoch,
                "alarm_id": f"{self.agent_id}/{epoch}/{seq}",
            }
            stored.append(alarm.model_copy(update=identity))
            return stored[-1].to_json()

        self._outbox.add(f"{self.root}/{camera}/alarm", make)
        self._m_alarms.labels(alarm.state).inc()
        self._m_depth.set(len(self._outbox))
        self._wake.set()
        return stored[-1]

    def set_health(self, healthy: bool, problems: list[str]) -> None:
        """Set the health carried by the ``online`` status; republishes it when it changed.

        Args:
            healthy: Derived health (see :meth:`agent.pipeline.Agent.health`).
            problems: Reasons when unhealthy.
        """
        new = (healthy, tuple(problems))
        with self._lock:
            if new == self._health:
                return
            self._health = new
            if self._client is not None:
                self._publish_status(self._client, "online")

    def image_wanted(self, camera: str, kind: ImageKind, verdict: Verdict) -> bool:
        """Whether :meth:`publish_image` would publish now (check before encoding a PNG/JPEG).

        Args:
            camera: Camera name.
            kind: ``mask`` or ``overlay``.
            verdict: Verdict of the frame (``images = "ng"`` publishes NG frames only).

        Returns:
            False for ``images = "never"``, an OK frame with ``images = "ng"``, while disconnected,
            or within ``image_min_interval_s`` of the last image of this kind and camera.
        """
        policy = self.config.images
        if policy == "never" or (policy == "ng" and verdict != "NG"):
            return False
        with self._lock:
            if self._client is None:
                return False
            last = self._image_last.get((camera, kind))
        return last is None or time.monotonic() - last >= self.config.image_min_interval_s

    def publish_image(self, camera: str, kind: ImageKind, data: bytes) -> bool:
        """Publish raw image bytes on ``<root>/<camera>/<kind>`` (QoS 0, not retained), rate-limited.

        The caller decides which frames qualify (see :meth:`image_wanted`); this method enforces
        ``images = "never"``, ``image_min_interval_s`` per camera and kind, and drops the image
        while disconnected.

        Args:
            camera: Camera name.
            kind: ``mask`` (PNG) or ``overlay`` (JPEG).
            data: Encoded image bytes.

        Returns:
            True when handed to a live connection.

        Raises:
            ValueError: Invalid camera name or kind.
        """
        validate_topic_level(camera)
        if kind not in ("mask", "overlay"):
            raise ValueError(f"image kind must be 'mask' or 'overlay', got {kind!r}")
        if self.config.images == "never":
            return False
        now = time.monotonic()
        with self._lock:
            last = self._image_last.get((camera, kind))
            if last is not None and now - last < self.config.image_min_interval_s:
                self._m_dropped.labels(kind, "rate_limit").inc()
                return False
            client = self._client
            if client is None:
                self._m_dropped.labels(kind, "disconnected").inc()
                return False
            self._image_last[(camera, kind)] = now
        topic = f"{self.root}/{camera}/{kind}"
        limit = self.max_packet_bytes
        if limit is not None and not self._fits(topic, data, 0):
            overhead = publish_packet_bytes(topic, 0, 0, v5=self.config.protocol == "5")
            smaller = shrink_image(data, kind, limit - overhead)
            if smaller is None:
                self._m_dropped.labels(kind, "too_large").inc()
                log.debug("%s image of %d bytes cannot be shrunk below %d bytes: skipped", kind, len(data), limit)
                return False
            self._m_resized.labels(kind).inc()
            data = smaller
        return self._publish(client, topic, data, 0, False, kind)

    def publish_plc(self, camera: str, roi: str, kind: PlcKind, token: str) -> bool:
        """Publish a short token on ``<root>/plc/<camera>/<roi>/<kind>`` for PLCs that read few bytes.

        ``alarm`` tokens (``1`` NG, ``0`` OK) are retained, QoS 1, kept and republished on every
        reconnection; ``score`` tokens are QoS 0, not retained, dropped while disconnected.

        Args:
            camera: Camera name.
            roi: ROI name.
            kind: ``alarm`` or ``score``.
            token: the payload (a few ASCII characters).

        Returns:
            True when handed to a live connection.

        Raises:
            ValueError: Invalid camera or ROI name.
        """
        validate_topic_level(camera)
        validate_topic_level(roi, "ROI name")
        topic = f"{self.root}/plc/{camera}/{roi}/{kind}"
        retain = kind == "alarm"
        with self._lock:
            if retain:
                self._plc_retained[topic] = token
            client = self._client
        if client is None:
            self._m_dropped.labels(f"plc_{kind}", "disconnected").inc()
            return False
        return self._publish(client, topic, token.encode("ascii"), 1 if retain else 0, retain, f"plc_{kind}")

    def _on_outbox_drop(self, entry: OutboxEntry) -> None:
        self._m_outbox_dropped.inc()

    def _on_dead_letter(self, seq: int, reason: str) -> None:
        self._m_dead_letter.inc()

