"""The fod-agent command: no torch, exit codes, clean shutdown on SIGTERM, demo flag."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.cli import JsonFormatter, main
from tests.agent.conftest import Mosquitto, Subscriber

REPO = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_the_agent_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "import agent.cli, agent.pipeline, agent.capture, agent.backends, agent.http, agent.snapshots\n"
        "assert sys.modules['torch'] is None\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("fod-agent ")


def test_package_with_a_bad_hash_exits_1_naming_the_file(
    tmp_path: Path, toy_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(toy_package, bad)
    (bad / "model.onnx").write_bytes((bad / "model.onnx").read_bytes() + b"\0")
    code = main(["--model", str(bad), "--threshold", "0.5", "--http-port", "0", "--source", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "model.onnx" in err
    assert "sha256" in err


def test_uncalibrated_package_without_threshold_exits_2(
    tmp_path: Path, toy_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--model", str(toy_package), "--http-port", "0", "--source", str(tmp_path)]) == 2
    assert "fod calibrate" in capsys.readouterr().err


def test_http_port_in_use_exits_1_naming_the_key(
    tmp_path: Path, toy_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["--model", str(toy_package), "--threshold", "0.5", "--http-port", str(port)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"http.port {port}" in err
    assert "already in use" in err


def test_demo_flag_without_the_demo_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "fod_tools.demo", None)  # as if fod_tools/demo were not installed
    assert main(["--demo"]) == 1
    assert "demo is not available" in capsys.readouterr().err


def test_json_log_lines() -> None:
    record = logging.LogRecord("agent.x", logging.WARNING, __file__, 1, "camera %s lost", ("cam0",), None)
    record.camera = "cam0"
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "WARNING"
    assert line["msg"] == "camera cam0 lost"
    assert line["camera"] == "cam0"
    assert line["logger"] == "agent.x"


def test_sigterm_stops_cleanly_and_publishes_offline(
    tmp_path: Path, mosquitto: Mosquitto, topic_root: str, toy_package: Path, subscriber: Callable[..., Subscriber]
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((48, 64, 3), 128, np.uint8))
    sub = subscriber(mosquitto, f"{topic_root}/#")
    args = [
        sys.executable, "-m", "agent.cli",
        "--model", str(toy_package), "--threshold", "0.5",
        "--source", str(folder), "--loop", "--fps", "20",
        "--broker", f"mqtt://{mosquitto.host}:{mosquitto.port}", "--topic-root", topic_root,
        "--agent-id", "sigterm-test", "--http-port", "0", "--snapshots-dir", str(tmp_path / "snaps"),
        "--log-format", "json",
    ]  # fmt: skip
    state_env = {k: v for k, v in env().items() if k != "STATE_DIRECTORY"} | {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=state_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        sub.wait_for(f"{topic_root}/cam0/result", 2, timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    status = [m.json() for m in sub.wait_until(f"{topic_root}/status", lambda ms: len(ms) >= 2, 10)]
    assert status[0]["state"] == "online"
    assert status[-1]["state"] == "offline"
    assert status[-1]["agent_id"] == "sigterm-test"
    assert sub.get(f"{topic_root}/cam0/state")[-1].json()["state"] == "ended"  # camera released
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any("signal SIGTERM" in entry["msg"] for entry in logs)
    assert (tmp_path / "xdg" / "fod-agent" / "outbox").is_dir()  # default outbox in the XDG state directory
    made = {p.name for p in tmp_path.iterdir()} - {"mosquitto"}  # the broker fixture's folder
    assert made == {"imgs", "xdg"}  # nothing in the working directory
    assert [e["msg"] for e in logs if e["level"] in ("ERROR", "CRITICAL")] == []  # a clean stop logs no error


def _agent_args(toy_package: Path, source: Path, broker: Mosquitto, topic_root: str) -> list[str]:
    return [
        sys.executable, "-m", "agent.cli",
        "--model", str(toy_package), "--threshold", "0.5", "--source", str(source), "--exit-at-end",
        "--broker", f"mqtt://{broker.host}:{broker.port}", "--topic-root", topic_root,
        "--agent-id", "replay-test", "--http-port", "0",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p / "no-such-folder", "not found"),  # a typo in the path
        (lambda p: p.mkdir() or p, "no images"),  # an empty folder
        (lambda p: (p.mkdir(), (p / "a.png").write_bytes(b"broken"), p)[2], "no frame"),  # nothing decodable
    ],
)
def test_exit_at_end_with_a_replay_that_cannot_be_read_exits_1_naming_it(
    tmp_path: Path,
    mosquitto: Mosquitto,
    topic_root: str,
    toy_package: Path,
    make: Callable[[Path], Path],
    expected: str,
) -> None:
    source = make(tmp_path / "replay")
    state_env = env() | {"STATE_DIRECTORY": str(tmp_path / "state")}
    done = subprocess.run(
        _agent_args(toy_package, source, mosquitto, topic_root),
        cwd=tmp_path, env=state_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("fod-agent: error:")]
    assert len(error) == 1, done.stderr
    assert "replay could not be read" in error[0]
    assert str(tmp_path / "replay") in error[0]
    assert expected in error[0]


def test_state_directory_from_systemd_and_nothing_in_the_working_directory(
    tmp_path: Path, mosquitto: Mosquitto, topic_root: str, toy_package: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    image = np.full((48, 64, 3), 128, np.uint8)
    image[10:30, 10:30] = 250  # NG with the toy model: a snapshot is written
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), image)
    work = tmp_path / "work"
    work.mkdir()
    state_env = env() | {"STATE_DIRECTORY": str(tmp_path / "var-lib")}
    done = subprocess.run(
        _agent_args(toy_package, folder, mosquitto, topic_root),
        cwd=work, env=state_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert list(work.iterdir()) == []
    assert (tmp_path / "var-lib" / "outbox").is_dir()
    assert list((tmp_path / "var-lib" / "snapshots" / "cam0").iterdir())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2/3", (2, 3)),  # the default rule spelled out
        ("1/1", (1, 1)),  # every frame on its own (trigger cameras, single-image replays)
    ],
)
def test_debounce_flag_sets_both_config_keys(text: str, expected: tuple[int, int]) -> None:
    from agent.cli import build_parser, overrides_from_args

    overrides = overrides_from_args(build_parser().parse_args(["--debounce", text]))
    assert (overrides["decision.debounce_n"], overrides["decision.debounce_m"]) == expected


@pytest.mark.parametrize("text", ["3/2", "0/1", "2", "a/b", "2/3/4"])
def test_bad_debounce_is_a_usage_error(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--debounce", text, "--check-config"])
    assert exc.value.code == 2
    assert "1 <= N <= M" in capsys.readouterr().err
