"""The ``fod-agent`` command: run the streaming agent, check a config, or start the demo.

Examples::

    fod-agent --camera 0 --model models/mt --broker mqtt://broker.local:1883
    fod-agent --source /data/replay --model models/mt --exit-at-end     # score a folder once
    fod-agent --config /etc/fod-agent/config.toml --check-config        # validate, exit 2 if invalid
    fod-agent --demo --duration 60                                      # synthetic conveyor, no hardware

Flags override ``config.toml``. Exit codes: 0 clean stop, 1 runtime error (model, camera, port),
2 invalid configuration or arguments. SIGINT / SIGTERM stop the agent cleanly: cameras released,
``offline`` published, the alarm outbox flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent import __version__
from agent.errors import AgentError, BrokerError, ConfigError
from agent.redact import RedactingFilter, redact

log = logging.getLogger("agent")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``fod-agent``."""
    p = argparse.ArgumentParser(
        prog="fod-agent",
        description="Score camera frames with a FOD model package; publish results, masks and alarms over MQTT.",
        epilog="Flags override the config file; see docs/config.md for every key.",
    )
    p.add_argument("--version", action="version", version=f"fod-agent {__version__}")
    p.add_argument("--config", type=Path, metavar="TOML", help="configuration file (default: built-in defaults)")
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit (2 when invalid)")
    src = p.add_argument_group("source (first camera)")
    src.add_argument("--camera", type=int, metavar="INDEX", help="camera index (/dev/videoINDEX)")
    src.add_argument(
        "--source",
        metavar="SRC",
        help="video file, folder of images, rtsp:// / http:// URL or GStreamer pipeline",
    )
    src.add_argument(
        "--realtime", action="store_true", help="replay files/folders at recorded speed, newest frame only"
    )
    src.add_argument("--fps", type=float, metavar="F", help="replay rate of a file/folder source, frames/s")
    src.add_argument("--loop", action="store_true", help="start a file/folder source again at its end")
    src.add_argument("--exit-at-end", action="store_true", help="stop when every file/folder source has ended")
    mdl = p.add_argument_group("model")
    mdl.add_argument("--model", type=Path, metavar="PATH", help="model package folder or TensorRT engine file")
    mdl.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), help="inference backend")
    mdl.add_argument("--precision", choices=("fp32", "fp16", "int8"), help="ONNX variant / engine precision")
    mdl.add_argument("--threshold", type=float, metavar="RAW", help="raw score threshold (overrides calibration)")
    mdl.add_argument(
        "--debounce",
        type=parse_debounce,
        metavar="N/M",
        help="an alarm changes state when N of the last M frames agree (default 2/3; 1/1 for one frame per part)",
    )
    out = p.add_argument_group("outputs")
    out.add_argument("--broker", metavar="URL", help="MQTT broker: mqtt://host:port or mqtts://host:port (TLS)")
    out.add_argument("--agent-id", metavar="ID", help="agent id (status messages, MQTT client id)")
    out.add_argument("--topic-root", metavar="ROOT", help="MQTT topic root, e.g. fod/site/line/agent1")
    out.add_argument(
        "--http-port", type=int, metavar="PORT", help="HTTP port for /metrics, /healthz, preview (0 = off)"
    )
    out.add_argument("--snapshots-dir", type=Path, metavar="DIR", help="folder of NG snapshots")
    out.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="state folder (outbox, snapshots); default: docs/config.md"
    )
    out.add_argument("--no-snapshots", action="store_true", help="do not save NG snapshots")
    run = p.add_argument_group("run")
    run.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this many seconds")
    run.add_argument("--log-format", choices=("text", "json"), help="log lines as text or JSON objects")
    run.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="minimum log level")
    run.add_argument("--demo", action="store_true", help="run the embedded demo (synthetic conveyor, demo model)")
    return p


def parse_debounce(text: str) -> tuple[int, int]:
    """Parse ``--debounce N/M`` into ``(n, m)``.

    Raises:
        argparse.ArgumentTypeError: not two integers ``1 <= N <= M`` separated by ``/`` (argparse
            turns it into a usage error, exit 2).
    """
    n_text, sep, m_text = text.partition("/")
    try:
        n, m = int(n_text), int(m_text)
    except ValueError:
        n = m = 0
    if not sep or not 1 <= n <= m:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give N/M with 1 <= N <= M, e.g. 2/3 (2 of the last 3 frames) or 1/1 (every frame)"
        )
    return n, m


def parse_broker(url: str) -> dict[str, Any]:
    """Parse ``--broker`` into its parts (used by the demo to find its broker).

    Args:
        url: ``mqtt://host[:port]``, ``mqtts://host[:port]`` (TLS, default port 8883) or ``host[:port]``;
            an optional ``user@`` gives the user name.

    Returns:
        ``{"mqtt.host": str, "mqtt.port": int}`` plus ``"mqtt.username"`` when given and
        ``"mqtt.tls.enabled": True`` for ``mqtts``. The TLS entry is a flag for the caller, not a
        config key: the agent applies ``--broker`` with :func:`apply_broker`.

    Raises:
        ConfigError: an unknown scheme, no host, a bad port or a password in the URL.
    """
    text = url if "://" in url else f"mqtt://{url}"
    parts = urlsplit(text)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(
            f"--broker {url!r}: unknown scheme {parts.scheme!r}; use mqtt://host:port or mqtts://host:port"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"--broker {url!r}: invalid port; use mqtt://host:1883") from exc
    if not parts.hostname:
        raise ConfigError(f"--broker {url!r}: no host; use mqtt://host:port")
    if parts.password:
        raise ConfigError(
            f"--broker {url!r}: do not put the password in the URL; set mqtt.password_env to the name of an "
            "environment variable that holds it"
        )
    tls = parts.scheme == "mqtts"
    parsed: dict[str, Any] = {"mqtt.host": parts.hostname, "mqtt.port": port or (8883 if tls else 1883)}
    if tls:
        parsed["mqtt.tls.enabled"] = True
    if parts.username:
        parsed["mqtt.username"] = parts.username
    return parsed


def apply_broker(config: Any, url: str) -> Any:
    """Point ``config.mqtt`` at ``--broker``: ``mqtt://host[:port]``, ``mqtts://host[:port]`` or ``host[:port]``.

    Args:
        config: the validated :class:`agent.config.AgentConfig`.
        url: the broker URL; ``mqtts`` turns TLS on (port 8883 by default), ``user@`` sets the user name.

    Returns:
        A copy of ``config`` with the new ``mqtt`` section.

    Raises:
        BrokerError: unknown scheme, no host, bad port, or a password in the URL.
    """
    text = url if "://" in url else f"mqtt://{url}"
    return config.model_copy(update={"mqtt": config.mqtt.with_broker_url(text)})


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted-key config overrides from the command-line flags.

    Raises:
        ConfigError: contradicting or invalid flags (``--camera`` with ``--source``, a bad ``--broker``).
    """
    o: dict[str, Any] = {}
    if args.camera is not None and args.source is not None:
        raise ConfigError("--camera and --source both set the first camera's source; pass only one")
    if args.camera is not None:
        o["cameras.0.source"] = args.camera
        o["cameras.0.kind"] = "camera"
    if args.source is not None:
        o["cameras.0.source"] = args.source
        o["cameras.0.kind"] = "auto"
    if args.realtime:
        o["cameras.0.realtime"] = True
    if args.fps is not None:
        o["cameras.0.fps"] = args.fps
    if args.loop:
        o["cameras.0.loop"] = True
    if args.exit_at_end:
        o["exit_at_end"] = True
    for flag, key in (
        ("model", "model.path"),
        ("backend", "model.backend"),
        ("precision", "model.precision"),
        ("threshold", "model.threshold"),
        ("agent_id", "agent_id"),
        ("topic_root", "mqtt.topic_root"),
        ("http_port", "http.port"),
        ("snapshots_dir", "snapshots.dir"),
        ("state_dir", "state_dir"),
        ("duration", "duration_s"),
        ("log_format", "logging.format"),
        ("log_level", "logging.level"),
    ):
        value = getattr(args, flag)
        if value is not None:
            o[key] = value
    if args.no_snapshots:
        o["snapshots.enabled"] = False
    debounce = getattr(args, "debounce", None)
    if debounce is not None:
        o["decision.debounce_n"], o["decision.debounce_m"] = debounce
    return o


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: ``ts``, ``level``, ``logger``, ``msg`` (+ ``exc`` and extras)."""

    _STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        entry: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "thread": record.threadName,
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD:
                entry[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Configure the root logger for the agent (stderr).

    Args:
        fmt: ``text`` (``time level logger: message``) or ``json`` (:class:`JsonFormatter`).
        level: minimum level name.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"))
    handler.set_name("fod-agent")
    handler.addFilter(RedactingFilter())  # no password of a camera URL ever reaches the log
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "fod-agent":  # ours from an earlier call; other handlers (pytest's) stay
            root.removeHandler(old)
    root.addHandler(handler)
    for other in root.handlers:  # handlers others installed (fod's CLI, libraries) redact too
        if not any(isinstance(f, RedactingFilter) for f in other.filters):
            other.addFilter(RedactingFilter())
    root.setLevel(level)


def _check_config(config: Any, origin: str) -> int:
    """Validate what the run would refuse, including the model package's manifest and calibration."""
    warnings = []
    path = config.model.path
    if path is None:
        warnings.append("model.path is not set: pass --model PKG_DIR when starting the agent")
    elif not Path(path).exists():
        warnings.append(f"model.path {path} does not exist on this machine")
    else:
        from agent.backends import check_input_size, effective_calibration, split_model_path
        from fod.errors import FodError
        from fod.package import ModelPackage

        try:
            package = ModelPackage(split_model_path(Path(path))[0])
            check_input_size(package, config.model)
            effective_calibration(package, config.model)
        except (AgentError, FodError, ValueError, OSError) as exc:
            print(f"fod-agent: error: {origin}: model.path {path}: {exc}", file=sys.stderr)
            return 2
    for camera in config.cameras:
        source = str(camera.source)
        if camera.kind in ("file", "folder") and not Path(source).exists():
            warnings.append(f"camera {camera.name}: source {source} does not exist on this machine")
    print(
        f"{origin}: valid ({len(config.cameras)} camera(s), MQTT {config.mqtt.host}:{config.mqtt.port}, "
        f"HTTP port {config.http.port})"
    )
    for warning in warnings:
        print(f"  warning: {warning}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("fod_tools.demo")
        run_demo = demo.run_demo
    except (ImportError, AttributeError) as exc:
        print(
            f"fod-agent: error: the demo is not available in this installation ({exc}); "
            "install the full package (pip install -e '.[train,demo]' in the fod-agent clone) "
            "or run the agent with --model and --source",
            file=sys.stderr,
        )
        return 1
    return int(run_demo(args) or 0)


async def _serve(config: Any) -> int:
    from agent.pipeline import Agent  # imports the MQTT link, OpenCV and the runner only when running

    agent = Agent(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.request_stop, f"signal {sig.name}")
    try:
        return await agent.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fod-agent`` console script.

    Args:
        argv: arguments without the program name; None = ``sys.argv[1:]``.

    Returns:
        The exit code: 0 clean stop, 1 runtime error, 2 invalid configuration.
    """
    args = build_parser().parse_args(argv)
    setup_logging(args.log_format or "text", args.log_level or "INFO")
    if args.demo:
        return _run_demo(args)
    from agent.config import load_config

    origin = str(args.config) if args.config else "configuration"
    try:
        config = load_config(args.config, overrides_from_args(args))
        if args.broker:
            config = apply_broker(config, args.broker)
    except (ConfigError, BrokerError) as exc:
        print(f"fod-agent: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    if args.check_config:
        return _check_config(config, origin)
    setup_logging(config.logging.format, config.logging.level)
    try:
        return asyncio.run(_serve(config))
    except ConfigError as exc:
        print(f"fod-agent: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"fod-agent: error: {redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
