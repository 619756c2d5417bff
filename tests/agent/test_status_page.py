"""The status page in a real headless browser (Chromium): what a line operator sees.

Skipped when no ``chromium`` is installed (``apt-get install -y chromium``).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.config import HttpConfig
from agent.http import AgentHttpServer, PreviewHub
from tests.conftest import free_port

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here: apt-get install -y chromium")


def _details() -> tuple[bool, dict[str, Any]]:
    last = {
        "belt": {"score": 4.2, "normalized_score": 0.62, "verdict": "NG", "alarm": "NG", "source_frame": 417},
        "edge": {"score": 0.8, "normalized_score": 0.1, "verdict": "OK", "alarm": "OK", "source_frame": 417},
    }
    camera = {
        "healthy": True,
        "state": "connected",
        "fps": 4.9,
        "last_frame_age_s": 0.1,
        "frames_dropped": 3,
        "error": None,
        "thresholds": {"belt": 3.5, "edge": 3.5},
        "last": last,
        "tally": {
            "belt": {"frames": 600, "ng_frames": 190, "alarms": 120, "held": 0},
            "edge": {"frames": 600, "ng_frames": 2, "alarms": 0, "held": 2},
        },
    }
    alarm = {
        "ts": "2026-11-29T23:00:00+00:00",
        "camera": "conveyor",
        "roi": "belt",
        "previous": "OK",
        "state": "NG",
        "score": 4.2,
        "threshold": 3.5,
        "source_frame": 417,
    }
    return True, {
        "agent_id": "demo",
        "model": "fod-demo",
        "backend": "onnxruntime",
        "mqtt_connected": True,
        "paused": False,
        "cameras": {"conveyor": camera},
        "recent_alarms": [alarm],
        "notes": {"demo vs ground truth": "defective parts NG: 190 of 200 (95.0 %)"},
    }


@pytest.fixture
def page_server() -> Iterator[AgentHttpServer]:
    app = AgentHttpServer(
        HttpConfig(host="127.0.0.1", port=free_port()),
        registry=CollectorRegistry(),
        health=_details,
        cameras=["conveyor"],
        preview=PreviewHub(),
    )
    frame = np.full((120, 160, 3), 128, np.uint8)  # a grey preview frame: the red below is the page's
    jpeg = cv2.imencode(".jpg", frame)[1].tobytes()
    stop = threading.Event()

    def feed() -> None:
        while not stop.wait(0.05):
            app.preview.publish("conveyor", jpeg)

    feeder = threading.Thread(target=feed, daemon=True)
    app.start()
    feeder.start()
    try:
        yield app
    finally:
        stop.set()
        feeder.join(2)
        app.stop()


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=4000",
        "--timeout=8000",
        "--window-size=1100,800",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_status_page_shows_verdict_score_alarm_and_recent_alarms(page_server: AgentHttpServer, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{page_server.port}/"
    dom = _chromium("--dump-dom", url).stdout
    assert "healthy" in dom
    assert 'data-roi="belt"' in dom  # the script drew a row per ROI from /healthz
    assert 'class="verdict ng">NG' in dom
    assert 'class="verdict ok">OK' in dom
    assert "4.200 / 3.500" in dom  # score against threshold
    assert "4.90 frames/s" in dom
    assert "600 / 190 / 120" in dom  # frames / NG / alarms
    assert "2 held by debounce" in dom
    assert "OK → NG" in dom  # recent alarms
    assert "conveyor/belt score 4.200" in dom
    assert "defective parts NG: 190 of 200" in dom  # notes (the demo's tally)

    shot = tmp_path / "status.png"
    _chromium(f"--screenshot={shot}", url)
    image = cv2.imread(str(shot))
    assert image is not None, "chromium wrote no screenshot"
    assert image.shape[:2] == (800, 1100)
    red = (image[:, :, 2] > 150) & (image[:, :, 1] < 80) & (image[:, :, 0] < 80)
    assert red.sum() > 200  # the NG verdict, the NG badge and the score bar are drawn in red
    grey = (np.abs(image.astype(int) - 128) <= 12).all(axis=2)
    assert grey.sum() > 10_000  # the live preview frame is shown
