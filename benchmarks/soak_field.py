"""Field soak of the agent: broker restarts, a stalled camera, memory and file descriptors over time.

Runs the real agent (in this process) on two live cameras at the highest input rate the model
allows, against a real mosquitto on loopback, for ``--duration-s`` (600 = the 10 minutes of issue 13):

* ``line``: a live source that alternates good and defective parts, so alarms toggle all the time;
* ``stall``: a live source that goes silent (its read() blocks, as a stalled stream does) once in the
  middle of the run and resumes later; the watchdog must report it ``stalled`` and reopen it;
* the broker is stopped and restarted ``--restarts`` times (persistence on, so the subscriber's
  session survives), evenly spread over the run.

A persistent QoS 1 subscriber counts alarms by ``alarm_seq``. At the end (after the agent's clean
stop flushed its outbox) it prints, and writes with ``--json``: alarms raised vs received (distinct
``alarm_seq``, duplicates allowed by at-least-once), missing sequence numbers, stalls seen on MQTT,
resident memory and open file descriptors sampled every ``--sample-s`` (first / last / max after the
warm-up), frames scored per camera.

    python benchmarks/soak_field.py --duration-s 600 --json soak.json            # toy model (no torch)
    python benchmarks/soak_field.py --model pkg/tile --duration-s 600             # a real package

Exit code 0 when every raised alarm was received and memory/fds stayed flat (growth below
``--rss-slack-mb`` / ``--fd-slack``), else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.config import load_config  # noqa: E402 (after the path set-up, run as a script)
from agent.pipeline import Agent  # noqa: E402
from fod_tools.demo.broker import MosquittoProcess  # noqa: E402

GREY = 128


def part(defect: bool, size: tuple[int, int] = (240, 320)) -> np.ndarray:
    """A grey frame, with a bright square when ``defect`` (toy model: score 0.75)."""
    image = np.full((*size, 3), GREY, np.uint8)
    if defect:
        image[100:140, 140:180] = GREY + 96
    return image


class Line:
    """Live source: 6 good frames, 6 defective, forever; as fast as the consumer can take them."""

    def __init__(self) -> None:
        self.n = 0
        self.frames = [part(False), part(True)]

    def read(self) -> tuple[bool, Any]:
        self.n += 1
        time.sleep(0.002)
        return True, self.frames[(self.n // 6) % 2]


class Stalling:
    """Live source that blocks in read() while ``stalled`` is set (a stream that went silent)."""

    def __init__(self, stalled: threading.Event, resumed: threading.Event) -> None:
        self.stalled = stalled
        self.resumed = resumed
        self.frame = part(False)

    def read(self) -> tuple[bool, Any]:
        if self.stalled.is_set():
            self.resumed.wait()
        time.sleep(0.02)
        return True, self.frame


class AlarmCounter:
    """Persistent QoS 1 subscriber: distinct alarm_seq received, and camera states seen."""

    def __init__(self, host: str, port: int, root: str) -> None:
        self.seqs: list[int] = []
        self.states: list[tuple[str, str]] = []
        self.root = root
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"soak-{uuid.uuid4().hex[:8]}", clean_session=False
        )
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.5)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure and not flags.session_present:
            client.subscribe([(f"{self.root}/+/alarm", 1), (f"{self.root}/+/state", 1)])

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return
        data = json.loads(message.payload)
        with self._lock:
            if message.topic.endswith("/alarm"):
                self.seqs.append(int(data["alarm_seq"]))
            else:
                self.states.append((data["camera"], data["state"]))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def rss_mb() -> float:
    """Resident memory of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    """Open file descriptors of this process."""
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model package (default: the toy package of the tests, no torch)")
    p.add_argument("--duration-s", type=float, default=600.0, help="length of the run, s")
    p.add_argument("--restarts", type=int, default=5, help="broker stop/start cycles during the run")
    p.add_argument("--broker-down-s", type=float, default=3.0, help="how long the broker stays down each time, s")
    p.add_argument("--stall-s", type=float, default=20.0, help="how long the stalling camera stays silent, s")
    p.add_argument("--sample-s", type=float, default=10.0, help="RSS / fd sampling period, s")
    p.add_argument("--rss-slack-mb", type=float, default=30.0, help="allowed RSS growth after warm-up, MB")
    p.add_argument("--fd-slack", type=int, default=8, help="allowed fd growth after warm-up")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="fod-soak-"))
    model = args.model
    if model is None:
        from tests.toy_package import calibrated_copy, make_toy_package

        model = calibrated_copy(make_toy_package(work / "toy"), work / "pkg", threshold=0.5)
    broker = MosquittoProcess(work / "mosquitto", persistence=True)
    broker.start()
    root = f"soak/{uuid.uuid4().hex[:6]}"
    counter = AlarmCounter(broker.host, broker.port, root)
    stalled, resumed = threading.Event(), threading.Event()
    config = load_config(
        None,
        {
            "agent_id": "soak",
            "cameras.0.name": "line",
            "cameras.1.name": "stall",
            "cameras.1.stale_after_s": 2.0,
            "cameras.1.reconnect_min_s": 0.2,
            "model.path": str(model),
            "mqtt.host": broker.host,
            "mqtt.port": broker.port,
            "mqtt.topic_root": root,
            "mqtt.reconnect_min_s": 0.1,
            "mqtt.reconnect_max_s": 1.0,
            "mqtt.images": "never",
            "state_dir": str(work / "state"),
            "snapshots.enabled": False,
            "http.port": 0,
            "decision.debounce_n": 1,
            "decision.debounce_m": 1,
            "duration_s": args.duration_s,
        },
    )
    agent = Agent(config, sources={"line": Line(), "stall": lambda: Stalling(stalled, resumed)})
    error: list[BaseException] = []

    def run_agent() -> None:
        try:
            asyncio.run(agent.run())
        except BaseException as exc:  # reported below
            error.append(exc)

    thread = threading.Thread(target=run_agent, name="soak-agent")
    start = time.monotonic()
    thread.start()
    if not agent.started.wait(60):
        print("agent did not start", error, file=sys.stderr)
        return 1
    restart_at = [start + args.duration_s * (i + 1) / (args.restarts + 1) for i in range(args.restarts)]
    stall_at = start + args.duration_s * 0.3
    samples: list[tuple[float, float, int]] = []
    next_sample = start
    while thread.is_alive():
        now = time.monotonic()
        if now >= next_sample:
            samples.append((round(now - start, 1), rss_mb(), open_fds()))
            next_sample += args.sample_s
        if restart_at and now >= restart_at[0]:
            restart_at.pop(0)
            broker.stop()
            time.sleep(args.broker_down_s)
            broker.start()
        if not stalled.is_set() and now >= stall_at:
            stalled.set()
        if stalled.is_set() and not resumed.is_set() and now >= stall_at + args.stall_s:
            resumed.set()
        thread.join(0.2)
    resumed.set()
    time.sleep(2.0)  # the subscriber drains what the stop flushed
    raised = int(sum(agent.metrics.value("fod_alarms_total", {"state": s}) for s in ("NG", "OK")))
    received = sorted(set(counter.seqs))
    missing = sorted(set(range(1, raised + 1)) - set(received)) if raised else []
    counter.close()
    broker.stop()
    warm = [s for s in samples if s[0] >= min(60.0, args.duration_s / 5)] or samples
    report = {
        "duration_s": args.duration_s,
        "broker_restarts": args.restarts,
        "stall_s": args.stall_s,
        "alarms_raised": raised,
        "alarms_received_distinct": len(received),
        "alarm_messages_received": len(counter.seqs),
        "alarms_missing": missing[:20],
        "stalled_states_seen": sum(1 for cam, st in counter.states if cam == "stall" and st == "stalled"),
        "frames_scored": {c: agent.metrics.value("fod_frames_scored_total", {"camera": c}) for c in ("line", "stall")},
        "mqtt_reconnects": agent.metrics.value("fod_mqtt_reconnects_total"),
        "rss_mb": {
            "first": round(warm[0][1], 1),
            "last": round(warm[-1][1], 1),
            "max": round(max(s[1] for s in warm), 1),
        },
        "open_fds": {"first": warm[0][2], "last": warm[-1][2], "max": max(s[2] for s in warm)},
        "samples": samples,
        "error": repr(error[0]) if error else None,
    }
    ok = (
        not error
        and raised > 0
        and not missing
        and report["stalled_states_seen"] >= 1
        and warm[-1][1] - warm[0][1] <= args.rss_slack_mb
        and warm[-1][2] - warm[0][2] <= args.fd_slack
    )
    report["ok"] = ok
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
