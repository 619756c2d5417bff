"""The HTTP server: /metrics, /healthz, status page, MJPEG preview, port in use."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from agent.config import HttpConfig
from agent.errors import HttpError
from agent.http import AgentHttpServer, PreviewHub
from tests.conftest import free_port


class Health:
    def __init__(self) -> None:
        self.healthy = True

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        return self.healthy, {"cameras": {"cam0": {"state": "connected" if self.healthy else "failed"}}}


@pytest.fixture
def server() -> Iterator[tuple[AgentHttpServer, Health, Counter]]:
    registry = CollectorRegistry()
    counter = Counter("fod_test_events_total", "test", registry=registry)
    health = Health()
    app = AgentHttpServer(
        HttpConfig(host="127.0.0.1", port=free_port()),
        registry=registry,
        health=health,
        cameras=["cam0"],
        preview=PreviewHub(),
    )
    app.start()
    try:
        yield app, health, counter
    finally:
        app.stop()


def get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_metrics_serves_the_registry(server: tuple[AgentHttpServer, Health, Counter]) -> None:
    app, _, counter = server
    counter.inc(3)
    status, content_type, body = get(app.port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert "fod_test_events_total 3.0" in body.decode()


def test_healthz_is_200_or_503(server: tuple[AgentHttpServer, Health, Counter]) -> None:
    app, health, _ = server
    status, content_type, body = get(app.port, "/healthz")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body)["healthy"] is True
    health.healthy = False
    status, _, body = get(app.port, "/healthz")
    assert status == 503
    assert json.loads(body)["cameras"]["cam0"]["state"] == "failed"


def test_status_page_links_the_preview(server: tuple[AgentHttpServer, Health, Counter]) -> None:
    app, _, _ = server
    status, content_type, body = get(app.port, "/")
    assert status == 200
    assert content_type.startswith("text/html")
    assert b"/preview.mjpg?camera=cam0" in body
    assert get(app.port, "/nope")[0] == 404
    assert get(app.port, "/preview.mjpg?camera=other")[0] == 404


def test_preview_streams_jpeg_parts_while_watched(server: tuple[AgentHttpServer, Health, Counter]) -> None:
    app, _, _ = server
    assert not app.preview.watching("cam0")
    jpeg = b"\xff\xd8fake-jpeg\xff\xd9"
    stop = threading.Event()

    def feed() -> None:
        while not stop.wait(0.02):
            if app.preview.watching("cam0"):
                app.preview.publish("cam0", jpeg)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{app.port}/preview.mjpg", timeout=5) as response:
            assert response.headers["Content-Type"].startswith("multipart/x-mixed-replace")
            data = b""
            while data.count(jpeg) < 2:
                data += response.read1(4096)
    finally:
        stop.set()
        feeder.join()
    assert b"Content-Type: image/jpeg" in data
    assert b"--fodframe" in data


def test_port_in_use_names_the_key_and_the_fix() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        app = AgentHttpServer(
            HttpConfig(host="127.0.0.1", port=port),
            registry=CollectorRegistry(),
            health=Health(),
            cameras=[],
            preview=PreviewHub(),
        )
        with pytest.raises(HttpError, match=rf"http\.port {port}.*already in use.*--http-port 0"):
            app.start()


def test_port_zero_disables_the_server() -> None:
    app = AgentHttpServer(
        HttpConfig(port=0), registry=CollectorRegistry(), health=Health(), cameras=[], preview=PreviewHub()
    )
    app.start()
    assert app.port == 0
    app.stop()


# ---------------------------------------------------------------- issue 14 item 8: loopback, token, bounded server
def test_default_bind_is_loopback() -> None:
    assert HttpConfig().host == "127.0.0.1"


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentHttpServer]:
    monkeypatch.setenv("FOD_TEST_HTTP_TOKEN", "tok-0123456789abcdef")
    app = AgentHttpServer(
        HttpConfig(
            host="127.0.0.1",
            port=free_port(),
            token_env="FOD_TEST_HTTP_TOKEN",
            max_connections=2,
            request_timeout_s=0.5,
        ),
        registry=CollectorRegistry(),
        health=Health(),
        cameras=["cam0"],
        preview=PreviewHub(),
    )
    app.start()
    try:
        yield app
    finally:
        app.stop()


def request(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.mark.parametrize("path", ["/", "/metrics", "/preview.mjpg?camera=cam0"])
def test_token_guards_everything_but_healthz(guarded: AgentHttpServer, path: str) -> None:
    assert request(guarded.port, path)[0] == 401
    assert request(guarded.port, path, {"Authorization": "Bearer wrong-token-0123456"})[0] == 401
    assert request(guarded.port, "/healthz")[0] == 200  # the watchdog needs no token
    if "preview" not in path:  # the stream never ends: only its refusal is checked
        assert request(guarded.port, path, {"Authorization": "Bearer tok-0123456789abcdef"})[0] == 200
        code, headers, _ = request(guarded.port, f"{path}?token=tok-0123456789abcdef")
        assert code == 200
        assert "fod_token=" in headers.get("Set-Cookie", "")  # the page's preview images carry it
        assert request(guarded.port, path, {"Cookie": "fod_token=tok-0123456789abcdef"})[0] == 200


def test_short_or_unset_token_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FOD_TEST_HTTP_TOKEN", raising=False)
    with pytest.raises(HttpError, match="FOD_TEST_HTTP_TOKEN"):
        AgentHttpServer(
            HttpConfig(token_env="FOD_TEST_HTTP_TOKEN"),
            registry=CollectorRegistry(),
            health=Health(),
            cameras=[],
            preview=PreviewHub(),
        )


def test_idle_connections_are_bounded_and_time_out(guarded: AgentHttpServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(2)]  # never send a request
    try:
        # every slot is taken: a third client is refused at once instead of waiting or piling up
        code = 0
        for _ in range(50):
            code = request(guarded.port, "/healthz")[0]
            if code == 503:
                break
        assert code == 503
        assert guarded.registry.get_sample_value("fod_http_connections_refused_total") >= 1
        for sock in idle:  # the server closes idle connections after request_timeout_s
            sock.settimeout(10)
            assert sock.recv(1024) == b""
        assert request(guarded.port, "/healthz")[0] == 200  # and serves again
    finally:
        for sock in idle:
            sock.close()


def test_watchdog_restarts_an_agent_unhealthy_for_too_long(
    server: tuple[AgentHttpServer, Health, Counter], tmp_path: Any
) -> None:
    """Issue 14 item 1: deploy/healthcheck.py --mode healthy acts on sustained derived-health failure."""
    import subprocess
    import sys
    from pathlib import Path

    app, health, _ = server
    script = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"
    state = tmp_path / "watchdog.state"

    def check(max_s: float) -> int:
        url = f"http://127.0.0.1:{app.port}/healthz"
        cmd = [sys.executable, str(script), "--mode", "healthy", "--url", url, "--state", str(state)]
        return subprocess.run([*cmd, "--max-unhealthy-s", str(max_s)], capture_output=True).returncode

    assert check(0) == 0  # healthy
    assert not state.exists()
    health.healthy = False
    assert check(3600) == 0  # unhealthy, within the grace period: no restart
    assert state.exists()
    assert check(3600) == 0
    state.write_text("0\n")  # first seen unhealthy long ago
    assert check(3600) == 1  # restart
    assert not state.exists()  # a new grace period after the restart
    health.healthy = True
    assert check(0) == 0
