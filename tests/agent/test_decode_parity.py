"""One decoder everywhere: the same files give the same scores in ``fod eval`` and in the agent's folder reader.

Files cover what a camera or a person may hand over: a JPEG with an EXIF orientation tag, 16-bit,
grayscale and BGRA PNGs, BMP, TIFF and WebP. The toy model's input is not square (32 x 64), so a
rotated decode scores differently from an unrotated one.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.config import load_config
from agent.pipeline import Agent
from fod.eval_cli import make_runner
from fod.evaluate import evaluate
from fod.preprocess import decode_image, read_image, to_model_input
from tests.agent.conftest import Mosquitto, Subscriber
from tests.toy_package import make_toy_package

SIZE = (32, 64)


def stripes(height: int = 40, width: int = 80) -> np.ndarray:
    """Grey with one bright 1-px vertical line: its toy score depends on how much the resize shrinks across it."""
    image = np.full((height, width, 3), 128, np.uint8)
    image[:, 30] = 255
    image[:, 31] = 40
    return image


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an APP1 Exif segment holding only the Orientation tag (0x0112) after the SOI marker."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    body = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def write_files(folder: Path) -> None:
    folder.mkdir(parents=True)
    jpeg = cv2.imencode(".jpg", stripes(), [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    (folder / "a_exif_rotated.jpg").write_bytes(with_exif_orientation(jpeg, 6))  # 90 degrees clockwise
    deep = stripes().astype(np.uint16) * 257
    cv2.imwrite(str(folder / "b_16bit.png"), deep)
    cv2.imwrite(str(folder / "c_gray.png"), stripes()[:, :, 0])
    bgra = np.dstack([stripes(), np.full((40, 80), 90, np.uint8)])
    cv2.imwrite(str(folder / "d_bgra.png"), bgra)
    half = stripes()
    half[:, 40:] = 128
    cv2.imwrite(str(folder / "e.bmp"), half)
    cv2.imwrite(str(folder / "f.tif"), half[::-1])
    cv2.imwrite(str(folder / "g.webp"), half, [cv2.IMWRITE_WEBP_QUALITY, 101])


def test_exif_orientation_is_applied_by_the_one_decoder(tmp_path: Path) -> None:
    write_files(tmp_path / "f")
    path = tmp_path / "f" / "a_exif_rotated.jpg"
    image = read_image(str(path))
    assert image.shape == (80, 40, 3)  # rotated upright
    assert np.array_equal(image, decode_image(path.read_bytes()))
    assert read_image(str(tmp_path / "f" / "b_16bit.png")).dtype == np.uint8


def test_fod_eval_and_the_agent_score_the_same_files_the_same(
    tmp_path: Path, mosquitto: Mosquitto, topic_root: str, subscriber: Callable[..., Subscriber]
) -> None:
    package = make_toy_package(tmp_path / "pkg", SIZE)
    good = tmp_path / "data" / "test" / "good"
    write_files(good)
    names = sorted(p.name for p in good.iterdir())

    runner = make_runner(package)
    report = evaluate(runner, tmp_path / "data", batch_size=2, progress=False)
    eval_scores = {Path(r.path).name: r.score for r in report.images}
    assert sorted(eval_scores) == names

    sub = subscriber(mosquitto, f"{topic_root}/#")
    config = load_config(
        None,
        {
            "cameras.0.source": str(good),
            "model.path": str(package),
            "model.threshold": 0.99,
            "mqtt.host": mosquitto.host,
            "mqtt.port": mosquitto.port,
            "mqtt.topic_root": topic_root,
            "state_dir": str(tmp_path / "state"),
            "http.port": 0,
            "exit_at_end": True,
        },
    )
    assert asyncio.run(Agent(config).run()) == 0
    results = [m.json() for m in sub.wait_for(f"{topic_root}/cam0/result", len(names), timeout_s=20)]
    agent_scores = {r["source_frame"]: r["score"] for r in results}
    assert sorted(agent_scores) == names
    for name in names:
        assert agent_scores[name] == pytest.approx(eval_scores[name], abs=1e-6), name

    # the EXIF file is orientation-sensitive: decoding it unrotated (the old folder reader) scores differently
    raw = cv2.imdecode(np.fromfile(good / "a_exif_rotated.jpg", np.uint8), cv2.IMREAD_UNCHANGED)
    runner.activate()
    try:
        unrotated = float(runner.infer(to_model_input(raw, SIZE)[None]).score[0])
    finally:
        runner.deactivate()
    assert abs(unrotated - eval_scores["a_exif_rotated.jpg"]) > 0.05
