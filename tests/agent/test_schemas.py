"""Payload models: schema version, strictness, JSON round trip."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
from pydantic import BaseModel

from agent.commands import COMMANDS
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


# --- docs/mqtt.md is generated in part from the models and must stay in step with them -----------------
# Regenerate the generated blocks with:  python -m tests.agent.test_schemas

DOC = Path(__file__).resolve().parents[2] / "docs" / "mqtt.md"
_BLOCK = re.compile(r"(<!-- gen:(?P<name>[A-Za-z_]+) -->\n)(?P<body>.*?)(<!-- /gen:(?P=name) -->)", re.S)


def _type(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        return " \\| ".join(_type(p) for p in prop["anyOf"])
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "enum" in prop:
        return " \\| ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    kind = prop.get("type", "any")
    if kind == "object" and "additionalProperties" in prop:
        return "object"
    return {"integer": "int", "number": "float", "string": "str", "boolean": "bool"}.get(kind, kind)


def _field_table(model: type[BaseModel]) -> str:
    schema = model.model_json_schema()
    required = set(schema.get("required", []))
    lines = ["| field | type | required | description |", "| --- | --- | --- | --- |"]
    for name, prop in schema.get("properties", {}).items():
        desc = str(prop.get("description", "")).replace("|", "\\|")
        lines.append(f"| `{name}` | {_type(prop)} | {'yes' if name in required else 'no'} | {desc} |")
    return "\n".join(lines)


def generated_blocks() -> dict[str, str]:
    """Name -> generated markdown for every ``<!-- gen:NAME -->`` block of docs/mqtt.md."""
    blocks: dict[str, str] = {}
    for model in PAYLOAD_MODELS:
        schema = json.dumps(model.model_json_schema(), indent=2)
        blocks[model.__name__] = (
            f"{_field_table(model)}\n\n<details><summary>JSON schema of {model.__name__}</summary>\n\n"
            f"```json\n{schema}\n```\n\n</details>\n"
        )
    blocks["LatencyMs"] = _field_table(LatencyMs) + "\n"
    for cmd in COMMANDS.values():
        blocks[f"cmd_{cmd.name}"] = _field_table(cmd) + "\n"
    return blocks


def render_doc(text: str) -> str:
    blocks = generated_blocks()
    return _BLOCK.sub(lambda m: m.group(1) + blocks[m.group("name")] + m.group(4), text)


def test_docs_generated_blocks_are_current():
    text = DOC.read_text()
    names = {m.group("name") for m in _BLOCK.finditer(text)}
    assert names == set(generated_blocks()), "docs/mqtt.md lacks or has unknown <!-- gen:NAME --> blocks"
    assert render_doc(text) == text, "docs/mqtt.md is out of date: run  python -m tests.agent.test_schemas"


def test_docs_mention_every_field_topic_and_command():
    text = DOC.read_text()
    models: tuple[type[BaseModel], ...] = (*PAYLOAD_MODELS, LatencyMs, *COMMANDS.values())
    for model in models:
        for field in model.model_fields:
            assert f"`{field}`" in text, f"docs/mqtt.md does not document {model.__name__}.{field}"
    for topic in ("status", "state", "result", "alarm", "mask", "overlay", "cmd/response"):
        assert f"<root>/{topic}" in text or f"<root>/<camera>/{topic}" in text, topic
    for name in COMMANDS:
        assert f"cmd/{name}" in text, name
    assert "mosquitto_sub -v -t 'fod/#'" in text


_EXAMPLE = re.compile(r"<!-- example:(?P<name>[A-Za-z]+) -->\n```json\n(?P<json>.*?)\n```", re.S)


def test_docs_examples_are_valid_payloads():
    models = {m.__name__: m for m in PAYLOAD_MODELS}
    examples = list(_EXAMPLE.finditer(DOC.read_text()))
    assert {m.group("name") for m in examples} == set(models)  # one example per payload
    for match in examples:
        models[match.group("name")].model_validate_json(match.group("json"))


if __name__ == "__main__":
    DOC.write_text(render_doc(DOC.read_text()))
    print(f"updated {DOC}")
