"""JSON payloads the agent publishes over MQTT (one pydantic model per message class).

Every payload carries ``schema_version`` (currently 1): a consumer that sees a higher major
version than it knows must not guess. Field names and units are part of the public contract that
PLC / SCADA / Node-RED flows read; ``docs/mqtt.md`` documents each field and a test keeps the two
in step. Times are Unix timestamps in seconds (float), durations are in milliseconds (``*_ms``) or
seconds (``*_s``).

Topics (``<root>`` is ``MqttConfig.topic_root``):

- ``<root>/status``: :class:`StatusPayload`, QoS 1, retained (the offline one is the Last Will);
- ``<root>/<camera>/state``: :class:`CameraStatePayload`, QoS ``qos_state`` (1), retained;
- ``<root>/<camera>/result``: :class:`ResultPayload`, QoS ``qos_result`` (0), not retained;
- ``<root>/<camera>/alarm``: :class:`AlarmPayload`, QoS ``qos_alarm`` (1), retained (current state);
- ``<root>/cmd/response``: :class:`CommandResponse`, QoS 1, not retained.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
"""Version of every JSON payload in this module; bumped on an incompatible change."""

Verdict = Literal["OK", "NG"]
"""Decision for one frame / ROI: ``"OK"`` (no foreign object) or ``"NG"`` (anomaly above threshold)."""

CameraState = Literal["connecting", "connected", "stalled", "reconnecting", "ended", "failed"]
"""Life-cycle state of one frame source (the one camera state type of capture, MQTT and /healthz).

``connecting`` first open; ``connected`` frames arrive; ``stalled`` no frame for ``stale_after_s``
(the watchdog reopens it); ``reconnecting`` reads failed, reopening with back-off; ``ended`` a replay
finished or the agent stopped; ``failed`` cannot be opened (live sources are retried, replays not).
"""


class Payload(BaseModel):
    """Base of every published JSON payload: strict (unknown keys rejected) and immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(
        default=SCHEMA_VERSION, description="Version of this payload's schema (currently 1)."
    )

    def to_json(self) -> bytes:
        """Serialise for publishing.

        Returns:
            UTF-8 JSON bytes (compact, keys in declaration order).
        """
        return self.model_dump_json().encode("utf-8")


class LatencyMs(BaseModel):
    """Latency breakdown of one scored frame, in milliseconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    capture: float = Field(description="Capture-to-dequeue time: frame age when the pipeline took it (ms).")
    preprocess: float = Field(description="ROI crop, resize and colour conversion (ms).")
    inference: float = Field(description="Backend inference time (ms).")
    postprocess: float = Field(description="Map resize, normalisation and decision (ms).")
    total: float = Field(description="Capture timestamp to publish call (ms).")


class ResultPayload(Payload):
    """One scored frame and ROI, published on ``<root>/<camera>/result`` (QoS 0, not retained)."""

    seq: int = Field(description="Sequence number of scored frames, per camera, starting at 0 for each run.")
    capture_ts: float = Field(description="Unix time (s) at which the frame was captured.")
    camera: str = Field(description="Camera name (as in the topic).")
    roi: str = Field(description="Region-of-interest name within the camera.")
    source_frame: str | int | None = Field(
        default=None,
        description="File name (folder source) or frame index (video file); null for live sources.",
    )
    score: float = Field(description="Raw anomaly score of the model (image score, model units).")
    normalized_score: float = Field(
        ge=0.0, le=1.0, description="Score mapped to [0, 1]; exactly 0.5 at the threshold."
    )
    threshold: float = Field(description="Raw threshold in force for this ROI (same units as score).")
    verdict: Verdict = Field(description='"NG" when score >= threshold, else "OK" (before debounce).')
    latency_ms: LatencyMs = Field(description="Latency breakdown of this frame (ms).")


class AlarmPayload(Payload):
    """An OK->NG or NG->OK transition, published on ``<root>/<camera>/alarm`` (QoS 1, retained).

    Alarms go through the on-disk outbox (:mod:`agent.outbox`): they survive broker outages and
    agent restarts and are delivered in ``alarm_seq`` order. Delivery is at-least-once: after a
    lost acknowledgement a consumer can see the same alarm twice and should drop repeats.

    Identity: ``alarm_id`` = ``<agent_id>/<alarm_epoch>/<alarm_seq>`` never repeats, even when the
    outbox is lost or replaced (a new outbox gets a new ``alarm_epoch`` and restarts ``alarm_seq``
    at 1). Consumer rule (docs/mqtt.md): drop an alarm whose ``alarm_id`` was seen; within one
    ``(agent_id, alarm_epoch)``, ``alarm_seq`` increases in delivery order.
    """

    alarm_seq: int = Field(
        default=0,
        description=(
            "Per-agent monotonic alarm number, assigned by the outbox when the alarm is raised; "
            "survives restarts of the same outbox; restarts at 1 under a new alarm_epoch."
        ),
    )
    agent_id: str = Field(default="", description="Agent that raised the alarm (config agent_id).")
    alarm_epoch: str = Field(
        default="",
        description=(
            "Identity of the outbox database that numbered the alarm (UTC creation time + random suffix, "
            "sorts by age); changes when the outbox is lost or replaced."
        ),
    )
    alarm_id: str = Field(
        default="",
        description="<agent_id>/<alarm_epoch>/<alarm_seq>: unique across restarts and replaced storage.",
    )
    camera: str = Field(description="Camera name (as in the topic).")
    roi: str = Field(description="Region-of-interest name within the camera.")
    state: Verdict = Field(description="New debounced state of this ROI.")
    previous: Verdict = Field(description="State before this transition.")
    ts: float = Field(description="Unix time (s) of the frame that completed the transition.")
    score: float = Field(description="Raw score of that frame.")
    normalized_score: float = Field(
        ge=0.0, le=1.0, description="Normalised score of that frame (0.5 = threshold)."
    )
    threshold: float = Field(description="Raw threshold in force.")
    source_frame: str | int | None = Field(
        default=None, description="File name or frame index of that frame; null for live sources."
    )


class CameraStatePayload(Payload):
    """Health of one frame source, published on ``<root>/<camera>/state`` (QoS 1, retained)."""

    camera: str = Field(description="Camera name (as in the topic).")
    state: CameraState = Field(
        description="connecting | connected | stalled | reconnecting | ended | failed."
    )
    connected: bool = Field(description="True while frames arrive.")
    fps: float = Field(ge=0.0, description="Captured frames per second over the last few seconds.")
    last_frame_age_s: float | None = Field(
        default=None, description="Seconds since the newest frame was captured; null before the first frame."
    )
    frames_captured: int = Field(ge=0, description="Frames read from the source since start.")
    frames_dropped: int = Field(ge=0, description="Frames replaced by a newer one before being scored.")
    reconnects: int = Field(ge=0, description="Times the source was reopened after a failure.")
    error: str | None = Field(
        default=None, description="Last error message of the source; null when healthy."
    )


class StatusPayload(Payload):
    """Agent availability on ``<root>/status`` (QoS 1, retained; the offline one is the Last Will)."""

    agent_id: str = Field(description="Agent identifier (config agent id / MQTT client id).")
    state: Literal["online", "offline"] = Field(description="online | offline.")
    ts: float = Field(
        description=(
            "Unix time (s) of the message. For the Last Will it is the time the lost connection was made."
        )
    )
    version: str = Field(description="fod-agent version.")
    backend: str | None = Field(
        default=None, description="Inference backend in use (tensorrt | onnxruntime)."
    )
    model: str | None = Field(default=None, description="Model package or engine in use (name or path).")
    healthy: bool | None = Field(
        default=None,
        description=(
            "Health derived from work done (frames scored and alarms stored within the window, see /healthz); "
            "null before the first health check and in the Last Will."
        ),
    )
    problems: list[str] = Field(
        default_factory=list, description="Why the agent is unhealthy (empty when healthy)."
    )


class CommandResponse(Payload):
    """Reply to a command, published on ``<root>/cmd/response`` (QoS 1, not retained)."""

    request_id: str | None = Field(default=None, description="request_id of the command, when it had one.")
    command: str = Field(description="Command name (last topic level of the request).")
    ok: bool = Field(description="True when the command was valid and applied.")
    error: str | None = Field(default=None, description="Why the command was rejected; null when ok.")
    result: dict[str, Any] = Field(
        default_factory=dict, description="Command-specific result (empty on error)."
    )


PAYLOAD_MODELS: tuple[type[Payload], ...] = (
    ResultPayload,
    AlarmPayload,
    CameraStatePayload,
    StatusPayload,
    CommandResponse,
)
"""Every published JSON payload model (for docs and schema tests)."""
