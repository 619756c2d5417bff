"""fod-agent --demo end to end on the toy package: embedded broker, agent, console view, clean stop."""

from __future__ import annotations

import argparse
import re

import pytest

from agent.cli import build_parser, main
from agent.config import load_config
from fod_tools.demo.broker import BrokerInfo
from fod_tools.demo.model import DEMO_RECIPE, cached_package
from fod_tools.demo.run import CAMERA, demo_overrides
from tests.conftest import free_port

pytest.importorskip("amqtt.broker", reason="amqtt not installed: pip install 'fod-agent[demo]'")


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["--demo", *argv])


def test_demo_overrides_make_a_valid_config_that_writes_only_into_the_cache(tmp_path):
    broker = BrokerInfo("127.0.0.1", 18830, "amqtt")
    args = _args("--agent-id", "line7", "--http-port", "0")
    config = load_config(None, demo_overrides(args, pkg=tmp_path / "pkg", broker=broker, root=tmp_path))
    assert [c.name for c in config.cameras] == [CAMERA]
    assert config.model.path == tmp_path / "pkg"
    assert (config.mqtt.host, config.mqtt.port) == ("127.0.0.1", 18830)
    assert config.mqtt.topic_root == "fod/demo/line1/line7"
    assert config.mqtt.outbox_dir == tmp_path / "outbox"
    assert config.snapshots.dir == tmp_path / "snapshots"
    assert config.http.port == 0
    assert config.http.host == "127.0.0.1"


def test_no_cached_package_in_an_empty_cache(tmp_path):
    assert cached_package(DEMO_RECIPE, tmp_path) is None


def test_demo_runs_the_agent_and_stops_after_duration(toy_package, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FOD_CACHE_DIR", str(tmp_path))
    port = free_port()
    code = main(
        [
            "--demo",
            "--model",
            str(toy_package),
            "--threshold",
            "0.5",
            "--duration",
            "3",
            "--broker",
            f"mqtt://127.0.0.1:{port}",
            "--http-port",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    root = "fod/demo/line1/demo"
    hint = f"mosquitto_sub -h 127.0.0.1 -p {port} -v -t '{root}/status' -t '{root}/+/state' -t '{root}/+/result'"
    assert hint in out
    assert "/mask" not in out  # binary image topics stay out of the terminal
    assert "'fod/#'" not in out
    assert re.search(r"defective parts NG: \d+ of \d+|no defective part", out), out
    assert "(embedded amqtt)" in out
    frames = int(re.search(r"frames scored (\d+)", out).group(1))
    assert frames > 0, out  # results went agent -> embedded broker -> the view's subscriber
    judged = re.search(r"verdicts vs ground truth \((\d+) frames\)", out)
    assert judged is not None
    assert int(judged.group(1)) > 0  # result payloads name the conveyor frame, so truth can be looked up
    assert (tmp_path / "demo" / "outbox").is_dir()  # the alarm outbox lives in the demo's cache


def test_demo_reports_a_port_taken_by_something_else(toy_package, tmp_path, monkeypatch, capsys):
    import socket

    monkeypatch.setenv("FOD_CACHE_DIR", str(tmp_path))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        code = main(["--demo", "--model", str(toy_package), "--broker", f"mqtt://127.0.0.1:{port}"])
    assert code == 1
    assert "does not answer as an MQTT broker" in capsys.readouterr().err
