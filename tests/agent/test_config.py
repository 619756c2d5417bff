"""Configuration: the repository's config.toml, validation messages, CLI overrides, generated reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.config import AgentConfig, config_reference_markdown, load_config
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_repository_config_is_valid_and_equals_the_defaults() -> None:
    config = load_config(REPO / "config.toml")
    defaults = AgentConfig()
    # agent_id resolves to the host name in both; everything in the template is a default
    assert config.model_dump() == defaults.model_dump()


def test_every_key_of_the_template_is_commented() -> None:
    # a key (or a small group of related keys, such as reconnect_min_s / reconnect_max_s) sits under a comment
    lines = [line.strip() for line in (REPO / "config.toml").read_text().splitlines()]

    def is_key(text: str) -> bool:
        return bool(text) and not text.startswith(("#", "[")) and "=" in text

    for i, text in enumerate(lines):
        if is_key(text):
            j = i - 1
            while j >= 0 and is_key(lines[j]):
                j -= 1
            assert i - j <= 3, f"config.toml line {i + 1}: more than two keys under one comment"
            assert j >= 0, f"config.toml line {i + 1} has no comment above: {text}"
            assert lines[j].startswith("#"), f"config.toml line {i + 1} has no comment above: {text}"


def test_check_config_accepts_the_template(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(REPO / "config.toml"), "--check-config"]) == 0
    assert "valid" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("toml", "key", "hint"),
    [
        # wrong type: the key and what was given
        ("[http]\nport = 'eighty'\n", "http.port", "eighty"),
        # out of range
        ("[decision]\nhysteresis = 1.5\n", "decision.hysteresis", "less than 1"),
        # typo in a key: unknown key, with the valid ones listed
        ("[snapshots]\nmax_total_gb = 1\n", "snapshots.max_total_gb", "max_total_mb"),
        # cross-field rule names the fields
        ("[decision]\ndebounce_n = 4\ndebounce_m = 3\n", "debounce_n", "debounce_m"),
        # nested list entry
        ("[[cameras]]\nname = 'a/b'\n", "cameras.0.name", "topic level"),
        (
            "[[cameras]]\nname = 'c'\n[[cameras.rois]]\nbox_px = [0, 0, 0, 10]\n",
            "cameras.0.rois.0.box_px",
            "width",
        ),
        # a section of the MQTT helper's model
        ("[mqtt]\ntopic_root = 'a/#'\n", "mqtt.topic_root", "no '+', '#'"),
        # TOML syntax error: the line is named
        ("[http\nport = 1\n", "line 1", "invalid TOML"),
    ],
)
def test_invalid_file_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, key: str, hint: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert main(["--config", str(path), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert key in err
    assert hint.lower() in err.lower()


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_cli_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[[cameras]]\nname = 'line'\nsource = 3\n[http]\nport = 9000\n")
    config = load_config(path, {"cameras.0.source": "/data/x.mp4", "http.port": 0, "model.threshold": 0.7})
    assert config.cameras[0].name == "line"  # kept from the file
    assert config.cameras[0].source == "/data/x.mp4"
    assert config.http.port == 0
    assert config.model.threshold == 0.7


def test_camera_and_source_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--camera", "0", "--source", "x.mp4", "--check-config"]) == 2
    assert "--camera and --source" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://broker.local:1884", "broker.local", 1884, False),
        ("mqtts://broker.local", "broker.local", 8883, True),
        ("10.0.0.5:1883", "10.0.0.5", 1883, False),
    ],
)
def test_broker_flag(url: str, host: str, port: int, tls: bool) -> None:
    from agent.cli import apply_broker

    mqtt = apply_broker(AgentConfig(), url).mqtt
    assert (mqtt.host, mqtt.port, mqtt.tls is not None) == (host, port, tls)


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("mqtt://h:1884", {"mqtt.host": "h", "mqtt.port": 1884}),
        ("mqtts://u@h", {"mqtt.host": "h", "mqtt.port": 8883, "mqtt.tls.enabled": True, "mqtt.username": "u"}),
        ("h", {"mqtt.host": "h", "mqtt.port": 1883}),
    ],
)
def test_parse_broker(url: str, parsed: dict[str, object]) -> None:
    from agent.cli import parse_broker

    assert parse_broker(url) == parsed


@pytest.mark.parametrize("url", ["ftp://h", "mqtt://u:secret@h", "mqtt://h:notaport"])
def test_parse_broker_refuses(url: str) -> None:
    from agent.cli import parse_broker

    with pytest.raises(ConfigError, match="--broker"):
        parse_broker(url)


def test_bad_broker_url_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--broker", "http://x:1", "--check-config"]) == 2
    assert "--broker" in capsys.readouterr().err


def test_duplicate_camera_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="unique"):
        load_config(None, {"cameras.0.name": "a", "cameras.1.name": "a"})


def test_docs_config_md_is_up_to_date() -> None:
    expected = config_reference_markdown()
    actual = (REPO / "docs" / "config.md").read_text()
    assert actual == expected, "docs/config.md is stale: run `python -m agent.config > docs/config.md`"
    assert "`decision.hysteresis`" in actual
    assert "`mqtt.topic_root`" in actual


# ---------------------------------------------------------------- issue 14 item 11: what the run rejects, check rejects
@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[model]\nthreshold = inf\n", "model.threshold"),  # inf passed before and never alarmed
        ("[model]\nthreshold = nan\n", "model.threshold"),
        ("[model]\nthreshold = 0.0\n", "model.threshold"),
        ("[model]\nthreshold = -1.0\n", "model.threshold"),
        ("[decision]\nhysteresis = nan\n", "decision.hysteresis"),
        ("[mqtt]\nreconnect_max_s = 1e10\n", "mqtt.reconnect_max_s"),  # overflowed Event.wait and killed the thread
        ("[[cameras]]\nreconnect_max_s = 1e10\n", "cameras.0.reconnect_max_s"),
        ("[[cameras]]\nsource = -1\n", "cameras.0.source"),  # segfaulted in OpenCV
        ("[pipeline]\nhealth_window_s = inf\n", "pipeline.health_window_s"),
    ],
)
def test_check_config_rejects_values_the_run_would_not_survive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, key: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert main(["--config", str(path), "--check-config"]) == 2
    assert key in capsys.readouterr().err


def test_negative_camera_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--camera", "-1", "--check-config"]) == 2
    assert "negative" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["image_threshold", "norm_max"])
def test_check_config_reads_the_package_calibration(
    tmp_path: Path, toy_package: Path, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    from fod.package import ModelPackage
    from tests.toy_package import calibrated_copy

    pkg = calibrated_copy(toy_package, tmp_path / "pkg")
    package = ModelPackage(pkg)
    assert package.manifest.calibration is not None
    package.manifest.calibration = package.manifest.calibration.model_copy(update={field: float("nan")})
    package.save()
    assert main(["--model", str(pkg), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert f"calibration.{field}" in err
    assert "fod calibrate" in err
    good = calibrated_copy(toy_package, tmp_path / "good")
    assert main(["--model", str(good), "--check-config"]) == 0


def test_plain_broker_flag_does_not_drop_a_tls_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tls.toml"
    path.write_text("[mqtt.tls]\n")
    assert main(["--config", str(path), "--broker", "mqtt://broker:1883", "--check-config"]) == 2
    assert "mqtts://" in capsys.readouterr().err
    assert main(["--config", str(path), "--broker", "mqtts://broker", "--check-config"]) == 0
@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/fod-agent", "XDG_STATE_HOME": "/x", "HOME": "/h"}, "/var/lib/fod-agent"),
        ({"STATE_DIRECTORY": "/a:/b", "HOME": "/h"}, "/a"),  # systemd lists several: the first
        ({"XDG_STATE_HOME": "/x", "HOME": "/h"}, "/x/fod-agent"),
        ({"XDG_STATE_HOME": "relative", "HOME": "/h"}, "/h/.local/state/fod-agent"),  # XDG: must be absolute
        ({"HOME": "/h"}, "/h/.local/state/fod-agent"),
    ],
)
def test_default_state_dir(environ: dict[str, str], expected: str) -> None:
    from agent.statedir import default_state_dir

    assert default_state_dir(environ) == Path(expected)


def test_state_paths_default_to_the_state_dir_and_can_be_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "sd"))
    config = load_config(None)
    assert config.state_dir == tmp_path / "sd"
    assert config.mqtt.outbox_dir == tmp_path / "sd" / "outbox"
    assert config.snapshots.dir == tmp_path / "sd" / "snapshots"
    config = load_config(None, {"state_dir": str(tmp_path / "mine")})
    assert config.mqtt.outbox_dir == tmp_path / "mine" / "outbox"
    config = load_config(None, {"mqtt.outbox_dir": "/o", "snapshots.dir": "/s"})
    assert (config.mqtt.outbox_dir, config.snapshots.dir) == (Path("/o"), Path("/s"))
