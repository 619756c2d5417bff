"""Issue 14 item 9: a password in a camera URL never appears in what the agent writes or serves."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.cli import setup_logging
from agent.pipeline import Agent
from agent.redact import redact
from tests.agent.conftest import Mosquitto, Subscriber
from tests.agent.test_pipeline import Running, make_config
from tests.conftest import free_port


@pytest.fixture
def running() -> Iterator[Callable[[Agent], Running]]:
    made: list[Running] = []

    def start(agent: Agent) -> Running:
        made.append(Running(agent))
        return made[-1]

    yield start
    for run in made:
        if run.thread.is_alive():
            run.stop()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rtsp://admin:hunter2@10.0.0.5:554/live", "rtsp://admin:***@10.0.0.5:554/live"),
        ("'http://u:p%40ss@cam/x' failed", "'http://u:***@cam/x' failed"),
        ("rtsp://10.0.0.5/live?user=a&password=hunter2&x=1", "rtsp://10.0.0.5/live?user=a&password=***&x=1"),
        ("token=abc secret=def", "token=*** secret=***"),
        ("rtsp://cam.local/live", "rtsp://cam.local/live"),  # nothing to hide
        ("user@host without scheme", "user@host without scheme"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_camera_url_password_is_redacted_everywhere(
    tmp_path: Path,
    mosquitto: Mosquitto,
    topic_root: str,
    toy_package: Path,
    subscriber: Callable[..., Subscriber],
    running: Callable[[Agent], Running],
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("text", "INFO")
    try:
        sub = subscriber(mosquitto, f"{topic_root}/#")
        url = "rtsp://admin:hunter2@127.0.0.1:9/live"  # nothing listens on port 9: the open fails at once
        config = make_config(
            tmp_path,
            mosquitto,
            topic_root,
            toy_package,
            url,
            **{"exit_at_end": False, "http.port": free_port(), "pipeline.broker_wait_s": 1.0},
        )
        run = running(Agent(config))
        states = sub.wait_until(
            f"{topic_root}/cam0/state", lambda ms: any(m.json().get("error") for m in ms), timeout_s=20
        )
        errors = [m.json()["error"] for m in states if m.json().get("error")]
        assert "admin:***@127.0.0.1" in errors[-1]  # the message still says which source
        port = run.agent.http.port
        served = b""
        for path in ("/healthz", "/"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                    served += resp.read()
            except urllib.error.HTTPError as err:  # unhealthy: 503 with the same body
                served += err.read()
        assert b"admin:***@" in served
        logging.getLogger("agent.capture").error("cannot open %s", url)  # as any module would log it
        run.stop()
        log_text = capsys.readouterr().err
        assert "cannot open rtsp://admin:***@127.0.0.1" in log_text
        everything = [*errors, served.decode(), log_text]
        everything += [status.payload.decode() for status in sub.get(f"{topic_root}/status")]
        leaks = [text for text in everything if "hunter2" in text]
        assert not leaks, leaks
    finally:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if handler.get_name() == "fod-agent":
                root.removeHandler(handler)

