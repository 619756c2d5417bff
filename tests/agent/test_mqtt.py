"""MqttLink against a real mosquitto broker on a free loopback port.

Covers: online/offline status (clean stop and Last Will on a killed process), republishing retained
status and camera states after a broker restart, alarms raised while the broker is down at start
and during a restart (all delivered, in order), the outbox surviving a process restart, commands
(valid and malformed), result every k-th, image rate limit, metrics, password from the
environment and TLS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.publish as publish
import pytest

from agent.commands import CommandError, Pause, SetThreshold, sign_command
from agent.errors import BrokerError
from agent.mqtt.config import MqttConfig, MqttTlsConfig, validate_topic_level
from agent.mqtt.link import MqttLink
from agent.schemas import AlarmPayload, CameraStatePayload, LatencyMs, ResultPayload
from tests.agent.conftest import COMMAND_SECRET, COMMAND_SECRET_ENV, Mosquitto, Subscriber

REPO = Path(__file__).resolve().parents[2]


def wait_until(pred: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.01)


@pytest.fixture
def make_link(tmp_path, topic_root):
    links: list[MqttLink] = []

    def make(
        broker: Mosquitto, *, outbox: Path | None = None, on_command=None, agent_id="a1", **cfg
    ) -> MqttLink:
        fields = dict(
            host=broker.host,
            port=broker.port,
            topic_root=topic_root,
            reconnect_min_s=0.05,
            reconnect_max_s=0.2,
            keepalive_s=5,
            outbox_dir=outbox or tmp_path / f"outbox-{len(links)}",
            commands=True,
            command_secret_env=COMMAND_SECRET_ENV,
        )
        fields.update(cfg)
        link = MqttLink(MqttConfig.model_validate(fields), agent_id=agent_id, on_command=on_command)
        links.append(link)
        return link

    yield make
    for link in links:
        link.close(timeout_s=1.0)


def alarm(i: int, state: str = "NG") -> AlarmPayload:
    return AlarmPayload.model_validate(
        dict(
            camera="cam0",
            roi="full",
            state=state,
            previous="OK" if state == "NG" else "NG",
            ts=1000.0 + i,
            score=2.0,
            normalized_score=0.7,
            threshold=1.0,
            source_frame=f"f{i}.png",
        )
    )


def result(seq: int, roi: str = "full") -> ResultPayload:
    return ResultPayload(
        seq=seq,
        capture_ts=1000.0 + seq,
        camera="cam0",
        roi=roi,
        source_frame=seq,
        score=0.5,
        normalized_score=0.25,
        threshold=1.0,
        verdict="OK",
        latency_ms=LatencyMs(capture=1, preprocess=1, inference=1, postprocess=1, total=4),
    )


def camera_state(state: str = "connected", captured: int = 0) -> CameraStatePayload:
    return CameraStatePayload.model_validate(
        dict(
            camera="cam0",
            state=state,
            connected=state == "connected",
            fps=10.0,
            last_frame_age_s=0.1,
            frames_captured=captured,
            frames_dropped=0,
            reconnects=0,
        )
    )


def dedupe_seqs(sub: Subscriber, topic: str) -> list[int]:
    """alarm_seq values in arrival order, repeats of an already seen seq dropped (at-least-once)."""
    seen: list[int] = []
    for msg in sub.get(topic):
        seq = msg.json()["alarm_seq"]
        if not seen or seq > seen[-1]:
            seen.append(seq)
    return seen


def metric(link: MqttLink, name: str, **labels: str) -> float:
    value = link.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --- fixtures


def test_broker_fixture_restarts_on_same_port(mosquitto, subscriber, topic_root):
    sub = subscriber(mosquitto, f"{topic_root}/#")
    publish.single(f"{topic_root}/x", b"1", qos=1, hostname=mosquitto.host, port=mosquitto.port)
    assert sub.wait_for(f"{topic_root}/x", 1)[0].payload == b"1"
    port = mosquitto.port
    mosquitto.stop()
    mosquitto.start()
    assert mosquitto.port == port
    assert sub.subscribed.wait(5)  # the subscriber reconnected and re-subscribed
    publish.single(f"{topic_root}/x", b"2", qos=1, hostname=mosquitto.host, port=mosquitto.port)
    assert [m.payload for m in sub.wait_for(f"{topic_root}/x", 2)] == [b"1", b"2"]


# --- status


def test_online_status_with_info_and_clean_stop_publishes_offline(
    mosquitto, subscriber, topic_root, make_link
):
    sub = subscriber(mosquitto, f"{topic_root}/#")
    link = make_link(mosquitto, agent_id="agent-7")
    link.set_status_info(backend="onnxruntime", model="toy")
    link.start()
    assert link.connected.wait(5)
    assert metric(link, "fod_mqtt_connected") == 1
    online = sub.wait_for(f"{topic_root}/status", 1)[0].json()
    assert online["state"] == "online"
    assert online["agent_id"] == "agent-7"
    assert online["backend"] == "onnxruntime"
    assert online["model"] == "toy"
    assert online["schema_version"] == 1
    assert online["version"]

    link.set_status_info(model="toy-v2")  # republished at once
    assert sub.wait_for(f"{topic_root}/status", 2)[-1].json()["model"] == "toy-v2"

    link.stop(timeout_s=2.0)
    assert not link.connected.is_set()
    assert metric(link, "fod_mqtt_connected") == 0
    assert sub.wait_for(f"{topic_root}/status", 3)[-1].json()["state"] == "offline"
    # retained: a client that subscribes later sees offline
    late = subscriber(mosquitto, f"{topic_root}/status")
    msg = late.wait_for(f"{topic_root}/status", 1)[0]
    assert msg.retain
    assert msg.json()["state"] == "offline"


LINK_SCRIPT = """
import sys, time
from pathlib import Path
from agent.mqtt.config import MqttConfig
from agent.mqtt.link import MqttLink
cfg = MqttConfig(
    host="127.0.0.1", port=int(sys.argv[1]), topic_root=sys.argv[2],
    outbox_dir=Path(sys.argv[3]), keepalive_s=5,
)
link = MqttLink(cfg, agent_id="crashy")
link.start()
if not link.connected.wait(10):
    sys.exit(3)
print("ready", flush=True)
time.sleep(60)
"""


def test_last_will_marks_a_killed_agent_offline(mosquitto, subscriber, topic_root, tmp_path):
    """SIGKILL the process that holds the link: the broker publishes the retained offline Last Will."""
    sub = subscriber(mosquitto, f"{topic_root}/status")
    proc = subprocess.Popen(
        [sys.executable, "-c", LINK_SCRIPT, str(mosquitto.port), topic_root, str(tmp_path / "ob")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"ready", proc.stderr.read() if proc.stderr else b""
        assert sub.wait_for(f"{topic_root}/status", 1)[0].json()["state"] == "online"
        proc.kill()  # no DISCONNECT packet: the broker sees the socket close
        proc.wait(5)
        will = sub.wait_for(f"{topic_root}/status", 2)[-1].json()
        assert will["state"] == "offline"
        assert will["agent_id"] == "crashy"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
    late = subscriber(mosquitto, f"{topic_root}/status")
    msg = late.wait_for(f"{topic_root}/status", 1)[0]
    assert msg.retain
    assert msg.json()["state"] == "offline"


STATE_SCRIPT = """
import sys, time
from pathlib import Path
from agent.mqtt.config import MqttConfig
from agent.mqtt.link import MqttLink
from agent.schemas import CameraStatePayload
cfg = MqttConfig(
    host="127.0.0.1", port=int(sys.argv[1]), topic_root=sys.argv[2],
    outbox_dir=Path(sys.argv[3]), keepalive_s=5, protocol="5", state_expiry_s=float(sys.argv[4]),
)
link = MqttLink(cfg, agent_id="crashy")
link.start()
if not link.connected.wait(10):
    sys.exit(3)
link.publish_camera_state("cam0", CameraStatePayload(
    camera="cam0", state="connected", connected=True, fps=10.0, last_frame_age_s=0.1,
    frames_captured=1, frames_dropped=0, reconnects=0))
print("ready", flush=True)
time.sleep(60)
"""


def test_a_killed_agents_camera_state_expires_with_mqtt5(mosquitto, subscriber, topic_root, tmp_path):
    """Issue 14 item 12: the retained ``connected: true`` must not outlive a crashed agent.

    With MQTT 5 the state carries a Message Expiry Interval and is renewed while the agent lives: a
    late subscriber sees it after more than one interval while the agent runs, and not after it is
    killed (the broker dropped it).
    """
    expiry = 2.0
    proc = subprocess.Popen(
        [sys.executable, "-c", STATE_SCRIPT, str(mosquitto.port), topic_root, str(tmp_path / "ob"), str(expiry)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    topic = f"{topic_root}/cam0/state"
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"ready", proc.stderr.read() if proc.stderr else b""
        time.sleep(2.5 * expiry)  # longer than the expiry: only the renewals keep it
        alive = subscriber(mosquitto, topic)
        msg = alive.wait_for(topic, 1)[0]
        assert msg.retain
        assert msg.json()["connected"] is True
        proc.kill()  # a crash: no DISCONNECT, no clean-stop state
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
    time.sleep(expiry + 1.0)
    late = subscriber(mosquitto, f"{topic_root}/#")
    status = late.wait_for(f"{topic_root}/status", 1)[0]  # the Last Will: proof the subscription is live
    assert status.json()["state"] == "offline"
    time.sleep(0.3)
    assert late.get(topic) == []


def test_state_expiry_counts_in_the_packet_size():
    """A Message Expiry Interval adds 5 property bytes to an MQTT 5 PUBLISH."""
    from agent.mqtt.size import publish_packet_bytes

    plain = publish_packet_bytes("r/cam0/state", 100, 1, v5=True)
    assert publish_packet_bytes("r/cam0/state", 100, 1, v5=True, property_bytes=5) == plain + 5
    assert publish_packet_bytes("r/cam0/state", 100, 1, v5=False) == plain - 1


def test_broker_restart_republishes_status_and_camera_states(mosquitto, subscriber, topic_root, make_link):
    """A broker without persistence forgets retained messages: the link must publish them again."""
    link = make_link(mosquitto)
    link.start()
    assert link.connected.wait(5)
    assert link.publish_camera_state("cam0", camera_state(captured=5))
    mosquitto.stop()
    wait_until(lambda: not link.connected.is_set(), what="link notices the outage")
    # a state published while disconnected is kept and sent on reconnection
    assert not link.publish_camera_state("cam0", camera_state("reconnecting", captured=9))
    mosquitto.start()
    wait_until(lambda: link.connected.is_set(), what="link reconnects")
    assert metric(link, "fod_mqtt_reconnects_total") == 1
    watcher = subscriber(mosquitto, f"{topic_root}/#")  # may subscribe before or after the republish
    watcher.wait_for(f"{topic_root}/cam0/state", 1)
    late = subscriber(mosquitto, f"{topic_root}/#")  # surely after it: sees the retained copies
    status = late.wait_for(f"{topic_root}/status", 1)[0]
    assert status.retain
    assert status.json()["state"] == "online"
    state = late.wait_for(f"{topic_root}/cam0/state", 1)[0]
    assert state.retain
    assert state.json()["state"] == "reconnecting"
    assert state.json()["frames_captured"] == 9


# --- alarms


def test_alarms_raised_while_broker_is_down_at_start_arrive_in_order(
    mosquitto_persistent, subscriber, topic_root, make_link
):
    broker = mosquitto_persistent
    sub = subscriber(broker, f"{topic_root}/#", persistent=True)  # session survives the broker restart
    broker.stop()
    link = make_link(broker)
    link.start()
    raised = [link.publish_alarm("cam0", alarm(i, "NG" if i % 2 else "OK")) for i in range(1, 8)]
    assert [a.alarm_seq for a in raised] == list(range(1, 8))
    assert link.outbox_depth == 7
    assert metric(link, "fod_alarm_outbox_depth") == 7
    assert not link.connected.is_set()
    broker.start()
    msgs = sub.wait_for(f"{topic_root}/cam0/alarm", 7, timeout_s=10)
    # no connection was broken after the first one: exactly once, in order, as raised
    assert [m.json() for m in msgs] == [a.model_dump(mode="json") for a in raised]
    wait_until(lambda: link.outbox_depth == 0, what="outbox drained")
    assert metric(link, "fod_mqtt_messages_published_total", kind="alarm") == 7
    assert metric(link, "fod_alarms_total", state="NG") == 4
    assert metric(link, "fod_alarms_total", state="OK") == 3
    # retained: the alarm topic holds the latest transition
    late = subscriber(broker, f"{topic_root}/cam0/alarm")
    assert late.wait_for(f"{topic_root}/cam0/alarm", 1)[0].json()["alarm_seq"] == 7


def test_alarms_survive_broker_restart_mid_run(mosquitto_persistent, subscriber, topic_root, make_link):
    broker = mosquitto_persistent
    sub = subscriber(broker, f"{topic_root}/#", persistent=True)
    link = make_link(broker)
    link.start()
    assert link.connected.wait(5)
    topic = f"{topic_root}/cam0/alarm"
    raised = [link.publish_alarm("cam0", alarm(i)) for i in range(1, 4)]
    sub.wait_for(topic, 3)
    broker.stop()
    raised += [link.publish_alarm("cam0", alarm(i)) for i in range(4, 8)]  # while the broker goes / is away
    broker.start()
    raised += [link.publish_alarm("cam0", alarm(i)) for i in range(8, 11)]  # around the reconnection
    sub.wait_until(topic, lambda ms: len({m.json()["alarm_seq"] for m in ms}) >= 10, timeout_s=10)
    # at-least-once: repeats of an already delivered alarm_seq are allowed, loss and reordering are not
    assert dedupe_seqs(sub, topic) == list(range(1, 11))
    first: dict[int, dict] = {}
    for msg in sub.get(topic):
        first.setdefault(msg.json()["alarm_seq"], msg.json())
    assert [first[a.alarm_seq] for a in raised] == [a.model_dump(mode="json") for a in raised]  # exactly as raised
    wait_until(lambda: link.outbox_depth == 0, what="outbox drained")
    assert metric(link, "fod_mqtt_reconnects_total") >= 1


def test_outbox_survives_process_restart(mosquitto, subscriber, topic_root, make_link, tmp_path):
    outbox = tmp_path / "shared-outbox"
    mosquitto.stop()
    first = make_link(mosquitto, outbox=outbox)
    first.start()
    for i in range(1, 4):
        first.publish_alarm("cam0", alarm(i))
    first.close(timeout_s=0.2)  # the broker never came: everything stays on disk
    assert first.outbox_depth == 3

    mosquitto.start()
    sub = subscriber(mosquitto, f"{topic_root}/#")
    second = make_link(mosquitto, outbox=outbox)
    assert second.outbox_depth == 3
    second.start()
    topic = f"{topic_root}/cam0/alarm"
    assert [m.json()["alarm_seq"] for m in sub.wait_for(topic, 3)] == [1, 2, 3]
    assert [m.json()["source_frame"] for m in sub.get(topic)] == ["f1.png", "f2.png", "f3.png"]
    # the numbering continues across the restart
    assert second.publish_alarm("cam0", alarm(4)).alarm_seq == 4
    assert sub.wait_for(topic, 4)[-1].json()["alarm_seq"] == 4
    wait_until(lambda: second.outbox_depth == 0, what="outbox drained")


def test_full_outbox_drops_oldest_and_counts(mosquitto, make_link, caplog):
    mosquitto.stop()
    link = make_link(mosquitto, outbox_max_messages=3)
    for i in range(1, 6):
        link.publish_alarm("cam0", alarm(i))
    assert link.outbox_depth == 3
    assert metric(link, "fod_alarm_outbox_dropped_total") == 2
    assert metric(link, "fod_alarms_total", state="NG") == 5
    assert "dropped the oldest undelivered alarm_seq=1" in caplog.text


def test_stop_flushes_pending_alarms(mosquitto, subscriber, topic_root, make_link):
    sub = subscriber(mosquitto, f"{topic_root}/#")
    link = make_link(mosquitto)
    link.start()
    assert link.connected.wait(5)
    for i in range(1, 51):
        link.publish_alarm("cam0", alarm(i))
    link.stop(timeout_s=5.0)
    assert link.outbox_depth == 0
    assert [m.json()["alarm_seq"] for m in sub.wait_for(f"{topic_root}/cam0/alarm", 50)] == list(range(1, 51))
    # offline comes after the alarms
    assert sub.wait_until(f"{topic_root}/status", lambda ms: bool(ms) and ms[-1].json()["state"] == "offline")


# --- results, images


def test_result_every_k(mosquitto, subscriber, topic_root, make_link):
    sub = subscriber(mosquitto, f"{topic_root}/#")
    link = make_link(mosquitto, result_every_k=3)
    link.start()
    assert link.connected.wait(5)
    sent = [link.publish_result("cam0", result(i, roi)) for i in range(10) for roi in ("left", "right")]
    assert sent == [i % 3 == 0 for i in range(10) for _ in range(2)]  # counted per camera and ROI
    msgs = sub.wait_for(f"{topic_root}/cam0/result", 8)
    assert [(m.json()["seq"], m.json()["roi"]) for m in msgs] == [
        (i, roi) for i in (0, 3, 6, 9) for roi in ("left", "right")
    ]
    assert all(not m.retain and m.qos == 0 for m in msgs)
    assert msgs[0].json()["latency_ms"]["total"] == 4
    assert metric(link, "fod_mqtt_messages_published_total", kind="result") == 8


def test_results_and_images_are_dropped_while_disconnected(mosquitto, make_link):
    mosquitto.stop()
    link = make_link(mosquitto)
    link.start()
    assert not link.publish_result("cam0", result(0))
    assert not link.image_wanted("cam0", "mask", "NG")
    assert not link.publish_image("cam0", "mask", b"png")
    assert metric(link, "fod_mqtt_messages_dropped_total", kind="result", reason="disconnected") == 1
    assert metric(link, "fod_mqtt_messages_dropped_total", kind="mask", reason="disconnected") == 1


def test_image_rate_limit_and_policy(mosquitto, subscriber, topic_root, make_link):
    sub = subscriber(mosquitto, f"{topic_root}/#")
    link = make_link(mosquitto, images="ng", image_min_interval_s=60.0)
    link.start()
    assert link.connected.wait(5)
    assert link.image_wanted("cam0", "mask", "NG")
    assert not link.image_wanted("cam0", "mask", "OK")  # images = "ng"
    assert link.publish_image("cam0", "mask", b"\x89PNG-1")
    assert not link.image_wanted("cam0", "mask", "NG")  # within the interval
    assert not link.publish_image("cam0", "mask", b"\x89PNG-2")
    assert not link.publish_image("cam0", "mask", b"\x89PNG-3")
    assert link.publish_image("cam0", "overlay", b"\xff\xd8JPEG")  # each kind has its own limit
    assert sub.wait_for(f"{topic_root}/cam0/overlay", 1)[0].payload == b"\xff\xd8JPEG"
    # the overlay was published after the dropped masks on the same connection: they would be here by now
    assert [m.payload for m in sub.get(f"{topic_root}/cam0/mask")] == [b"\x89PNG-1"]
    assert metric(link, "fod_mqtt_messages_dropped_total", kind="mask", reason="rate_limit") == 2
    with pytest.raises(ValueError, match="mask"):
        link.publish_image("cam0", "thumbnail", b"x")  # type: ignore[arg-type]


def test_images_never(mosquitto, make_link):
    link = make_link(mosquitto, images="never")
    link.start()
    assert link.connected.wait(5)
    assert not link.image_wanted("cam0", "overlay", "NG")
    assert not link.publish_image("cam0", "overlay", b"jpeg")


def test_camera_mismatch_and_bad_names_are_refused(mosquitto, make_link):
    link = make_link(mosquitto)
    with pytest.raises(ValueError, match="differs"):
        link.publish_alarm("cam1", alarm(1))
    with pytest.raises(ValueError, match="topic level"):
        link.publish_result("cam/0", result(0))
    assert link.outbox_depth == 0
    with pytest.raises(ValueError, match="topic level"):
        validate_topic_level("a+b")


# --- commands


class Recorder:
    def __init__(self, fail: Exception | None = None) -> None:
        self.commands: list[object] = []
        self.fail = fail

    def __call__(self, cmd):
        self.commands.append(cmd)
        if self.fail is not None:
            raise self.fail
        return {"applied": type(cmd).__name__}


def send(broker: Mosquitto, topic: str, payload: bytes, retain: bool = False, *, sign: bool = True) -> None:
    """Publish a command, signed with the test secret when the payload is a JSON object (or empty)."""
    if sign:
        try:
            data = json.loads(payload or b"{}")
        except ValueError:
            data = None
        if isinstance(data, dict):
            payload = json.dumps(sign_command(topic.rsplit("/", 1)[-1], data, COMMAND_SECRET)).encode()
    publish.single(topic, payload, qos=1, retain=retain, hostname=broker.host, port=broker.port)


def test_valid_command_calls_handler_and_replies(mosquitto, subscriber, topic_root, make_link):
    rec = Recorder()
    sub = subscriber(mosquitto, f"{topic_root}/#")
    link = make_link(mosquitto, on_command=rec)
    link.start()
    assert link.connected.wait(5)
    sub.wait_for(f"{topic_root}/status", 1)  # the link has subscribed before it publishes online
    send(
        mosquitto,
        f"{topic_root}/cmd/set_threshold",
        b'{"camera": "cam0", "threshold": 1.5, "request_id": "r1"}',
    )
    resp = sub.wait_for(f"{topic_root}/cmd/response", 1)[0].json()
    assert resp == {
        "schema_version": 1,
        "request_id": "r1",
        "command": "set_threshold",
        "ok": True,
        "error": None,
        "result": {"applied": "SetThreshold"},
    }
    assert rec.commands == [SetThreshold(camera="cam0", threshold=1.5, request_id="r1")]
    send(mosquitto, f"{topic_root}/cmd/pause", b"")
    assert sub.wait_for(f"{topic_root}/cmd/response", 2)[-1].json()["ok"] is True
    assert rec.commands[-1] == Pause()
    assert metric(link, "fod_mqtt_commands_total", result="ok") == 2


@pytest.mark.parametrize(
    ("name", "payload", "needle"),
    [
        ("set_threshold", b"{not json", "not valid UTF-8 JSON"),  # bad JSON
        ("launch", b"{}", "unknown command 'launch'"),  # unknown command
        (
            "set_threshold",
            b'{"camera": "cam0", "threshold": -2, "request_id": "r9"}',
            "threshold",
        ),  # out of range
        ("snapshot", b'{"camera": "cam0", "extra": 1}', "extra"),  # unknown key
    ],
)
def test_malformed_command_gets_error_reply_and_changes_nothing(
    mosquitto, subscriber, topic_root, make_link, name, payload, needle
):
    rec = Recorder()
    sub = subscriber(mosquitto, f"{topic_root}/#")
    link = make_link(mosquitto, on_command=rec)
    link.start()
    assert link.connected.wait(5)
    sub.wait_for(f"{topic_root}/status", 1)
    send(mosquitto, f"{topic_root}/cmd/{name}", payload)
    resp = sub.wait_for(f"{topic_root}/cmd/response", 1)[0].json()
    assert resp["ok"] is False
    assert resp["command"] == name
    assert needle in resp["error"]
    assert resp["result"] == {}
    if b"r9" in payload:
        assert resp["request_id"] == "r9"
    assert rec.commands == []  # the handler never saw it
    assert metric(link, "fod_mqtt_commands_total", result="error") == 1
    assert link.connected.is_set()  # and the link is still up


@pytest.mark.parametrize(
    ("fail", "needle"),
    [
        (CommandError("camera 'cam9' does not exist; cameras: cam0"), "cam9"),  # handler refuses
        (
            RuntimeError("boom"),
            "internal error while applying set_threshold: RuntimeError: boom",
        ),  # handler bug
    ],
)
def test_handler_errors_become_error_replies(mosquitto, subscriber, topic_root, make_link, fail, needle):
    rec = Recorder(fail=fail)
    sub = subscriber(mosquitto, f"{topic_root}/#")
    link = make_link(mosquitto, on_command=rec)
    link.start()
    assert link.connected.wait(5)
    sub.wait_for(f"{topic_root}/status", 1)
    send(
        mosquitto, f"{topic_root}/cmd/set_threshold", b'{"camera": "cam9", "threshold": 2, "request_id": "q"}'
    )
    resp = sub.wait_for(f"{topic_root}/cmd/response", 1)[0].json()
    assert resp["ok"] is False
    assert needle in resp["error"]
    assert resp["request_id"] == "q"
    # the network thread survived: a second command is still answered
    send(mosquitto, f"{topic_root}/cmd/pause", b"{}")
    assert len(sub.wait_for(f"{topic_root}/cmd/response", 2)) == 2


def test_slow_command_does_not_block_the_connection(mosquitto, subscriber, topic_root, make_link):
    """A handler that takes long (a model reload) runs off paho's network thread: alarms still flow."""
    release = threading.Event()
    entered = threading.Event()

    def slow(cmd):
        entered.set()
        assert release.wait(10)
        return {"reloaded": True}

    sub = subscriber(mosquitto, f"{topic_root}/#")
    link = make_link(mosquitto, on_command=slow)
    link.start()
    assert link.connected.wait(5)
    sub.wait_for(f"{topic_root}/status", 1)
    send(mosquitto, f"{topic_root}/cmd/reload_model", b"{}")
    assert entered.wait(5)
    link.publish_alarm("cam0", alarm(1))  # delivered while the handler is still busy
    assert sub.wait_for(f"{topic_root}/cam0/alarm", 1)[0].json()["alarm_seq"] == 1
    assert sub.get(f"{topic_root}/cmd/response") == []
    release.set()
    assert sub.wait_for(f"{topic_root}/cmd/response", 1)[0].json()["result"] == {"reloaded": True}


def test_retained_command_is_not_executed_and_no_handler_refuses(
    mosquitto, subscriber, topic_root, make_link
):
    rec = Recorder()
    send(
        mosquitto, f"{topic_root}/cmd/pause", b"{}", retain=True
    )  # left on the broker before the agent starts
    sub = subscriber(mosquitto, f"{topic_root}/cmd/response")
    link = make_link(mosquitto, on_command=rec)
    link.start()
    resp = sub.wait_for(f"{topic_root}/cmd/response", 1)[0].json()
    assert resp["ok"] is False
    assert "retained command" in resp["error"]
    assert rec.commands == []

    bare = make_link(mosquitto, agent_id="a2", topic_root=f"{topic_root}-2")
    sub2 = subscriber(mosquitto, f"{topic_root}-2/#")
    bare.start()
    assert bare.connected.wait(5)
    sub2.wait_for(f"{topic_root}-2/status", 1)
    send(mosquitto, f"{topic_root}-2/cmd/resume", b"{}")
    resp2 = sub2.wait_for(f"{topic_root}-2/cmd/response", 1)[0].json()
    assert resp2["ok"] is False
    assert "does not accept commands" in resp2["error"]


# --- config, auth, TLS


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"topic_root": "/fod/a"}, "topic_root"),  # leading slash
        ({"topic_root": "fod/+/a"}, "topic_root"),  # wildcard
        ({"topic_root": "fod//a"}, "topic_root"),  # empty level
        ({"reconnect_min_s": 5, "reconnect_max_s": 1}, "reconnect_max_s"),
        ({"password_env": "FOD_PW"}, "username"),  # a password needs a user
        ({"username": "u", "password_env": "my secret"}, "NAME of an environment variable"),
        ({"qos_alarm": 0}, "qos_alarm"),  # the outbox needs acknowledgements
        ({"tls": {"cert_file": "c.pem"}}, "key_file"),
        ({"tls": {"ca_file": "/nonexistent/ca.pem"}}, "is not a file"),
        ({"port": 0}, "port"),
        ({"keepalive": 10}, "keepalive"),  # unknown key (units in names)
    ],
)
def test_config_validation_names_the_key(fields, needle):
    import pydantic

    with pytest.raises(pydantic.ValidationError) as info:
        MqttConfig.model_validate(fields)
    assert needle in str(info.value)


def test_broker_url():
    base = MqttConfig(username="u", password_env="FOD_PW")
    plain = base.with_broker_url("mqtt://broker.local")
    assert (plain.host, plain.port, plain.tls) == ("broker.local", 1883, None)
    secure = base.with_broker_url("mqtts://broker.local")
    assert (secure.port, secure.tls) == (8883, MqttTlsConfig())
    assert base.with_broker_url("mqtt://bob@10.0.0.2:1999").username == "bob"
    assert base.with_broker_url("mqtt://10.0.0.2:1999").port == 1999
    for bad, needle in [
        ("http://x", "mqtt://host"),
        ("mqtt://", "mqtt://host"),
        ("mqtt://u:secret@h", "password"),
        ("mqtt://h:99999", "port"),
    ]:
        with pytest.raises(BrokerError, match=needle):
            base.with_broker_url(bad)


def test_unset_password_env_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("FOD_TEST_MQTT_PW", raising=False)
    config = MqttConfig(username="u", password_env="FOD_TEST_MQTT_PW", outbox_dir=tmp_path)
    with pytest.raises(BrokerError, match="FOD_TEST_MQTT_PW is not set"):
        MqttLink(config, agent_id="a1")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_username_and_password_from_environment(tmp_path, monkeypatch, subscriber, topic_root, make_link):
    pwfile = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(pwfile), "agent", "s3cret"], check=True, capture_output=True
    )
    broker = Mosquitto(tmp_path / "auth", extra=[f"password_file {pwfile}", "allow_anonymous false"])
    broker.start()
    try:
        monkeypatch.setenv("FOD_TEST_MQTT_PW", "wrong")
        bad = make_link(broker, username="agent", password_env="FOD_TEST_MQTT_PW")
        bad.start()
        assert not bad.connected.wait(0.5)  # refused, keeps retrying
        bad.stop(timeout_s=0.5)

        monkeypatch.setenv("FOD_TEST_MQTT_PW", "s3cret")
        good = make_link(broker, username="agent", password_env="FOD_TEST_MQTT_PW", agent_id="a2")
        good.start()
        assert good.connected.wait(5)
    finally:
        broker.stop(kill=True)


@pytest.fixture
def tls_files(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path / "tls"
    d.mkdir()

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=fod-test-ca")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
    )  # fmt: skip
    return d


def test_tls_connection_with_ca_file(tmp_path, tls_files, make_link, topic_root):
    d = tls_files
    broker = Mosquitto(
        tmp_path / "tlsbroker",
        extra=[f"cafile {d / 'ca.pem'}", f"certfile {d / 'server.pem'}", f"keyfile {d / 'server.key'}"],
    )
    broker.start()
    try:
        link = make_link(broker, tls={"ca_file": str(d / "ca.pem")})
        link.start()
        assert link.connected.wait(5)
        link.stop(timeout_s=1.0)
        # without the CA the handshake fails (certificate not trusted) and the link keeps retrying
        untrusted = make_link(broker, tls={}, agent_id="a2")
        untrusted.start()
        assert not untrusted.connected.wait(0.5)
    finally:
        broker.stop(kill=True)


# --- issue 14 item 7: commands off unless configured, authenticated, never replayed


def test_commands_are_off_unless_configured(mosquitto, subscriber, topic_root, make_link):
    rec = Recorder()
    sub = subscriber(mosquitto, f"{topic_root}/#")
    link = make_link(mosquitto, on_command=rec, commands=False, command_secret_env=None)
    link.start()
    assert link.connected.wait(5)
    sub.wait_for(f"{topic_root}/status", 1)
    send(mosquitto, f"{topic_root}/cmd/pause", b"{}")
    with pytest.raises(AssertionError, match="expected 1 message"):
        sub.wait_for(f"{topic_root}/cmd/response", 1, timeout_s=1.0)  # the agent did not even subscribe
    assert rec.commands == []


def test_commands_on_need_a_secret():
    with pytest.raises(ValueError, match="command_secret_env"):
        MqttConfig(commands=True)


def test_commands_on_refuse_a_short_or_unset_secret(tmp_path, monkeypatch):
    monkeypatch.setenv(COMMAND_SECRET_ENV, "short")
    with pytest.raises(BrokerError, match=COMMAND_SECRET_ENV):
        MqttLink(
            MqttConfig(commands=True, command_secret_env=COMMAND_SECRET_ENV, outbox_dir=tmp_path), agent_id="a"
        )


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b'{"request_id": "u"}', "not authenticated"),  # unsigned: anyone on the broker
        (json.dumps(sign_command("pause", {"request_id": "u"}, "another-secret-0123456789")).encode(), "failed"),
        (
            json.dumps(sign_command("pause", {"request_id": "u"}, COMMAND_SECRET, now=time.time() - 3600)).encode(),
            "stale",
        ),  # replayed from an old capture
        (
            json.dumps(
                {**sign_command("pause", {"request_id": "u"}, COMMAND_SECRET), "request_id": "altered"}
            ).encode(),
            "failed",
        ),  # payload altered after signing
        (b"", "not authenticated"),  # the empty message that clears a retained command
    ],
)
def test_unauthenticated_commands_are_refused(mosquitto, subscriber, topic_root, make_link, payload, needle):
    rec = Recorder()
    sub = subscriber(mosquitto, f"{topic_root}/#")
    link = make_link(mosquitto, on_command=rec)
    link.start()
    assert link.connected.wait(5)
    sub.wait_for(f"{topic_root}/status", 1)
    send(mosquitto, f"{topic_root}/cmd/pause", payload, sign=False)
    resp = sub.wait_for(f"{topic_root}/cmd/response", 1)[0].json()
    assert resp["ok"] is False
    assert needle in resp["error"]
    assert rec.commands == []


def test_a_retained_command_acts_once_even_when_cleared_and_resubscribed(
    mosquitto, subscriber, topic_root, make_link
):
    rec = Recorder()
    sub = subscriber(mosquitto, f"{topic_root}/#")
    link = make_link(mosquitto, on_command=rec)
    link.start()
    assert link.connected.wait(5)
    sub.wait_for(f"{topic_root}/status", 1)
    body = json.dumps(sign_command("pause", {"request_id": "once"}, COMMAND_SECRET)).encode()
    send(mosquitto, f"{topic_root}/cmd/pause", body, retain=True, sign=False)  # arrives live: runs once
    assert sub.wait_for(f"{topic_root}/cmd/response", 1)[0].json()["ok"] is True
    send(mosquitto, f"{topic_root}/cmd/pause", body, sign=False)  # replayed live: same nonce
    replay = sub.wait_for(f"{topic_root}/cmd/response", 2)[-1].json()
    assert replay["ok"] is False
    assert "nonce" in replay["error"]
    send(mosquitto, f"{topic_root}/cmd/pause", b"", retain=True, sign=False)  # cleared as the docs say
    cleared = sub.wait_for(f"{topic_root}/cmd/response", 3)[-1].json()
    assert cleared["ok"] is False
    assert rec.commands == [Pause(request_id="once")]


# --- issue 14 item 5: alarms first


def test_results_and_images_yield_to_an_unacknowledged_alarm(mosquitto, subscriber, topic_root, make_link):
    """A broker that stops reading (SIGSTOP: TCP stays up, buffers fill, no PUBACK) is a saturated uplink."""
    import os
    import signal
    import socket

    from agent.mqtt.base import ALARM_FIRST_BYTES, BACKLOG_LIMIT_BYTES

    sub = subscriber(mosquitto, f"{topic_root}/#")
    link = make_link(mosquitto, images="all", image_min_interval_s=0.0, keepalive_s=60)
    link.start()
    assert link.connected.wait(5)
    sub.wait_for(f"{topic_root}/status", 1)
    assert link._client is not None
    link._client.socket().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)  # a thin uplink
    assert link.publish_result("cam0", result(0))  # nothing waits: sent
    pid = mosquitto.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        image = b"\xff" * 500_000
        sent = [link.publish_image("cam0", "overlay", image) for _ in range(100)]  # 50 MB into a stopped broker
        backlog = metric(link, "fod_mqtt_messages_dropped_total", kind="overlay", reason="backlog")
        assert backlog == sent.count(False) > 0  # images gave way instead of queuing without bound
        assert link._backlog_bytes <= BACKLOG_LIMIT_BYTES + len(image)
        link.publish_alarm("cam0", alarm(1))  # waits behind at most that bounded backlog
        results = [link.publish_result("cam0", result(i)) for i in range(1, 51)]
        dropped = metric(link, "fod_mqtt_messages_dropped_total", kind="result", reason="backlog")
        dropped += metric(link, "fod_mqtt_messages_dropped_total", kind="result", reason="alarm_first")
        assert dropped == results.count(False) > 0  # results give way while the alarm waits
        assert link._backlog_bytes <= BACKLOG_LIMIT_BYTES + len(image) + ALARM_FIRST_BYTES
    finally:
        os.kill(pid, signal.SIGCONT)
    assert sub.wait_for(f"{topic_root}/cam0/alarm", 1, timeout_s=60)[0].json()["alarm_seq"] == 1
    deadline = time.monotonic() + 60
    while link.outbox_depth and time.monotonic() < deadline:
        time.sleep(0.02)
    assert link.publish_result("cam0", result(51))  # the alarm is through: results flow again
    assert sub.wait_until(f"{topic_root}/cam0/result", lambda ms: any(m.json()["seq"] == 51 for m in ms), 60)
