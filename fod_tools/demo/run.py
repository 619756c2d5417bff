"""``fod-agent --demo``: the whole agent on a synthetic conveyor, with no camera, broker or data set.

:func:`run_demo` does, in order:

1. the demo model: the cached package, or a new one trained on synthetic good parts
   (:func:`fod_tools.demo.model.ensure_demo_package`, with progress bars); ``--model PKG_DIR`` skips it;
2. the broker: the one listening on ``--broker`` (default ``mqtt://127.0.0.1:1883``), or an embedded
   one (:func:`fod_tools.demo.broker.ensure_broker`);
3. the agent (:class:`agent.pipeline.Agent`) on a :class:`~fod_tools.demo.conveyor.SyntheticConveyor`
   that emulates a triggered camera (one frame per part, 5 parts/s), scoring the ROI around the
   part with the demo package and publishing on ``fod/demo/line1/<agent_id>/...``; every part is
   judged on its own (``decision.debounce_n = debounce_m = 1``);
4. a live console view fed by the MQTT messages themselves (so what it shows really went through
   the broker): frames, fps, score, verdict, the conveyor's ground truth, alarms; plus the preview
   URL and the ``mosquitto_sub`` line that shows the raw messages;
5. a clean stop on Ctrl-C (or SIGTERM) or after ``--duration SECONDS``, with a summary (time to the
   first result, frames, alarms, agreement of the verdicts with the ground truth).

Other ``fod-agent`` flags apply as usual (``--config``, ``--http-port``, ``--topic-root``,
``--agent-id``, ``--backend``, ``--threshold``, ``--log-level`` ...); ``--camera`` and ``--source``
are ignored (the demo's camera is the synthetic conveyor).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import AgentError, ConfigError
from fod_tools.demo.broker import BrokerInfo, ensure_broker, free_port
from fod_tools.demo.conveyor import SyntheticConveyor
from fod_tools.demo.model import DEMO_RECIPE, DemoRecipe, cache_dir, demo_conveyor, ensure_demo_package, roi_box

log = logging.getLogger(__name__)

CAMERA = "conveyor"
ROI = "belt"
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_HTTP_PORT = 8080
CONVEYOR_FPS = 5.0
CONVEYOR_SEED = 7
CONVEYOR_DEFECT_RATE = 0.35
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def run_demo(args: argparse.Namespace) -> int:
    """Run the embedded demo; the body of ``fod-agent --demo``.

    Args:
        args: the parsed ``fod-agent`` arguments (see :func:`agent.cli.build_parser`).

    Returns:
        The exit code: 0 after a clean stop, 1 when something could not start (the reason is
        printed), 2 for an invalid configuration, 130 when interrupted before the agent ran.
    """
    started = time.perf_counter()
    if getattr(args, "log_level", None) is None:
        _quiet_logs()
    if getattr(args, "camera", None) is not None or getattr(args, "source", None) is not None:
        print("fod-agent --demo: --camera / --source are ignored: the demo's camera is the synthetic conveyor")
    try:
        host, port = _broker_address(getattr(args, "broker", None))
        model = getattr(args, "model", None)
        pkg = Path(model) if model is not None else ensure_demo_package(progress=sys.stderr.isatty())
        with ensure_broker(host, port) as broker:
            return _run_with_broker(args, pkg, broker, started)
    except ConfigError as exc:
        print(f"fod-agent --demo: error: {exc}", file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"fod-agent --demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fod-agent --demo: interrupted", file=sys.stderr)
        return 130


def demo_overrides(
    args: argparse.Namespace,
    *,
    pkg: Path,
    broker: BrokerInfo,
    recipe: DemoRecipe = DEMO_RECIPE,
    root: Path | None = None,
) -> dict[str, Any]:
    """Config overrides (dotted keys) of the demo, on top of the user's flags.

    The demo's camera replaces every configured camera; the outbox and snapshots go to the demo's
    cache folder so that the demo writes nothing into the working directory.

    Args:
        args: parsed ``fod-agent`` arguments.
        pkg: the model package.
        broker: the broker in use.
        recipe: the demo recipe (its ROI becomes the camera's ROI).
        root: demo cache folder; None = :func:`fod_tools.demo.model.cache_dir`.

    Returns:
        Overrides for :func:`agent.config.load_config`.

    Raises:
        ConfigError: a contradicting or invalid flag.
    """
    from agent.cli import overrides_from_args

    root = root or cache_dir()
    flags = argparse.Namespace(**{**vars(args), "camera": None, "source": None, "broker": None})
    overrides = overrides_from_args(flags)
    x, y, w, h = recipe.roi_px
    frame_w, frame_h = recipe.frame_size
    roi: dict[str, Any] = {"name": ROI}
    if (x, y, w, h) != (0, 0, frame_w, frame_h):
        roi["box_px"] = [x, y, w, h]
    overrides["cameras"] = [{"name": CAMERA, "source": "synthetic-conveyor", "rois": [roi]}]
    overrides["model.path"] = str(pkg)
    overrides["mqtt.host"] = broker.host
    overrides["mqtt.port"] = broker.port
    overrides.setdefault("agent_id", "demo")
    overrides.setdefault("mqtt.topic_root", f"fod/demo/line1/{overrides['agent_id']}")
    overrides.setdefault("mqtt.outbox_dir", str(root / "outbox"))
    overrides.setdefault("snapshots.dir", str(root / "snapshots"))
    if recipe.trigger:  # one frame per part: judge every part on its own
        overrides.setdefault("decision.debounce_n", 1)
        overrides.setdefault("decision.debounce_m", 1)
    if getattr(args, "config", None) is None:
        overrides.setdefault("http.host", "127.0.0.1")
    if "http.port" not in overrides:
        overrides["http.port"] = DEFAULT_HTTP_PORT if _port_free(DEFAULT_HTTP_PORT) else free_port()
    return overrides


# ---------------------------------------------------------------------- the run
def _run_with_broker(args: argparse.Namespace, pkg: Path, broker: BrokerInfo, started: float) -> int:
    from agent.config import load_config
    from agent.pipeline import Agent

    config = load_config(getattr(args, "config", None), demo_overrides(args, pkg=pkg, broker=broker))
    conveyor = demo_conveyor(
        DEMO_RECIPE, seed=CONVEYOR_SEED, defect_rate=CONVEYOR_DEFECT_RATE, fps=CONVEYOR_FPS, pace=False
    )
    agent = Agent(config, sources={CAMERA: conveyor})
    view = DemoView(
        broker,
        topic_root=config.mqtt.topic_root,
        conveyor=conveyor,
        roi_box=roi_box(DEMO_RECIPE),
        started=started,
        preview_url=f"http://{_url_host(config.http.host)}:{config.http.port}/" if config.http.port else None,
        model=str(pkg),
    )
    agent.status_notes = lambda: {"demo verdicts vs ground truth": view.tally()}  # on the status page
    view.print_header()
    view.start()
    try:
        code = asyncio.run(_serve(agent))
    finally:
        view.stop()
        conveyor.release()
    view.print_summary()
    return code


async def _serve(agent: Any) -> int:
    """Run the agent until it stops; SIGINT / SIGTERM ask it to stop cleanly."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, agent.request_stop, f"signal {sig.name}")
            installed.append(sig)
    try:
        return int(await agent.run())
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


# ---------------------------------------------------------------------- the console view
@dataclass
class _Stats:
    """What the view has seen so far (guarded by :attr:`DemoView._lock`)."""

    results: int = 0
    first_result_s: float | None = None
    times: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    last: dict[str, Any] | None = None
    last_truth: bool | None = None
    agree: dict[str, int] = field(default_factory=lambda: {"tp": 0, "fp": 0, "fn": 0, "tn": 0})
    alarm_state: str = "OK"
    alarms_ng: int = 0
    events: deque[str] = field(default_factory=lambda: deque(maxlen=6))
    camera: dict[str, Any] = field(default_factory=dict)
    status: str | None = None
    images: int = 0


class DemoView:
    """A live console view of the demo, fed by the agent's MQTT messages.

    Subscribes to ``<topic_root>/#`` with paho and shows, refreshed twice a second: frames scored,
    scoring rate (frames/s), the last raw and normalised score against the threshold, the frame's
    verdict next to the conveyor's ground truth (a defective part in view or not), the debounced
    alarm state and the last alarm transitions. Uses ``rich`` when it is installed and the output is
    a terminal, else prints one plain line every 2 s.

    Args:
        broker: where to subscribe.
        topic_root: the agent's ``mqtt.topic_root``.
        conveyor: the source, for its ground truth (:meth:`SyntheticConveyor.truth_at`).
        roi_box: the scored region ``(x0, y0, x1, y1)``: a frame counts as defective when at least
            half of a defect lies inside it.
        started: ``time.perf_counter()`` when the demo started (for the time to the first result).
        preview_url: the agent's status page, or None when HTTP is off.
        model: model package shown in the header.
    """

    def __init__(
        self,
        broker: BrokerInfo,
        *,
        topic_root: str,
        conveyor: SyntheticConveyor,
        roi_box: tuple[int, int, int, int],
        started: float,
        preview_url: str | None,
        model: str,
    ) -> None:
        self.broker = broker
        self.topic_root = topic_root
        self.conveyor = conveyor
        self.roi_box = roi_box
        self.started = started
        self.preview_url = preview_url
        self.model = model
        self.stats = _Stats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Subscribe and start refreshing the view (a daemon thread)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fod-demo-view-{id(self):x}")
        client.on_connect = lambda c, *_: c.subscribe(f"{self.topic_root}/#", qos=1)
        client.on_message = self._on_message
        client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        client.loop_start()
        self._client = client
        self._thread = threading.Thread(target=self._render_loop, name="demo-view", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing and disconnect. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3.0)
            self._thread = None
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    # -------------------------------------------------------------- messages
    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        kind = message.topic[len(self.topic_root) + 1 :].split("/")[-1]
        now = time.perf_counter()
        with self._lock:
            if kind in ("mask", "overlay"):
                self.stats.images += 1
                return
            try:
                data = json.loads(message.payload)
            except (ValueError, UnicodeDecodeError):
                return
            if not isinstance(data, dict):
                return
            if kind == "result":
                self._on_result(data, now)
            elif kind == "alarm":
                self._on_alarm(data, message.retain)
            elif kind == "state":
                self.stats.camera = data
            elif kind == "status":
                self.stats.status = str(data.get("state"))

    def _on_result(self, data: dict[str, Any], now: float) -> None:
        stats = self.stats
        stats.results += 1
        stats.times.append(now)
        if stats.first_result_s is None:
            stats.first_result_s = now - self.started
        stats.last = data
        frame = data.get("source_frame")
        truth = self.conveyor.truth_at(frame) if isinstance(frame, int) else None
        defective = None if truth is None else truth.defective_in(self.roi_box)
        stats.last_truth = defective
        if defective is not None:
            ng = data.get("verdict") == "NG"
            key = ("tp" if ng else "fn") if defective else ("fp" if ng else "tn")
            stats.agree[key] += 1

    def _on_alarm(self, data: dict[str, Any], retained: bool) -> None:
        stats = self.stats
        state = str(data.get("state"))
        if retained and stats.results == 0:
            return  # the retained state of an earlier run
        stats.alarm_state = state
        if state == "NG":
            stats.alarms_ng += 1
        elapsed = time.perf_counter() - self.started
        score = data.get("score")
        score_text = f"{score:.3g}" if isinstance(score, int | float) else "?"
        stats.events.appendleft(
            f"{elapsed:7.1f} s  {data.get('previous')} -> {state}  score {score_text}  frame {data.get('source_frame')}"
        )

    # -------------------------------------------------------------- output
    def print_header(self) -> None:
        """Print where to look: model, broker, preview page, the mosquitto_sub line."""
        kind = "already running" if self.broker.kind == "existing" else f"embedded {self.broker.kind}"
        lines = [
            "",
            "fod-agent demo: a synthetic conveyor scored by the FOD model, results over MQTT",
            f"  model     {self.model}",
            f"  broker    {self.broker.url} ({kind})",
            f"  preview   {self.preview_url or 'off (--http-port 0)'}",
            f"  messages  {self.subscribe_hint()}",
            "  stop      Ctrl-C (or --duration SECONDS)",
            "",
        ]
        print("\n".join(lines), flush=True)

    def subscribe_hint(self) -> str:
        """The ``mosquitto_sub`` line that shows the agent's JSON messages.

        Only the text topics (status, camera state, results, alarms): the mask (PNG) and overlay
        (JPEG) topics carry raw image bytes that would garble a terminal.
        """
        root = self.topic_root
        topics = " ".join(f"-t '{root}/{t}'" for t in ("status", "+/state", "+/result", "+/alarm"))
        return f"mosquitto_sub -h {self.broker.host} -p {self.broker.port} -v {topics}"

    def tally(self) -> str:
        """The verdicts against the conveyor's ground truth so far, in words (:func:`tally_text`)."""
        with self._lock:
            return tally_text(self.stats.agree)

    def status_line(self) -> str:
        """One line: elapsed time, frames, rate, last score and verdict, ground truth, alarms."""
        with self._lock:
            stats = self.stats
            elapsed = time.perf_counter() - self.started
            recent = [t for t in stats.times if t >= time.perf_counter() - 3.0]
            fps = len(recent) / 3.0
            last = stats.last or {}
            truth = {None: "?", True: "defective", False: "good"}[stats.last_truth]
            score = last.get("score")
            norm = last.get("normalized_score")
            score_text = (
                f"{score:.3g} (norm {norm:.2f})" if isinstance(score, float) and isinstance(norm, float) else "-"
            )
            dropped = stats.camera.get("frames_dropped", 0)
            return (
                f"{elapsed:6.1f} s  frames {stats.results:5d}  {fps:4.1f} fps  dropped {dropped}  "
                f"score {score_text}  verdict {last.get('verdict', '-')}  truth {truth}  "
                f"alarm {stats.alarm_state}  alarms {stats.alarms_ng}"
            )

    def _render_loop(self) -> None:
        rich_ok = sys.stdout.isatty()
        if rich_ok:
            try:
                from rich.live import Live
            except ImportError:
                rich_ok = False
        if not rich_ok:
            while not self._stop.wait(2.0):
                print(self.status_line(), flush=True)
            return
        with Live(self._rich_table(), refresh_per_second=4, transient=False) as live:
            while not self._stop.wait(0.5):
                live.update(self._rich_table())

    def _rich_table(self) -> Any:
        from rich.table import Table

        with self._lock:
            stats = self.stats
            elapsed = time.perf_counter() - self.started
            recent = [t for t in stats.times if t >= time.perf_counter() - 3.0]
            last = stats.last or {}
            latency = (last.get("latency_ms") or {}).get("total")
            truth = stats.last_truth
            verdict = last.get("verdict", "-")
            table = Table(title="fod-agent demo", show_header=False, min_width=72)
            table.add_column(style="bold")
            table.add_column()
            table.add_row("running", f"{elapsed:.1f} s  (agent {stats.status or 'starting'})")
            table.add_row(
                "frames scored",
                f"{stats.results}  ({len(recent) / 3.0:.1f} fps; captured {stats.camera.get('frames_captured', 0)}, "
                f"dropped {stats.camera.get('frames_dropped', 0)})",
            )
            if isinstance(last.get("score"), float):
                table.add_row(
                    "score",
                    f"{last['score']:.4g} raw, {last.get('normalized_score', 0):.2f} normalised "
                    f"(threshold {last.get('threshold', 0):.4g} = 0.50)",
                )
            colour = "red" if verdict == "NG" else "green"
            truth_text = {None: "?", True: "[red]defective part[/]", False: "good part"}[truth]
            table.add_row("verdict", f"[{colour}]{verdict}[/]   ground truth: {truth_text}")
            if latency is not None:
                table.add_row("latency", f"{latency:.1f} ms capture -> result")
            a = stats.agree
            table.add_row(
                "vs truth",
                f"NG on defect {a['tp']}, OK on good {a['tn']}, false NG {a['fp']}, missed {a['fn']}",
            )
            table.add_row("tally", tally_text(a))
            alarm_colour = "red" if stats.alarm_state == "NG" else "green"
            table.add_row("alarm", f"[{alarm_colour}]{stats.alarm_state}[/]  ({stats.alarms_ng} NG alarms)")
            for i, event in enumerate(stats.events):
                table.add_row("last alarms" if i == 0 else "", event)
            return table

    def print_summary(self) -> None:
        """Print the totals after the run."""
        with self._lock:
            stats = self.stats
            a = stats.agree
            judged = sum(a.values())
            first = f"{stats.first_result_s:.1f} s" if stats.first_result_s is not None else "none"
            lines = [
                "",
                f"demo stopped after {time.perf_counter() - self.started:.1f} s; first result after {first} "
                "(including the demo model's training on a first run)",
                f"  frames scored {stats.results}, NG alarms {stats.alarms_ng}, images published {stats.images}",
            ]
            if judged:
                lines.append(
                    f"  verdicts vs ground truth ({judged} frames): NG on defect {a['tp']}, OK on good {a['tn']}, "
                    f"false NG {a['fp']}, missed {a['fn']}"
                )
                lines.append(f"  {tally_text(a)}")
        print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------- helpers
def tally_text(agree: dict[str, int]) -> str:
    """Recall and false-NG rate of the verdicts against the conveyor's ground truth, in words.

    Args:
        agree: counts ``tp`` (NG on a defective part), ``fn`` (OK on one), ``fp`` (NG on a good
            part), ``tn`` (OK on one).
    """
    defective, good = agree["tp"] + agree["fn"], agree["fp"] + agree["tn"]
    parts = []
    if defective:
        parts.append(f"defective parts NG: {agree['tp']} of {defective} ({100 * agree['tp'] / defective:.1f} %)")
    else:
        parts.append("no defective part seen")
    if good:
        parts.append(f"good parts NG: {agree['fp']} of {good} ({100 * agree['fp'] / good:.1f} %)")
    return "; ".join(parts)


def _broker_address(url: str | None) -> tuple[str, int]:
    from agent.cli import parse_broker

    overrides = parse_broker(url or DEFAULT_BROKER)
    if overrides.get("mqtt.tls.enabled"):
        raise ConfigError(
            f"--broker {url}: the demo's console view talks plain MQTT; run the demo against a plain "
            "mqtt:// broker, and the agent itself with --config for TLS"
        )
    host, port = str(overrides["mqtt.host"]), int(overrides["mqtt.port"])
    if host not in _LOCAL_HOSTS:
        log.info("demo: using the broker at %s:%d (no embedded broker for a remote host)", host, port)
    return host, port


def _quiet_logs() -> None:
    """The console view is the demo's output: only warnings from the agent's loggers."""
    logging.getLogger().setLevel(logging.WARNING)


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host
