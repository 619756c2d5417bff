"""End-to-end benchmark of the agent (the agent part of ``fod bench``).

The real :class:`agent.pipeline.Agent` runs on a replay source against an MQTT broker while a
subscriber in this process records every ``<root>/<camera>/result`` message. The replay source
serves a pool of frames from memory (frames of the synthetic conveyor, or the images of
``--source DIR``, decoded once), like a camera driver delivers them: file decoding is not part of
the numbers. One ROI (the whole frame) per frame, so the agent runs the model at batch 1.

Runs, in order, each with a fresh agent on the same loaded model:

1. **bare backend**: ``runner.infer`` alone at batch 1 on preprocessed pool frames (before and
   after the sustained run; the mean is the reference of the throughput ratio);
2. **sustained** (model pace, ``long_frames`` frames, every frame scored): sustained FPS from the
   receive times, agent / bare throughput (goal >= 0.9), and resident memory (RSS of this process,
   from ``/proc/self/status``) after ``first_frames`` frames, at every tenth of the run and at the end;
3. **latency** (a live source at ``latency_factor`` x the sustained FPS, so no frame waits for
   the model): capture->receive latency (``capture_ts`` of the payload vs the wall clock at
   reception: includes the broker hop) and the payload's own ``latency_ms.total`` (capture to
   publish call), p50 / p95 / p99, with the stage means;
4. **overload** (a live source at ``overload_factor`` x the sustained FPS, newest-frame policy):
   frames captured / dropped, frame age at inference (``latency_ms.capture + preprocess``: time
   from capture to the start of inference) and latency.

Everything runs on this machine: a shared or busy CPU lowers every number (the load average is in
the report). No torch is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.backends import LoadedModel, effective_calibration, load_model
from agent.capture import IMAGE_SUFFIXES
from agent.cli import apply_broker
from agent.config import AgentConfig, load_config
from agent.errors import AgentError, BrokerError
from agent.mqtt.config import MqttConfig
from agent.pipeline import Agent
from fod.errors import FodError
from fod.preprocess import read_image, to_model_input
from fod.timing import percentile_ms, time_runners

log = logging.getLogger(__name__)

SETTLE_S = 3.0
"""How long to wait after a run for results still on their way from the broker, s."""


@dataclass(frozen=True)
class AgentBenchSettings:
    """What the agent benchmark runs.

    Attributes:
        frames: results of the latency run and source frames of the overload run.
        long_frames: frames of the sustained run at model pace (FPS, throughput ratio, memory).
        first_frames: frames after which the first memory sample is taken.
        warmup_frames: first results of each run left out of FPS and latency statistics.
        precision: ``fp32``, ``fp16`` or ``int8``: the package variant (or engine) the agent runs.
        backend: ``auto``, ``onnxruntime`` or ``tensorrt``.
        threads: ONNX Runtime intra-op threads; None = all cores.
        broker: ``mqtt://host:port`` of a running broker; None starts one on a free loopback port.
        source_dir: images to replay; None = frames of :class:`fod_tools.demo.conveyor.SyntheticConveyor`.
        frame_size: ``(height, width)`` of the synthetic frames in px.
        pool_size: frames held in memory and cycled through.
        latency_factor: source rate of the latency run, as a multiple of the sustained FPS.
        overload_factor: source rate of the overload run, as a multiple of the sustained FPS.
        bare_repeats: timed calls of the bare backend (each side of the sustained run).
        quiet: keep the agent's INFO log lines out of the output.
    """

    frames: int = 500
    long_frames: int = 10_000
    first_frames: int = 100
    warmup_frames: int = 10
    precision: str = "fp32"
    backend: str = "auto"
    threads: int | None = None
    broker: str | None = None
    source_dir: Path | None = None
    frame_size: tuple[int, int] = (480, 640)
    pool_size: int = 32
    latency_factor: float = 0.5
    overload_factor: float = 2.0
    bare_repeats: int = 200
    quiet: bool = True


# ---------------------------------------------------------------------------------------------- source


class MemoryReplay:
    """Frames from memory that read like ``cv2.VideoCapture``: the benchmark's camera.

    The agent's capture layer wraps it in :class:`agent.capture.ObjectSource`: ``is_live`` selects
    the newest-frame policy (True) or model pace (False), ``fps`` paces a live source, ``last_id``
    (the frame index) becomes the result's ``source_frame``.

    Args:
        frames: ``[H, W, 3]`` uint8 BGR frames, cycled.
        live: a live camera (paced at ``fps``, newest-frame policy) or a replay at model pace.
        fps: frame rate of a live source, frames/s.
        limit: frames to deliver. A replay ends there (``read`` returns ``(False, None)``); a live
            source calls ``on_limit`` once and goes on (the benchmark stops the agent).
        on_limit: called from the capture thread when the frame after the ``limit``-th is read
            (the capture thread has then handed over all ``limit`` frames).
    """

    def __init__(
        self,
        frames: list[np.ndarray],
        *,
        live: bool,
        fps: float | None = None,
        limit: int | None = None,
        on_limit: Callable[[], None] | None = None,
    ) -> None:
        if not frames:
            raise AgentError("MemoryReplay needs at least one frame")
        self._frames = frames
        self.is_live = live
        self.fps = fps
        self.limit = limit
        self.on_limit = on_limit
        self.last_id: int | None = None
        self.count = 0
        self.first_read: float | None = None
        self.last_read: float | None = None

    def read(self) -> tuple[bool, np.ndarray | None]:
        """The next frame: ``(True, frame)``, or ``(False, None)`` at the end of a replay."""
        if self.limit is not None and self.count >= self.limit and not self.is_live:
            return False, None
        frame = self._frames[self.count % len(self._frames)]
        now = time.perf_counter()
        if self.first_read is None:
            self.first_read = now
        self.last_read = now
        self.last_id = self.count
        self.count += 1
        if self.limit is not None and self.count == self.limit + 1 and self.on_limit is not None:
            self.on_limit()
        return True, frame

    def release(self) -> None:
        """Nothing to free."""


def synthetic_frames(n: int, frame_size: tuple[int, int], *, stride: int = 9) -> list[np.ndarray]:
    """``n`` frames of the synthetic conveyor (every ``stride``-th, for variety), ``[H, W, 3]`` uint8 BGR."""
    from fod_tools.demo.conveyor import SyntheticConveyor

    conveyor = SyntheticConveyor(frame_size[1], frame_size[0], seed=0)
    frames = []
    for i in range(n * stride):
        _, frame = conveyor.read()
        if i % stride == 0:
            frames.append(np.array(frame, copy=True))
    conveyor.release()
    return frames


def folder_frames(folder: Path, n: int) -> list[np.ndarray]:
    """The first ``n`` images of ``folder`` (sorted by name), decoded as BGR uint8.

    Raises:
        AgentError: the folder is missing, holds no image, or an image cannot be decoded.
    """
    if not folder.is_dir():
        raise AgentError(f"--source {folder}: not a folder; pass a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:n]
    if not files:
        raise AgentError(f"--source {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    try:
        return [read_image(str(p)) for p in files]
    except FodError as exc:
        raise AgentError(f"--source {folder}: {exc}") from exc


# ---------------------------------------------------------------------------------------------- memory


def _status_kib(key: str) -> float | None:
    try:
        with Path("/proc/self/status").open(encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    """Resident memory of this process in MiB (``/proc/self/status`` VmRSS; psutil elsewhere; None if neither)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return round(kib / 1024, 1)
    try:
        import psutil
    except ImportError:
        return None
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process in MiB (``VmHWM``), None where unknown."""
    kib = _status_kib("VmHWM")
    return round(kib / 1024, 1) if kib is not None else None


# ---------------------------------------------------------------------------------------------- collector

# columns of ResultCollector.data
RECV, CAPTURE_TS, TOTAL, CAPTURE, PREPROCESS, INFERENCE, POSTPROCESS, SOURCE_FRAME, SEQ, NG = range(10)
COLUMNS = 10


class ResultCollector:
    """An MQTT subscriber that records the timings of every result message of one camera.

    One row per message in a float64 array allocated (and touched) up front, so that recording
    does not grow this process's memory during the memory measurement: receive wall time (unix s),
    ``capture_ts`` (unix s), ``latency_ms.total``, ``.capture``, ``.preprocess``, ``.inference``,
    ``.postprocess`` (ms), ``source_frame``, ``seq`` (the agent's count of scored frames) and 1.0
    for an ``NG`` verdict, else 0.0.

    Args:
        config: the agent's ``[mqtt]`` section (host, port, credentials, TLS are reused).
        topic_root: ``<root>``; the collector subscribes to ``<root>/+/result``.

    Raises:
        BrokerError: the broker cannot be reached or refuses the subscription within 10 s.
    """

    def __init__(self, config: MqttConfig, topic_root: str) -> None:
        self.topic_root = topic_root
        self._lock = threading.Lock()
        self._topic = ""
        self.data = np.full((0, COLUMNS), np.nan)
        self.count = 0
        self.overflow = 0
        self.bad = 0
        self.on_count: Callable[[int], None] | None = None
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fod-bench-sub-{uuid.uuid4().hex[:8]}")
        if config.username is not None:
            self.client.username_pw_set(config.username, config.password())
        if config.tls is not None:
            self.client.tls_set_context(config.tls.ssl_context())
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        try:
            self.client.connect(config.host, config.port, keepalive=30)
        except OSError as exc:
            raise BrokerError(
                f"the benchmark's subscriber cannot connect to {config.host}:{config.port}: {exc}; check --broker"
            ) from exc
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise BrokerError(f"the broker at {config.host}:{config.port} accepted no subscription within 10 s")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(f"{self.topic_root}/+/result", qos=0)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self._subscribed.set()

    def start(self, camera: str, capacity: int, on_count: Callable[[int], None] | None = None) -> None:
        """Record the results of ``camera`` from now on (earlier rows are forgotten).

        Args:
            camera: camera name (topic level).
            capacity: rows to allocate; results beyond it are counted but not recorded.
            on_count: called (in the subscriber's thread) with the running count after each result.
        """
        data = np.full((capacity, COLUMNS), np.nan)  # full, not zeros: the pages are touched now
        with self._lock:
            self._topic = f"{self.topic_root}/{camera}/result"
            self.data = data
            self.count = 0
            self.overflow = 0
            self.bad = 0
            self.on_count = on_count

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received = time.time()
        if message.topic != self._topic:
            return
        try:
            payload = json.loads(message.payload)
            lat = payload["latency_ms"]
            source = payload.get("source_frame")
            row = (
                received,
                float(payload["capture_ts"]),
                float(lat["total"]),
                float(lat["capture"]),
                float(lat["preprocess"]),
                float(lat["inference"]),
                float(lat["postprocess"]),
                float(source) if isinstance(source, int | float) else math.nan,
                float(payload["seq"]),
                1.0 if payload.get("verdict") == "NG" else 0.0,
            )
        except (ValueError, KeyError, TypeError):
            self.bad += 1
            return
        with self._lock:
            if self.count < len(self.data):
                self.data[self.count] = row
            else:
                self.overflow += 1
            self.count += 1
            count, callback = self.count, self.on_count
        if callback is not None:
            callback(count)

    def rows(self) -> np.ndarray:
        """The recorded rows so far, ``[n, 10]`` float64 in order of arrival (a copy)."""
        with self._lock:
            return self.data[: min(self.count, len(self.data))].copy()

    def wait_settled(self, expected: int, timeout_s: float = SETTLE_S) -> None:
        """Wait until ``expected`` results arrived, or nothing arrived for 0.5 s, or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        last, last_change = self.count, time.monotonic()
        while self.count < expected and time.monotonic() < deadline:
            time.sleep(0.05)
            if self.count != last:
                last, last_change = self.count, time.monotonic()
            elif time.monotonic() - last_change > 0.5:
                return

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------------------------------------- statistics


def latency_stats(rows: np.ndarray, skip: int) -> dict[str, Any]:
    """Latency percentiles of collected rows (see :class:`ResultCollector`), first ``skip`` rows left out.

    Returns:
        ``receive_p50_ms`` .. ``receive_p99_ms`` (capture_ts -> reception), ``total_p50_ms`` ..
        ``total_p99_ms`` (payload ``latency_ms.total``), ``stage_mean_ms`` (capture wait,
        preprocess, inference, postprocess, total), ``received`` (rows used) and ``ng_fraction``
        (share of NG verdicts).
    """
    used = rows[skip:] if len(rows) > skip else rows
    receive_ms = (used[:, RECV] - used[:, CAPTURE_TS]) * 1e3
    out: dict[str, Any] = {"received": len(used)}
    out["ng_fraction"] = round(float(np.mean(used[:, NG])), 4) if len(used) else math.nan
    for q in (50, 95, 99):
        out[f"receive_p{q}_ms"] = percentile_ms(receive_ms, q)
        out[f"total_p{q}_ms"] = percentile_ms(used[:, TOTAL], q)
    names = {"capture": CAPTURE, "preprocess": PREPROCESS, "inference": INFERENCE, "postprocess": POSTPROCESS}
    names["total"] = TOTAL
    out["stage_mean_ms"] = {
        k: round(float(np.mean(used[:, c])), 3) if len(used) else math.nan for k, c in names.items()
    }
    return out


def scored_per_s(rows: np.ndarray, skip: int) -> float:
    """Frames scored per second, from the ``seq`` and receive time of the first and last row after ``skip``.

    Counting by ``seq`` rather than by rows keeps the rate right when a QoS 0 result was lost.

    Returns:
        frames/s, NaN with fewer than 2 rows or no time between them.
    """
    used = rows[skip:]
    if len(used) < 2 or not used[-1, RECV] > used[0, RECV]:
        return math.nan
    return round(float((used[-1, SEQ] - used[0, SEQ]) / (used[-1, RECV] - used[0, RECV])), 2)


# ---------------------------------------------------------------------------------------------- the benchmark


class _Bench:
    """State shared by the runs of one agent benchmark."""

    def __init__(
        self,
        settings: AgentBenchSettings,
        base: AgentConfig,
        model: LoadedModel,
        collector: ResultCollector,
        frames: list[np.ndarray],
        say: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.base = base
        self.model = model
        self.collector = collector
        self.frames = frames
        self.say = say
        self.bare_fps = math.nan
        self.memory: dict[str, Any] = {}

    def config(self, camera: str, *, exit_at_end: bool, duration_s: float) -> AgentConfig:
        """The base config with one camera called ``camera`` and the run's stop rules."""
        camera_config = self.base.cameras[0].model_copy(update={"name": camera})
        return self.base.model_copy(
            update={"cameras": [camera_config], "exit_at_end": exit_at_end, "duration_s": duration_s}
        )

    def run_agent(self, camera: str, source: MemoryReplay, *, exit_at_end: bool, duration_s: float) -> Agent:
        """Run a fresh agent on ``source`` until it stops (end of a replay, a stop request, or ``duration_s``)."""
        agent = Agent(
            self.config(camera, exit_at_end=exit_at_end, duration_s=duration_s),
            sources={camera: source},
            model=self.model,
        )
        asyncio.run(agent.run())
        return agent

    def bare(self) -> dict[str, Any]:
        """``runner.infer`` alone at batch 1 on preprocessed pool frames."""
        image = to_model_input(self.frames[0], self.model.image_size, source="bench frame")[None]
        repeats = max(20, min(self.settings.bare_repeats, self.settings.long_frames))
        timing = time_runners({"bare": self.model.runner}, image, repeats=repeats, warmup=3)["bare"]
        return asdict(timing)

    def sustained(self) -> dict[str, Any]:
        """Model pace: every frame scored; FPS and the memory samples."""
        s = self.settings
        n = s.long_frames
        samples: list[tuple[int, float | None]] = []
        tenth = {max(1, round(n * k / 10)) for k in range(1, 10)}
        marks = {min(s.first_frames, n), n} | tenth

        def on_count(count: int) -> None:
            if count in marks:
                samples.append((count, rss_mib()))
                if count in tenth and n >= 1000:
                    self.say(f"agent: sustained run {count}/{n} frames, RSS {samples[-1][1]} MiB")

        self.collector.start("sustained", n + 64, on_count)
        source = MemoryReplay(self.frames, live=False, limit=n)
        bare_fps = self.bare_fps
        timeout = max(60.0, 20.0 * n / bare_fps + 60.0) if bare_fps > 0 else 3600.0
        self.say(f"agent: sustained run, {n} frames at model pace (about {n / max(bare_fps, 1e-9):.0f} s or more)")
        t0 = time.perf_counter()
        agent = self.run_agent("sustained", source, exit_at_end=True, duration_s=timeout)
        wall = time.perf_counter() - t0
        scored = int(agent.registry.get_sample_value("fod_frames_scored_total", {"camera": "sustained"}) or 0)
        self.collector.wait_settled(scored)
        rows = self.collector.rows()
        skip = min(s.warmup_frames, max(0, len(rows) - 2))
        out: dict[str, Any] = {
            "frames_sent": source.count,
            "frames_scored": scored,
            "received": self.collector.count,
            "lost": max(0, scored - self.collector.count),
            "dropped_by_agent_link": _dropped_results(agent),
            "fps": scored_per_s(rows, skip),
            "wall_s": round(wall, 2),
            **{k: v for k, v in latency_stats(rows, skip).items() if k != "received"},
        }
        out["note"] = "at saturation: each frame waits in the slot while the previous one is scored"
        self.memory = _memory_report(samples, s.first_frames, n)
        return out

    def live(self, camera: str, factor: float, sustained_fps: float, *, stop_on_results: bool) -> dict[str, Any]:
        """A live source at ``factor`` x the sustained FPS (newest-frame policy)."""
        s = self.settings
        fps = max(0.5, factor * sustained_fps)
        n = s.frames
        holder: dict[str, Agent] = {}

        def stop(reason: str) -> None:
            agent = holder.get("agent")
            if agent is not None:
                agent.request_stop(reason)

        def on_count(count: int) -> None:
            if stop_on_results and count == n + s.warmup_frames:
                stop(f"{count} results received")

        source = MemoryReplay(
            self.frames,
            live=True,
            fps=fps,
            limit=None if stop_on_results else n,
            on_limit=None if stop_on_results else (lambda: stop(f"{n} frames captured")),
        )
        expected = n + s.warmup_frames if stop_on_results else n
        self.collector.start(camera, expected + 64, on_count)
        duration = 3.0 * expected / fps + 30.0
        self.say(f"agent: {camera} run, source at {fps:.1f} fps ({factor}x), {n} frames (about {expected / fps:.0f} s)")
        agent = Agent(
            self.config(camera, exit_at_end=False, duration_s=duration), sources={camera: source}, model=self.model
        )
        holder["agent"] = agent
        asyncio.run(agent.run())
        scored = int(agent.registry.get_sample_value("fod_frames_scored_total", {"camera": camera}) or 0)
        self.collector.wait_settled(scored)
        status = agent.cameras[camera].worker.status()
        rows = self.collector.rows()[:expected]  # results of frames in flight at the stop are not counted
        skip = min(s.warmup_frames, max(0, len(rows) - 2))
        span = (source.last_read or 0.0) - (source.first_read or 0.0)
        out: dict[str, Any] = {
            "source_factor": factor,
            "source_fps_target": round(fps, 2),
            "source_fps": round((source.count - 1) / span, 2) if span > 0 else None,
            "frames_captured": status.frames_captured,
            "frames_dropped": status.frames_dropped,
            "frames_scored": scored,
            "drop_fraction": (
                round(status.frames_dropped / status.frames_captured, 4) if status.frames_captured else None
            ),
            "scored_fps": scored_per_s(rows, skip),
            "lost": max(0, scored - self.collector.count),
            "dropped_by_agent_link": _dropped_results(agent),
            **latency_stats(rows, skip),
        }
        used = rows[skip:]
        if len(used):
            age = used[:, CAPTURE] + used[:, PREPROCESS]
            out.update(
                age_mean_ms=round(float(age.mean()), 3),
                age_p95_ms=percentile_ms(age, 95),
                age_max_ms=round(float(age.max()), 3),
            )
        return out


def _dropped_results(agent: Agent) -> int:
    """Result messages the agent's MQTT link dropped (``fod_mqtt_messages_dropped_total{kind="result"}``)."""
    total = 0.0
    for metric in agent.registry.collect():
        for sample in metric.samples:
            if sample.name == "fod_mqtt_messages_dropped_total" and sample.labels.get("kind") == "result":
                total += sample.value
    return int(total)


def _memory_report(samples: list[tuple[int, float | None]], first: int, last: int) -> dict[str, Any]:
    """RSS at ``first`` frames, at the end, the growth, and the growth over the second half of the run."""
    known = sorted((n, mib) for n, mib in samples if mib is not None)
    by_n = dict(known)
    rss_first = by_n.get(min(first, last))
    end_n, rss_last = known[-1] if known else (None, None)
    half = [mib for n, mib in known if n >= last // 2]
    return {
        "method": "VmRSS of this process (agent + benchmark subscriber) from /proc/self/status",
        "first_frames": min(first, last),
        "last_frames": end_n,
        "rss_first_mib": rss_first,
        "rss_last_mib": rss_last,
        "growth_mib": round(rss_last - rss_first, 1) if rss_first is not None and rss_last is not None else None,
        "growth_second_half_mib": round(half[-1] - half[0], 1) if len(half) >= 2 else None,
        "peak_rss_mib": peak_rss_mib(),
        "samples": [[n, mib] for n, mib in known],
    }


@contextlib.contextmanager
def _broker(url: str | None, say: Callable[[str], None]) -> Iterator[tuple[str, str]]:
    """Yield ``(kind, url)`` of the broker to use: ``url``, else mosquitto (or amqtt) on a free port."""
    if url is not None:
        yield "given", url
        return
    from fod_tools.demo.broker import ensure_broker

    stack = contextlib.ExitStack()
    with stack:
        info = None
        problems = []
        for prefer in ("mosquitto", "amqtt"):
            try:
                info = stack.enter_context(ensure_broker("127.0.0.1", 0, prefer=prefer))  # type: ignore[arg-type]
                break
            except BrokerError as exc:
                problems.append(str(exc))
        if info is None:
            raise BrokerError("no MQTT broker for the benchmark: " + "; ".join(problems) + "; or pass --broker URL")
        say(f"agent: {info.kind} broker on {info.url}")
        yield info.kind, info.url


@contextlib.contextmanager
def _quiet_agent_logs(quiet: bool) -> Iterator[None]:
    logger = logging.getLogger("agent")
    old = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def bench_agent(
    package_dir: str | Path,
    settings: AgentBenchSettings | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark the agent end to end (see the module docstring for the runs).

    Args:
        package_dir: the model package folder (or a TensorRT engine inside one).
        settings: what to run; None = :class:`AgentBenchSettings` defaults.
        progress: called with one-line status messages (None = silent).

    Returns:
        A JSON-ready dict: ``backend``, ``precision``, ``backend_reason``, ``model_file``, ``source``,
        ``broker``, ``threshold``, ``bare_backend``, ``throughput_ratio``, ``sustained``, ``latency``,
        ``overload``, ``memory``, ``notes``.

    Raises:
        AgentError: the package cannot be loaded, no broker can be reached or started, or a run failed.
    """
    s = settings or AgentBenchSettings()
    say = progress or (lambda _msg: None)
    if min(s.frames, s.long_frames, s.pool_size) < 1:
        raise AgentError("agent benchmark: frames, long_frames and pool_size must be >= 1")
    notes: list[str] = []
    if s.source_dir is not None:
        frames = folder_frames(s.source_dir, s.pool_size)
        source_info: dict[str, Any] = {"kind": "folder (decoded once, cycled from memory)", "path": str(s.source_dir)}
    else:
        frames = synthetic_frames(s.pool_size, s.frame_size)
        source_info = {"kind": "synthetic conveyor (cycled from memory)", "path": None}
    source_info["frame_size"] = list(frames[0].shape[:2])
    source_info["pool_frames"] = len(frames)

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fod-bench-")))
        stack.enter_context(_quiet_agent_logs(s.quiet))
        broker_kind, broker_url = stack.enter_context(_broker(s.broker, say))
        if broker_kind == "amqtt":
            notes.append("the embedded amqtt broker runs in this process and competes for the CPU and the GIL")
        tag = uuid.uuid4().hex[:8]
        overrides: dict[str, Any] = {
            "agent_id": f"fod-bench-{tag}",
            "cameras.0.source": "memory",
            "model.path": str(package_dir),
            "model.backend": s.backend,
            "model.precision": s.precision,
            "mqtt.topic_root": f"fodbench/{tag}",
            "mqtt.outbox_dir": str(workdir / "outbox"),
            "http.port": 0,
            "snapshots.enabled": False,
            "snapshots.dir": str(workdir / "snapshots"),
            "pipeline.broker_wait_s": 10.0,
        }
        if s.threads is not None:
            overrides["model.onnx_threads"] = s.threads
        provisional = load_config(None, {**overrides, "model.threshold": 1.0})
        base = apply_broker(provisional, broker_url)
        say(f"agent: loading {package_dir} ({s.backend}, {s.precision})")
        model = load_model(base.model)
        stack.callback(model.close)
        threshold_info = _set_threshold(model, base, frames, notes)
        if not threshold_info["from_package"]:
            base = base.model_copy(
                update={"model": base.model.model_copy(update={"threshold": threshold_info["image_threshold"]})}
            )
        else:
            base = base.model_copy(update={"model": base.model.model_copy(update={"threshold": None})})
        collector = ResultCollector(base.mqtt, base.mqtt.topic_root)
        stack.callback(collector.close)
        bench = _Bench(s, base, model, collector, frames, say)

        say(f"agent: bare backend, batch 1, {max(20, min(s.bare_repeats, s.long_frames))} calls")
        bare_before = bench.bare()
        bench.bare_fps = bare_before["frames_per_s"]
        sustained = bench.sustained()
        bare_after = bench.bare()
        bare_fps = round((bare_before["frames_per_s"] + bare_after["frames_per_s"]) / 2, 2)
        if not math.isfinite(sustained["fps"]):
            raise AgentError("agent benchmark: the sustained run produced fewer than 2 results; see the agent log")
        latency = bench.live("latency", s.latency_factor, sustained["fps"], stop_on_results=True)
        overload = bench.live("overload", s.overload_factor, sustained["fps"], stop_on_results=False)
        ratio = round(sustained["fps"] / bare_fps, 3) if bare_fps > 0 else None
        scored_fps = overload.get("scored_fps")
        ratio_overload = (
            round(scored_fps / bare_fps, 3) if bare_fps > 0 and scored_fps and math.isfinite(scored_fps) else None
        )
        if overload.get("source_fps") and overload["source_fps"] < 1.2 * sustained["fps"]:
            notes.append(
                f"the overload source reached only {overload['source_fps']} fps of the {overload['source_fps_target']} "
                "asked: the capture thread could not outrun the model on this machine"
            )
        for name, part in (("sustained", sustained), ("latency", latency), ("overload", overload)):
            if part.get("lost"):
                notes.append(
                    f"{name}: {part['lost']} QoS 0 results scored but not received ({part['dropped_by_agent_link']} "
                    "dropped by the agent's MQTT link while disconnected, the rest by the broker or a client queue)"
                )
        if ratio is not None and ratio < 0.9:
            notes.append(
                "agent / bare < 0.9: with a model this fast the per-frame work around inference (resize, decision, "
                "JSON, MQTT) weighs more; compare the stage means"
                if bare_fps > 200
                else "agent / bare < 0.9: see the stage means and the machine load"
            )
        return {
            "backend": model.backend,
            "precision": s.precision,
            "backend_reason": model.reason,
            "model_file": str(model.model_file),
            "rois": 1,
            "source": source_info,
            "broker": {"kind": broker_kind, "url": broker_url},
            "threshold": threshold_info,
            "bare_backend": {
                "backend": model.backend,
                "batch": 1,
                "frames_per_s": bare_fps,
                "before": bare_before,
                "after": bare_after,
            },
            "throughput_ratio": ratio,
            "throughput_ratio_overload": ratio_overload,
            "sustained": sustained,
            "latency": latency,
            "overload": overload,
            "memory": bench.memory,
            "notes": notes,
        }
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns


def _set_threshold(
    model: LoadedModel, config: AgentConfig, frames: list[np.ndarray], notes: list[str]
) -> dict[str, Any]:
    """Use the package's calibration; an uncalibrated package gets a threshold above every pool score (all OK)."""
    package_calibration = model.package.manifest.calibration
    if package_calibration is not None:
        model.calibration = package_calibration
        return {"from_package": True, "image_threshold": package_calibration.image_threshold}
    batch = np.stack([to_model_input(f, model.image_size, source="bench frame") for f in frames])
    scores = np.concatenate([model.runner.infer(batch[i : i + 8]).score for i in range(0, len(batch), 8)])
    threshold = float(max(1.5 * float(np.max(scores)), 1e-3))
    cal_config = config.model.model_copy(update={"threshold": threshold})
    model.calibration, _ = effective_calibration(model.package, cal_config)
    notes.append(
        f"the package is not calibrated: threshold {threshold:.4g} (1.5 x the highest pool score), so every frame is "
        "OK and no mask/overlay images are rendered"
    )
    return {"from_package": False, "image_threshold": threshold}
