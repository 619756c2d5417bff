"""Command parsing: valid commands, and every kind of malformed one raising CommandError."""

from __future__ import annotations

import json

import pytest

from agent.commands import (
    COMMANDS,
    CommandAuth,
    CommandError,
    Pause,
    ReloadModel,
    Resume,
    SetThreshold,
    Snapshot,
    parse_command,
    sign_command,
)


def test_valid_commands_parse_to_their_models():
    cmd = parse_command(
        "set_threshold", b'{"camera": "cam0", "roi": "left", "threshold": 1.5, "request_id": "r7"}'
    )
    assert cmd == SetThreshold(camera="cam0", roi="left", threshold=1.5, request_id="r7")
    assert parse_command("snapshot", b'{"camera": "cam1"}') == Snapshot(camera="cam1")
    assert parse_command("reload_model", b"{}") == ReloadModel(path=None)
    assert parse_command("reload_model", b'{"path": "/m/pkg"}') == ReloadModel(path="/m/pkg")
    # an empty payload is the empty object
    assert parse_command("pause", b"") == Pause()
    assert parse_command("resume", b"  ") == Resume()


def test_every_example_is_valid():
    import json

    for name, cls in COMMANDS.items():
        assert isinstance(parse_command(name, json.dumps(cls.example).encode()), cls)


@pytest.mark.parametrize(
    ("name", "payload", "needle"),
    [
        ("explode", b"{}", "unknown command 'explode'"),  # not a command
        ("response", b"{}", "unknown command"),  # the response topic is not a command
        ("set_threshold", b"{camera: cam0}", "not valid UTF-8 JSON"),  # bad JSON
        ("set_threshold", b"\xff\xfe", "not valid UTF-8 JSON"),  # not UTF-8
        ("set_threshold", b"[1, 2]", "must be a JSON object"),  # JSON but not an object
        ("set_threshold", b'{"camera": "cam0", "threshold": 0}', "threshold"),  # out of range (> 0)
        ("set_threshold", b'{"camera": "cam0", "threshold": -3}', "threshold"),  # negative
        ("set_threshold", b'{"camera": "cam0", "threshold": NaN}', "threshold"),  # not finite
        ("set_threshold", b'{"camera": "cam0", "threshold": Infinity}', "threshold"),  # not finite
        ("set_threshold", b'{"camera": "cam0", "threshold": "high"}', "threshold"),  # wrong type
        ("set_threshold", b'{"threshold": 1.0}', "camera"),  # missing key
        ("set_threshold", b'{"camera": "", "threshold": 1.0}', "camera"),  # empty camera
        ("snapshot", b'{"camera": "cam0", "cameras": 2}', "cameras"),  # unknown key
        ("pause", b'{"for_s": 3}', "for_s"),  # unknown key on a no-argument command
    ],
)
def test_malformed_commands_raise_command_error(name, payload, needle):
    with pytest.raises(CommandError) as info:
        parse_command(name, payload)
    assert needle in str(info.value)
    assert info.value.command == name


def test_error_keeps_request_id_when_readable():
    with pytest.raises(CommandError) as info:
        parse_command("set_threshold", b'{"camera": "cam0", "threshold": -1, "request_id": "abc"}')
    assert info.value.request_id == "abc"
    assert "example" in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"camera": "cam0", "threshold": "1.5"}',  # a string is not a number
        b'{"camera": "cam0", "threshold": true}',  # nor is a boolean
        b'{"camera": "cam0", "threshold": 0}',  # zero
        b'{"camera": "cam0", "threshold": 1e999}',  # inf after JSON parsing
        b'{"camera": 7, "threshold": 1.0}',  # camera must be a string
    ],
)
def test_threshold_commands_need_finite_positive_numbers_of_the_right_type(payload):
    with pytest.raises(CommandError):
        parse_command("set_threshold", payload)


def test_signed_commands_verify_once_and_expire():
    auth = CommandAuth("0123456789abcdef", max_age_s=30)
    signed = sign_command("pause", {"request_id": "a"}, "0123456789abcdef", now=1000.0, nonce="nonce-001")
    body = json.dumps(signed).encode()
    assert auth.check("pause", signed, now=1010.0) == {"request_id": "a"}
    with pytest.raises(CommandError, match="nonce already used"):
        auth.check("pause", signed, now=1011.0)
    with pytest.raises(CommandError, match="stale"):
        auth.check("pause", sign_command("pause", {}, "0123456789abcdef", now=1000.0), now=1031.0)
    with pytest.raises(CommandError, match="authentication failed"):
        auth.check("resume", json.loads(body), now=1010.0)  # signed for another command
    assert parse_command("pause", json.dumps(sign_command("pause", {}, "0123456789abcdef")).encode(), auth=auth)
