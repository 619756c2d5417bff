"""Payload models: schema version, strictness, JSON round trip."""

from __future__ import annotations

import json

import pydantic
import pytest

from agent.schemas import (
    PAYLOAD_MODELS,
    SCHEMA_VERSION,
    AlarmPayload,
    CameraStatePayload,
    CommandResponse,
    LatencyMs,
    ResultPayload,
    StatusPayload,
)


def _result(**kw: object) -> ResultPayload:
    base: dict[str, object] = dict(
        seq=3,
        capture_ts=1700000000.25,
        camera="cam0",
        roi="full",
        source_frame="000_ok.png",
        score=0.8,
        normalized_score=0.4,
        threshold=1.0,
        verdict="OK",
        latency_ms=LatencyMs(capture=1.0, preprocess=2.0, inference=3.0, postprocess=0.5, total=6.5),
    )
    base.update(kw)
    return ResultPayload.model_validate(base)


def test_every_payload_has_schema_version():
    for model in PAYLOAD_MODELS:
        assert "schema_version" in model.model_fields, model.__name__
        assert model.model_fields["schema_version"].default == SCHEMA_VERSION == 1


def test_result_json_round_trip():
    res = _result(source_frame=17)
    data = json.loads(res.to_json())
    assert data["schema_version"] == 1
    assert data["source_frame"] == 17
    assert data["latency_ms"]["total"] == 6.5
    assert ResultPayload.model_validate(data) == res


@pytest.mark.parametrize(
    "bad",
    [
        {"verdict": "MAYBE"},  # only OK / NG
        {"normalized_score": 1.5},  # normalised score lives in [0, 1]
        {"normalized_score": -0.1},
        {"extra_field": 1},  # strict: unknown keys rejected
    ],
)
def test_result_rejects_bad_values(bad):
    with pytest.raises(pydantic.ValidationError):
        _result(**bad)


def test_other_payloads_serialise():
    alarm = AlarmPayload(
        camera="cam0",
        roi="full",
        state="NG",
        previous="OK",
        ts=1.0,
        score=2.0,
        normalized_score=0.7,
        threshold=1.0,
    )
    assert json.loads(alarm.to_json())["alarm_seq"] == 0  # assigned by the outbox
    state = CameraStatePayload(
        camera="cam0",
        state="reconnecting",
        connected=False,
        fps=0.0,
        frames_captured=5,
        frames_dropped=1,
        reconnects=2,
    )
    assert json.loads(state.to_json())["last_frame_age_s"] is None
    status = StatusPayload(agent_id="a1", state="offline", ts=2.0, version="0.1.0")
    assert json.loads(status.to_json())["state"] == "offline"
    resp = CommandResponse(command="pause", ok=True)
    assert json.loads(resp.to_json())["result"] == {}
    with pytest.raises(pydantic.ValidationError):
        CameraStatePayload.model_validate(
            {
                "camera": "c",
                "state": "sleeping",  # not a camera state
                "connected": False,
                "fps": 0,
                "frames_captured": 0,
                "frames_dropped": 0,
                "reconnects": 0,
            }
        )
