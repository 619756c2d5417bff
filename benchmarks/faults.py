"""Fault-injection benchmark of issue 14: alarms raised, stored, received, lost, duplicated; time to unhealthy.

Runs the real agent (toy model package, a switchable synthetic conveyor) against a real mosquitto on
loopback and injects, one scenario at a time:

* ``disk_full`` (item 2): the outbox's file system (a 2 MB tmpfs; needs root, else skipped) is filled
  while defects come and go, then freed;
* ``frozen_disk`` (item 4): another process holds the outbox database locked for a few seconds;
* ``damaged_row`` (item 3): garbage is written into one stored alarm while the broker is down;
* ``outbox_lost`` (item 6): the outbox is deleted between two runs;
* ``blind`` (item 1): every inference fails;
* ``slow_uplink`` (item 5): the agent talks to the broker through a TCP proxy throttled to 30 kB/s while
  it publishes an overlay image per frame; alarm latency is capture time to receipt.

Counting: *raised* = transitions the agent decided (``fod_alarm_transitions_total`` plus failed
writes never taken are not raised), *stored* = alarms given an ``alarm_id``, *received* = distinct
``alarm_id`` seen by a subscriber, *lost* = stored and never received (must be 0), *duplicated* =
deliveries of an already seen ``alarm_id`` (at-least-once). Prints a Markdown table; ``--json OUT``
writes the numbers.

Usage::

    python benchmarks/faults.py [--cycles 20] [--json faults.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.backends import LoadedModel, effective_calibration  # noqa: E402
from agent.config import ModelConfig, load_config  # noqa: E402
from agent.outbox import DB_NAME  # noqa: E402
from agent.pipeline import Agent  # noqa: E402
from fod.package import ModelPackage  # noqa: E402
from fod.runner import Runner  # noqa: E402
from fod_tools.demo.broker import MosquittoProcess, free_port  # noqa: E402


class Conveyor:
    """Frames at model pace with a defect the benchmark switches (toy score = blob / 128)."""

    is_live = False

    def __init__(self) -> None:
        self.defect = False
        self.last_id = 0

    def read(self) -> tuple[bool, Any]:
        time.sleep(0.01)
        self.last_id += 1
        image = np.full((96, 128, 3), 128, np.uint8)
        if self.defect:
            image[40:56, 50:66] = 224
        return True, image

    def release(self) -> None:
        pass


class Alarms:
    """Subscriber that records every alarm delivery and its receipt time."""

    def __init__(self, port: int, root: str) -> None:
        self.seen: list[tuple[dict[str, Any], float]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{time.monotonic_ns()}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{root}/+/alarm", qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.payload:
            with self._lock:
                self.seen.append((json.loads(msg.payload), time.time()))

    def ids(self) -> list[str]:
        with self._lock:
            return [m["alarm_id"] for m, _ in self.seen if m.get("alarm_id")]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Throttle:
    """A TCP proxy that forwards at most ``rate_bps`` bytes/s in each direction (a slow uplink)."""

    def __init__(self, target_port: int, rate_bps: int) -> None:
        self.port = free_port("127.0.0.1")
        self.target = target_port
        self.rate = rate_bps
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # a link, not a bufferbloat queue
        self._server.bind(("127.0.0.1", self.port))
        self._server.listen()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        chunk = max(1, self.rate // 20)
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                data = src.recv(chunk)
                if not data:
                    break
                dst.sendall(data)
                time.sleep(len(data) / self.rate)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._server.close()


class FailingRunner(Runner):
    """Every inference fails (a package whose input does not match the graph)."""

    name = "failing"

    def __init__(self, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.image_size = image_size

    def _activate_impl(self) -> None:
        pass

    def _infer_impl(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise ValueError("input shape does not match the graph")

    def _deactivate_impl(self) -> None:
        pass


class Run:
    """One agent in a background thread with its conveyor."""

    def __init__(self, work: Path, broker_port: int, package: Path, **overrides: Any) -> None:
        root = f"bench/{work.name}"
        self.http_port = free_port("127.0.0.1")
        settings: dict[str, Any] = {
            "agent_id": "bench",
            "cameras.0.source": "0",
            "model.path": str(package),
            "model.threshold": 0.5,
            "mqtt.host": "127.0.0.1",
            "mqtt.port": broker_port,
            "mqtt.topic_root": root,
            "mqtt.outbox_dir": str(work / "outbox"),
            "mqtt.reconnect_min_s": 0.05,
            "mqtt.reconnect_max_s": 0.5,
            "http.port": self.http_port,
            "snapshots.enabled": False,
            "decision.debounce_n": 1,
            "decision.debounce_m": 1,
            "pipeline.health_window_s": 1.0,
            "pipeline.store_stall_s": 1.0,
            "pipeline.broker_wait_s": 0.5,
        }
        model = overrides.pop("model", None)
        settings.update(overrides)
        self.conveyor = Conveyor()
        self.agent = Agent(load_config(None, settings), sources={"cam0": self.conveyor}, model=model)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        if not self.agent.started.wait(30):
            raise RuntimeError(f"agent did not start: {self.error}")

    def _main(self) -> None:
        try:
            asyncio.run(self.agent.run())
        except BaseException as exc:
            self.error = exc

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=5) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return False

    def wait_problem(self, text: str, timeout_s: float = 30.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            _, details = self.agent.health()
            if any(text in p for p in details["problems"]):
                return time.monotonic() - t0
            time.sleep(0.05)
        return float("nan")

    def wait_health(self, want: bool, timeout_s: float = 30.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.healthy() == want:
                return time.monotonic() - t0
            time.sleep(0.05)
        return float("nan")

    def toggle(self, cycles: int, period_s: float = 0.3) -> None:
        for _ in range(cycles):
            self.conveyor.defect = not self.conveyor.defect
            time.sleep(period_s)
        self.conveyor.defect = False
        time.sleep(period_s)

    def stored(self) -> int:
        return int(self.agent.metrics.value("fod_alarm_transitions_total"))

    def stop(self) -> None:
        self.agent.request_stop("benchmark")
        self.thread.join(60)


def tally(name: str, stored: int, alarms: Alarms, extra: dict[str, Any]) -> dict[str, Any]:
    ids = alarms.ids()
    unique = set(ids)
    return {
        "scenario": name,
        "stored": stored,
        "received": len(unique),
        "lost": max(0, stored - len(unique)),
        "duplicated": len(ids) - len(unique),
        **extra,
    }


def wait_received(alarms: Alarms, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(set(alarms.ids())) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def scenario_disk_full(work: Path, port: int, package: Path, cycles: int) -> dict[str, Any]:
    mnt = work / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        return {"scenario": "disk_full", "skipped": "cannot mount a tmpfs (needs root)"}
    try:
        alarms = Alarms(port, f"bench/{work.name}")
        run = Run(work, port, package, **{"mqtt.outbox_dir": str(mnt / "outbox")})
        run.wait_health(True)
        run.toggle(cycles // 2)
        filler = mnt / "filler"
        with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        t0 = time.monotonic()
        run.conveyor.defect = True
        to_unhealthy = run.wait_problem("alarm store failing")
        run.toggle(cycles // 2)
        failures = run.agent.metrics.value("fod_alarm_store_failures_total")
        filler.unlink()
        run.conveyor.defect = False
        run.wait_health(True)
        run.toggle(cycles // 2)
        wait_received(alarms, run.stored())
        stored = run.stored()
        run.stop()
        alarms.close()
        return tally("disk_full", stored, alarms, {"time_to_unhealthy_s": round(to_unhealthy, 2),
                                                   "failed_writes_retried": int(failures),
                                                   "fault_s": round(time.monotonic() - t0, 1)})
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def scenario_frozen_disk(work: Path, port: int, package: Path, cycles: int) -> dict[str, Any]:
    alarms = Alarms(port, f"bench/{work.name}")
    run = Run(work, port, package)
    run.wait_health(True)
    holder = sqlite3.connect(work / "outbox" / DB_NAME, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    scored0 = run.agent.metrics.value("fod_frames_scored_total")
    t0 = time.monotonic()
    run.conveyor.defect = True
    to_unhealthy = run.wait_problem("alarm store stuck")
    time.sleep(3.0)
    scored_fps = (run.agent.metrics.value("fod_frames_scored_total") - scored0) / (time.monotonic() - t0)
    holder.execute("ROLLBACK")
    holder.close()
    run.toggle(cycles)
    wait_received(alarms, run.stored())
    stored = run.stored()
    run.stop()
    alarms.close()
    return tally("frozen_disk", stored, alarms, {"time_to_unhealthy_s": round(to_unhealthy, 2),
                                                 "scored_fps_while_frozen": round(scored_fps, 1)})


def scenario_damaged_row(work: Path, broker: MosquittoProcess, package: Path, cycles: int) -> dict[str, Any]:
    broker.stop()
    run = Run(work, broker.port, package)
    run.toggle(cycles)
    deadline = time.monotonic() + 30
    while (run.agent.link is None or run.agent.link.outbox_depth < run.stored()) and time.monotonic() < deadline:
        time.sleep(0.05)
    stored = run.stored()
    db = sqlite3.connect(work / "outbox" / DB_NAME)
    db.execute("UPDATE outbox SET topic = CAST(X'FFFE00' AS TEXT) WHERE seq = 2")
    db.commit()
    db.close()
    broker.start()
    alarms = Alarms(broker.port, f"bench/{work.name}")
    wait_received(alarms, stored - 1)
    dead = run.agent.metrics.value("fod_alarm_outbox_dead_letter_total")
    run.stop()
    alarms.close()
    row = tally("damaged_row", stored, alarms, {"dead_lettered": int(dead)})
    row["lost"] = max(0, stored - row["received"] - int(dead))  # a dead-lettered alarm is accounted, not lost
    return row


def scenario_outbox_lost(work: Path, port: int, package: Path, cycles: int) -> dict[str, Any]:
    alarms = Alarms(port, f"bench/{work.name}")
    stored = 0
    for _ in range(2):
        run = Run(work, port, package)
        run.wait_health(True)
        run.toggle(cycles // 2)
        wait_received(alarms, stored + run.stored())
        stored += run.stored()
        run.stop()
        shutil.rmtree(work / "outbox")  # lost or replaced storage: numbering restarts under a new epoch
    time.sleep(0.5)
    alarms.close()
    seqs = [m["alarm_seq"] for m, _ in alarms.seen]
    return tally("outbox_lost", stored, alarms, {"alarm_seq_repeats": len(seqs) - len(set(seqs))})


def scenario_blind(work: Path, port: int, package: Path) -> dict[str, Any]:
    pkg = ModelPackage(package)
    calibration, calibrated = effective_calibration(pkg, ModelConfig(threshold=0.5))
    runner = FailingRunner(pkg.image_size)
    runner.activate()
    model = LoadedModel(runner, pkg, "failing", "bench", package / "model.onnx", calibration, calibrated)
    run = Run(work, port, package, model=model)  # returns once the agent runs (and fails every frame)
    to_unhealthy = run.wait_problem("inference failed")  # window 1 s
    run.stop()
    return {"scenario": "blind", "time_to_unhealthy_s": round(to_unhealthy, 2)}


def scenario_slow_uplink(work: Path, port: int, package: Path, cycles: int) -> dict[str, Any]:
    throttle = Throttle(port, 30_000)
    alarms = Alarms(port, f"bench/{work.name}")
    run = Run(work, throttle.port, package, **{"mqtt.images": "all", "mqtt.image_min_interval_s": 0.0,
                                                  "pipeline.broker_wait_s": 5.0})
    run.toggle(cycles, period_s=1.0)
    wait_received(alarms, run.stored(), timeout_s=120)
    stored = run.stored()
    link = run.agent.link
    dropped = 0.0
    if link is not None:
        for kind in ("mask", "overlay", "result"):
            for reason in ("backlog", "alarm_first"):
                dropped += run.agent.metrics.value("fod_mqtt_messages_dropped_total", {"kind": kind, "reason": reason})
    run.stop()
    throttle.close()
    alarms.close()
    first: dict[str, float] = {}
    for msg, at in alarms.seen:
        first.setdefault(msg["alarm_id"], at - msg["ts"])
    lat = np.array(sorted(first.values())) if first else np.array([float("nan")])
    return tally("slow_uplink", stored, alarms, {"alarm_latency_p50_s": round(float(np.percentile(lat, 50)), 2),
                                                 "alarm_latency_p99_s": round(float(np.percentile(lat, 99)), 2),
                                                 "images_results_dropped": int(dropped)})


def main() -> int:
    """Run every scenario and print the table; exit 1 when an alarm was lost."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20, help="defect on/off switches per scenario")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args()
    from tests.toy_package import make_toy_package

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        package = make_toy_package(base / "toy")
        broker = MosquittoProcess(base / "broker")
        broker.start()
        try:
            for name, fn in (
                ("disk_full", lambda w: scenario_disk_full(w, broker.port, package, args.cycles)),
                ("frozen_disk", lambda w: scenario_frozen_disk(w, broker.port, package, args.cycles)),
                ("damaged_row", lambda w: scenario_damaged_row(w, broker, package, args.cycles)),
                ("outbox_lost", lambda w: scenario_outbox_lost(w, broker.port, package, args.cycles)),
                ("blind", lambda w: scenario_blind(w, broker.port, package)),
                ("slow_uplink", lambda w: scenario_slow_uplink(w, broker.port, package, max(4, args.cycles // 4))),
            ):
                work = base / name
                work.mkdir()
                t0 = time.monotonic()
                row = fn(work)
                row["wall_s"] = round(time.monotonic() - t0, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            broker.stop()
    keys = ["scenario", "stored", "received", "lost", "duplicated"]
    print("\n| " + " | ".join(keys) + " | other |")
    print("|" + " --- |" * (len(keys) + 1))
    for row in rows:
        other = ", ".join(f"{k}={v}" for k, v in row.items() if k not in keys)
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + f" | {other} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any(row.get("lost", 0) for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
