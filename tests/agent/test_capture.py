"""Frame sources and the capture thread: folders, videos, objects, broken frames, reconnects, drop policy."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.capture import CameraStatus, CameraWorker, Frame, FrameSlot, check_frame, guess_kind, open_source
from agent.config import CameraConfig
from agent.errors import CameraError
from agent.metrics import AgentMetrics


def write_folder(folder: Path, n: int, *, size: tuple[int, int] = (48, 64)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{i:03d}.png"
        cv2.imwrite(str(folder / name), np.full((*size, 3), (10 * i) % 256, np.uint8))
        names.append(name)
    return names


def collect(worker: CameraWorker, *, delay_s: float = 0.0, limit: int = 10_000) -> list[Frame]:
    """Run the worker until its source ends; return the frames the consumer got."""

    async def consume() -> list[Frame]:
        worker.slot.attach(asyncio.get_running_loop())
        worker.start()
        frames: list[Frame] = []
        while len(frames) < limit and (frame := await worker.slot.get()) is not None:
            frames.append(frame)
            if delay_s:
                await asyncio.sleep(delay_s)
        return frames

    try:
        return asyncio.run(asyncio.wait_for(consume(), 20))
    finally:
        worker.stop()


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        (0, "camera"),
        ("2", "camera"),
        ("rtsp://10.0.0.2/stream", "url"),
        ("http://cam.local/video.mjpg", "url"),
        ("videotestsrc ! videoconvert ! appsink", "gstreamer"),
        ("line.mp4", "file"),
        ("/dev/video0", "camera"),
        ("/dev/v4l/by-id/usb-Acme_Cam-video-index0", "camera"),
    ],
)
def test_guess_kind(source: str | int, kind: str) -> None:
    assert guess_kind(source) == kind


def test_guess_kind_folder(tmp_path: Path) -> None:
    assert guess_kind(str(tmp_path)) == "folder"


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (None, "empty"),  # failed decode
        (np.zeros((0, 0, 3), np.uint8), "empty"),  # empty array
        (np.zeros((32, 32, 3), np.float32), "dtype"),  # wrong dtype
        (np.zeros((32, 32, 2), np.uint8), "shape"),  # two channels
        (np.zeros((4, 32, 3), np.uint8), "size"),  # too small to crop
        ("not an image", "empty"),  # not an array at all
    ],
)
def test_check_frame_rejects_broken_frames(image: Any, reason: str) -> None:
    assert check_frame(image, source="t") == (None, reason)


@pytest.mark.parametrize("shape", [(32, 40), (32, 40, 1), (32, 40, 4), (33, 41, 3)])
def test_check_frame_converts_to_bgr(shape: tuple[int, ...]) -> None:
    frame, reason = check_frame(np.full(shape, 7, np.uint8), source="t")
    assert reason is None
    assert frame is not None
    assert frame.shape == (shape[0], shape[1], 3)


def test_folder_source_reads_sorted_and_counts_broken_files(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    names = write_folder(folder, 4)
    (folder / "002b.png").write_bytes(b"not a png")  # broken: skipped and counted
    cv2.imwrite(str(folder / "003b.png"), np.full((48, 64), 200, np.uint8))  # grayscale: converted
    (folder / "notes.txt").write_text("ignored")
    metrics = AgentMetrics()
    states: list[str] = []
    worker = CameraWorker(
        CameraConfig(name="c", source=str(folder)), metrics=metrics, on_state=lambda s: states.append(s.state)
    )
    frames = collect(worker, delay_s=0.002)
    assert [f.source_frame for f in frames] == ["000.png", "001.png", "002.png", "003.png", "003b.png"]
    assert [f.seq for f in frames] == [1, 2, 3, 4, 5]
    assert all(f.image.shape == (48, 64, 3) for f in frames)
    assert metrics.value("fod_frames_broken_total", {"camera": "c", "reason": "empty"}) == 1
    assert metrics.value("fod_frames_captured_total", {"camera": "c"}) == 5
    # model pace: nothing dropped even though the consumer is slower than the reader
    assert metrics.value("fod_frames_dropped_total") == 0
    assert states == ["connected", "ended"]
    assert names


def test_video_file_frames_carry_their_index(tmp_path: Path) -> None:
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 20, (64, 48))
    for i in range(6):
        writer.write(np.full((48, 64, 3), 30 * i, np.uint8))
    writer.release()
    worker = CameraWorker(CameraConfig(name="v", source=str(path)), metrics=AgentMetrics())
    frames = collect(worker)
    assert [f.source_frame for f in frames] == [0, 1, 2, 3, 4, 5]
    assert worker.status().state == "ended"


def test_loop_restarts_a_folder(tmp_path: Path) -> None:
    write_folder(tmp_path / "f", 3)
    worker = CameraWorker(CameraConfig(name="c", source=str(tmp_path / "f"), loop=True), metrics=AgentMetrics())
    frames = collect(worker, limit=7)
    assert [f.source_frame for f in frames] == ["000.png", "001.png", "002.png"] * 2 + ["000.png"]
    assert worker.status().reconnects == 0  # looping is not a reconnect


def test_newest_frame_policy_drops_and_counts_when_the_consumer_is_slow(tmp_path: Path) -> None:
    write_folder(tmp_path / "f", 30)
    metrics = AgentMetrics()
    # realtime replay at 500 frames/s, consumer at ~50 frames/s
    worker = CameraWorker(CameraConfig(name="c", source=str(tmp_path / "f"), fps=500.0), metrics=metrics)
    frames = collect(worker, delay_s=0.02)
    dropped = metrics.value("fod_frames_dropped_total", {"camera": "c", "reason": "newest_frame"})
    assert dropped > 0
    assert len(frames) + dropped == 30  # every captured frame is either scored or counted as dropped
    assert worker.status().frames_dropped == dropped
    seqs = [f.seq for f in frames]
    assert seqs == sorted(seqs)
    assert seqs[-1] == 30  # the newest frame is never the one dropped


def test_frame_slot_put_blocks_at_model_pace_and_replaces_otherwise() -> None:
    slot = FrameSlot()
    frame = Frame(np.zeros((8, 8, 3), np.uint8), 1, 0.0, 0.0, None)
    assert slot.put(frame, block=False) is False
    assert slot.put(frame, block=False) is True  # replaced an unconsumed frame
    assert slot.dropped == 1
    stop = threading.Event()
    done = threading.Event()

    def producer() -> None:
        slot.put(frame, block=True, stop=stop)
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not done.wait(0.2)  # waits while the previous frame is not taken
    assert slot.take() is frame
    assert done.wait(2)
    thread.join()
    assert slot.dropped == 1


class FlakyCamera:
    """A live source object: a few frames, then a broken one, then failed reads forever."""

    def __init__(self) -> None:
        self.reads = 0
        self.released = False

    def read(self) -> tuple[bool, Any]:
        self.reads += 1
        if self.reads <= 3:
            return True, np.full((40, 40, 3), 128, np.uint8)
        if self.reads == 4:
            return True, np.zeros((40, 40, 3), np.float64)  # wrong dtype
        return False, None

    def release(self) -> None:
        self.released = True


def test_live_object_source_reconnects_with_backoff_after_failed_reads() -> None:
    metrics = AgentMetrics()
    states: list[CameraStatus] = []
    camera = FlakyCamera()
    config = CameraConfig(name="obj", reconnect_min_s=0.01, reconnect_max_s=0.02, max_read_failures=2)
    worker = CameraWorker(config, metrics=metrics, override=camera, on_state=states.append)

    async def run() -> list[Frame]:
        worker.slot.attach(asyncio.get_running_loop())
        worker.start()
        frames: list[Frame] = []
        deadline = time.monotonic() + 5
        while worker.status().reconnects < 2 and time.monotonic() < deadline:
            try:
                frame = await asyncio.wait_for(worker.slot.get(), 0.02)
            except TimeoutError:
                continue
            if frame is not None:
                frames.append(frame)
        return frames

    frames = asyncio.run(run())
    worker.stop()
    status = worker.status()
    assert status.frames_captured == 3
    assert len(frames) + status.frames_dropped == 3  # live source: newest-frame policy
    assert status.reconnects >= 2
    assert metrics.value("fod_camera_reconnects_total", {"camera": "obj"}) == status.reconnects
    assert metrics.value("fod_frames_broken_total", {"camera": "obj", "reason": "dtype"}) == 1
    assert metrics.value("fod_frames_broken_total", {"camera": "obj", "reason": "read_failed"}) >= 2
    assert "reconnecting" in [s.state for s in states]
    assert camera.released  # released once, at the end
    assert states[-1].state == "ended"


def test_replay_that_cannot_be_opened_fails_once_and_ends(tmp_path: Path) -> None:
    metrics = AgentMetrics()
    states: list[CameraStatus] = []
    config = CameraConfig(name="gone", source=str(tmp_path / "missing.mp4"), reconnect_min_s=0.01, reconnect_max_s=0.05)
    worker = CameraWorker(config, metrics=metrics, on_state=states.append)
    worker.start()
    assert worker.ended.wait(5)  # a replay is not retried: it ends
    worker.stop()
    assert [s.state for s in states] == ["failed"]
    assert "missing.mp4" in (states[0].error or "")
    assert "not found" in (states[0].error or "")
    assert worker.status().reconnects == 0
    assert worker.slot.closed
    assert metrics.value("fod_camera_connected", {"camera": "gone"}) == 0


def test_replay_with_no_readable_frame_fails(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(b"not a png")
    worker = CameraWorker(CameraConfig(name="c", source=str(tmp_path / "f")), metrics=AgentMetrics())
    assert collect(worker) == []
    status = worker.status()
    assert status.state == "failed"
    assert "no frame" in (status.error or "")


@pytest.mark.parametrize(
    "source",
    [
        "/dev/video97",  # a device node that is not there (unplugged)
        "/dev/v4l/by-id/usb-Acme_Cam_0001-video-index0",  # the reboot-stable link of a USB camera
    ],
)
@pytest.mark.parametrize("kind", ["auto", "camera"])
def test_device_path_is_a_live_camera_retried_with_backoff(source: str, kind: str) -> None:
    config = CameraConfig(name="usb", source=source, kind=kind, reconnect_min_s=0.01, reconnect_max_s=0.02)  # type: ignore[arg-type]
    with pytest.raises(CameraError, match="not present"):
        open_source(config)
    states: list[CameraStatus] = []
    worker = CameraWorker(config, metrics=AgentMetrics(), on_state=states.append)
    worker.start()
    deadline = time.monotonic() + 5
    while worker.status().reconnects < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not worker.ended.is_set()  # live: retried, never ended
    worker.stop()
    assert states[0].state == "failed"
    assert source in (states[0].error or "")
    assert worker.status().reconnects >= 3


def test_link_to_a_character_device_is_a_camera(tmp_path: Path) -> None:
    link = tmp_path / "usb-cam-video-index0"
    link.symlink_to("/dev/null")  # a character device, like /dev/video0
    assert guess_kind(str(link)) == "camera"
    assert guess_kind(str(tmp_path / "line.mp4")) == "file"


def test_open_source_errors_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match="no images"):
        open_source(CameraConfig(source=str(tmp_path), kind="folder"))
    with pytest.raises(CameraError, match="read"):
        open_source(CameraConfig(), override=object())


def test_factory_source_is_called_per_open() -> None:
    made: list[FlakyCamera] = []

    def factory() -> FlakyCamera:
        made.append(FlakyCamera())
        return made[-1]

    source = open_source(CameraConfig(), override=factory)
    assert source.live
    assert source.read()[0]
    assert len(made) == 1


class BlockingCamera:
    """A live source that delivers ``frames`` frames, then blocks in read() until ``unblock`` is set."""

    def __init__(self, frames: int, unblock: threading.Event) -> None:
        self.frames = frames
        self.unblock = unblock
        self.reads = 0
        self.released = threading.Event()

    def read(self) -> tuple[bool, Any]:
        self.reads += 1
        if self.reads > self.frames:
            self.unblock.wait()  # a driver call that never returns (until the test ends)
            return False, None
        time.sleep(0.01)
        return True, np.full((40, 40, 3), 128, np.uint8)

    def release(self) -> None:
        self.released.set()


def test_watchdog_abandons_a_read_that_never_returns_and_reopens() -> None:
    unblock = threading.Event()
    made: list[BlockingCamera] = []

    def factory() -> BlockingCamera:
        made.append(BlockingCamera(3 if not made else 10_000, unblock))
        return made[-1]

    metrics = AgentMetrics()
    states: list[CameraStatus] = []
    config = CameraConfig(name="stuck", stale_after_s=0.3, reconnect_min_s=0.01)
    worker = CameraWorker(config, metrics=metrics, override=factory, on_state=states.append)
    try:
        worker.start()
        deadline = time.monotonic() + 10
        while worker.status().frames_captured < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        sequence = [s.state for s in states]
        assert "stalled" in sequence
        assert sequence.index("stalled") < len(sequence) - 1 - sequence[::-1].index("connected")  # connected again
        stalled = states[sequence.index("stalled")]
        assert "no frame" in (stalled.error or "")
        assert worker.status().frames_captured >= 20  # the second reader delivers
        assert worker.status().stalls == 1
        assert metrics.value("fod_camera_stalls_total", {"camera": "stuck"}) == 1
        assert not made[0].released.is_set()  # still blocked in read()
        started = time.monotonic()
        worker.stop(timeout_s=2.0)
        assert time.monotonic() - started < 5.0  # stop is not held up by the abandoned reader (join timeout 2 s)
        assert worker.status().state == "ended"
    finally:
        unblock.set()
    assert made[0].released.wait(5)  # once its read returns, the abandoned reader releases its source
    assert made[1].released.wait(5)


@pytest.mark.parametrize(
    ("stale_after_s", "read_timeout_s", "expected"),
    [
        (0.5, 30.0, "stalled"),  # the watchdog gives up on the silent socket
        (30.0, 0.5, "reconnecting"),  # OpenCV's read timeout fails the read first
    ],
)
def test_http_mjpeg_stream_that_goes_silent_is_detected_and_reopened(
    stale_after_s: float, read_timeout_s: float, expected: str
) -> None:
    from tests.agent.mjpeg_server import MjpegServer

    states: list[CameraStatus] = []
    with MjpegServer(stall_after=5) as server:
        config = CameraConfig(
            name="ip",
            source=server.url,
            stale_after_s=stale_after_s,
            read_timeout_s=read_timeout_s,
            max_read_failures=1,
            reconnect_min_s=0.05,
        )
        worker = CameraWorker(config, metrics=AgentMetrics(), on_state=states.append)
        try:
            worker.start()
            deadline = time.monotonic() + 20
            while worker.status().frames_captured < 15 and time.monotonic() < deadline:
                time.sleep(0.05)
            sequence = [s.state for s in states]
            assert sequence[0] == "connected"
            assert expected in sequence
            assert sequence[-1] == "connected"  # reopened: frames flow again
            assert worker.status().frames_captured >= 15
            assert server.connections >= 2
        finally:
            worker.stop()


@pytest.mark.parametrize(("level", "shown"), [(logging.INFO, False), (logging.DEBUG, True)])
def test_opencv_retry_lines_follow_the_agent_log_level(
    level: int, shown: bool, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(level, logger="agent.capture")
    config = CameraConfig(name="idx", source=97, reconnect_min_s=0.01, reconnect_max_s=0.02)
    worker = CameraWorker(config, metrics=AgentMetrics())
    try:
        worker.start()
        deadline = time.monotonic() + 5
        while worker.status().reconnects < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker.stop()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    assert worker.status().reconnects >= 2
    assert ("can't open camera" in capfd.readouterr().err) is shown


def test_paho_not_connected_race_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    from agent.mqtt.session import PAHO_LOG

    caplog.set_level(logging.INFO)
    PAHO_LOG.error("Client is not connected. Socket: None). Last known Connection State: MQTT_CS_DISCONNECTING")
    PAHO_LOG.error("some other paho error")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == ["some other paho error"]


def test_broken_file_in_a_folder_is_named_once_in_the_log(tmp_path, caplog):
    """Issue 14 item 12: a file that cannot be decoded is skipped with a warning naming it, once per pass."""
    import logging

    import cv2
    import numpy as np

    from agent.capture.sources import FolderSource

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "b.png").write_bytes(b"not a png at all")
    with caplog.at_level(logging.WARNING, logger="agent.capture"):
        for _ in range(2):  # a second pass, as --loop does
            source = FolderSource(tmp_path)
            assert source.read()[1] is not None
            assert source.read() == (True, None)
            assert source.read()[0] is False
            assert source.read()[0] is False  # reading past the end does not log again
    lines = [r.getMessage() for r in caplog.records if "b.png" in r.getMessage()]
    assert len(lines) == 2  # one line per pass over the folder, naming the file
    assert all(line.startswith("skipped: ") for line in lines)


def _png_header(width: int, height: int) -> bytes:
    """A PNG announcing ``width`` x ``height`` (8-bit RGB) whose pixel data is a few bytes of zeros."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_an_oversized_file_is_refused_from_its_header_before_decoding(tmp_path):
    """Issue 14 item 10: a file announcing 60000 x 60000 px (10.8 GB of pixels) is skipped as ``too_large``
    from its header; the size limit is checked before anything is allocated for the pixels."""
    import cv2
    import numpy as np

    from agent.capture.sources import FolderSource
    from agent.capture.status import check_frame
    from fod.errors import ImageTooLarge, InputError
    from fod.preprocess import decode_image, header_size

    large = _png_header(9000, 9000)
    assert header_size(large) == (9000, 9000)
    with pytest.raises(ImageTooLarge, match="9000x9000 px is larger than the limit of 8192"):
        decode_image(large, source="large.png", max_side_px=8192)
    bomb = _png_header(60000, 60000)  # beyond what Pillow opens at all
    with pytest.raises(ImageTooLarge, match="more than 179 M px is larger than the limit of 8192"):
        decode_image(bomb, source="bomb.png", max_side_px=8192)
    with pytest.raises(InputError):  # without the limit it reaches the decoder, which finds no pixel data
        decode_image(bomb, source="bomb.png")
    ok, big = cv2.imencode(".jpg", np.zeros((40, 300, 3), np.uint8))
    assert ok
    assert header_size(big.tobytes()) == (300, 40)
    assert decode_image(big.tobytes(), max_side_px=300).shape == (40, 300, 3)  # the limit itself is allowed
    with pytest.raises(ImageTooLarge):
        decode_image(big.tobytes(), max_side_px=299)

    (tmp_path / "a_bomb.png").write_bytes(bomb)
    cv2.imwrite(str(tmp_path / "b_ok.png"), np.zeros((32, 32, 3), np.uint8))
    source = FolderSource(tmp_path, max_side_px=8192)
    ok_read, raw = source.read()
    assert ok_read
    assert check_frame(raw, source="cam0") == (None, "too_large")
    ok_read, raw = source.read()
    frame, reason = check_frame(raw, source="cam0")
    assert reason is None
    assert frame is not None
    assert frame.shape == (32, 32, 3)


def test_a_video_with_oversized_frames_is_refused_at_open(tmp_path):
    """Issue 14 item 10: the frame size a video source announces is checked before any frame is read."""
    import cv2
    import numpy as np

    from agent.capture.sources import VideoCaptureSource
    from agent.errors import CameraError

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (320, 240))
    for i in range(3):
        writer.write(np.full((240, 320, 3), 40 * i, np.uint8))
    writer.release()
    with pytest.raises(CameraError, match=r"320x240 px frames, larger than cameras.max_frame_side_px = 200"):
        VideoCaptureSource(str(path), "file", max_side_px=200)
    source = VideoCaptureSource(str(path), "file", max_side_px=320)
    ok, frame = source.read()
    source.release()
    assert ok
    assert frame.shape == (240, 320, 3)
