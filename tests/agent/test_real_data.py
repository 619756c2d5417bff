"""Real images (magnetic-tile, grayscale JPEGs of varying size) through the agent to a real mosquitto.

Two levels:

* the plumbing with the toy package (always, when the data is present): every file gives a result
  naming it, grayscale frames of any size are converted and scored, masks come at frame resolution;
* a model trained by ``fod train`` on magnetic-tile and calibrated by ``fod calibrate`` (fixture
  ``mt_package``; ``$FOD_MT_PACKAGE`` picks an existing one): a folder replay and a video made from the
  same images; defects must score higher than good tiles on average, in both.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.config import load_config
from agent.pipeline import Agent
from fod.package import ModelPackage
from tests.agent.conftest import Mosquitto, Subscriber

pytestmark = pytest.mark.data

REPO = Path(__file__).resolve().parents[2]
DEFECTS = ("blowhole", "break", "crack", "fray", "uneven")


def pick_images(real_data: Path, dest: Path, n_good: int, n_per_defect: int) -> dict[str, str]:
    """Copy real test images into ``dest``; return file name -> ``good`` or the defect type."""
    root = real_data / "magnetic-tile" / "test"
    dest.mkdir(parents=True)
    labels: dict[str, str] = {}
    for label, count in [("good", n_good), *((d, n_per_defect) for d in DEFECTS)]:
        for src in sorted((root / label).glob("*.jpg"))[:count]:
            name = f"{label}_{src.name}"
            shutil.copy(src, dest / name)
            labels[name] = label
    return labels


def run_agent(tmp_path: Path, broker: Mosquitto, root: str, package: Path, source: Path, **extra: Any) -> None:
    overrides: dict[str, Any] = {
        "agent_id": "real-data",
        "cameras.0.source": str(source),
        "model.path": str(package),
        "mqtt.host": broker.host,
        "mqtt.port": broker.port,
        "mqtt.topic_root": root,
        "mqtt.outbox_dir": str(tmp_path / "outbox"),
        "http.port": 0,
        "snapshots.dir": str(tmp_path / "snapshots"),
        "exit_at_end": True,
        **extra,
    }
    asyncio.run(Agent(load_config(None, overrides)).run())


def test_real_images_with_the_toy_package(
    tmp_path: Path, real_data: Path, mosquitto: Mosquitto, topic_root: str, toy_package: Path,
    subscriber: Callable[..., Subscriber],
) -> None:  # fmt: skip
    labels = pick_images(real_data, tmp_path / "imgs", 3, 1)
    names = sorted(labels)
    sub = subscriber(mosquitto, f"{topic_root}/#")
    run_agent(
        tmp_path, mosquitto, topic_root, toy_package, tmp_path / "imgs",
        **{"model.threshold": 1e-6, "mqtt.images": "all", "mqtt.image_min_interval_s": 0.0,
           "pipeline.publish_queue_size": len(names)},
    )  # fmt: skip
    results = [m.json() for m in sub.wait_for(f"{topic_root}/cam0/result", len(names))]
    assert [r["source_frame"] for r in results] == names
    assert all(r["verdict"] == "NG" for r in results)  # any texture beats a threshold of 1e-6
    masks = sub.wait_for(f"{topic_root}/cam0/mask", len(names))
    for name, msg in zip(names, masks):
        mask = cv2.imdecode(np.frombuffer(msg.payload, np.uint8), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(tmp_path / "imgs" / name), cv2.IMREAD_UNCHANGED)
        assert mask is not None
        assert image is not None
        assert mask.shape == image.shape[:2]  # frame resolution, whatever the tile's size


def mean_scores(results: list[dict[str, Any]], label_of: Callable[[Any], str]) -> tuple[float, float]:
    good = [r["normalized_score"] for r in results if label_of(r["source_frame"]) == "good"]
    bad = [r["normalized_score"] for r in results if label_of(r["source_frame"]) != "good"]
    return float(np.mean(good)), float(np.mean(bad))


def test_real_images_with_a_trained_model_as_folder_and_video(
    tmp_path: Path, real_data: Path, mosquitto: Mosquitto, topic_root: str,
    subscriber: Callable[..., Subscriber], mt_package: Path,
) -> None:  # fmt: skip
    package = mt_package
    labels = pick_images(real_data, tmp_path / "imgs", 10, 2)
    names = sorted(labels)
    threshold = ModelPackage(package).manifest.calibration.image_threshold  # type: ignore[union-attr]

    sub = subscriber(mosquitto, f"{topic_root}/#")
    run_agent(tmp_path, mosquitto, topic_root, package, tmp_path / "imgs", **{"decision.debounce_n": 1})
    folder = [m.json() for m in sub.wait_for(f"{topic_root}/cam0/result", len(names), timeout_s=60)]
    assert [r["source_frame"] for r in folder] == names
    assert all((r["verdict"] == "NG") == (r["score"] >= threshold) for r in folder)
    good, bad = mean_scores(folder, lambda name: labels[name])
    assert bad > good, f"defects score lower than good tiles on average ({bad:.3f} <= {good:.3f})"

    # the same images as a video (resized to one size, MJPG): frames are named by index
    video = tmp_path / "tiles.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 10, (320, 320))
    for name in names:
        gray = cv2.imread(str(tmp_path / "imgs" / name), cv2.IMREAD_GRAYSCALE)
        assert gray is not None
        writer.write(cv2.cvtColor(cv2.resize(gray, (320, 320), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR))
    writer.release()
    sub.clear()
    root2 = f"{topic_root}-video"
    sub2 = subscriber(mosquitto, f"{root2}/#")
    run_agent(tmp_path, mosquitto, root2, package, video, **{"mqtt.outbox_dir": str(tmp_path / "outbox2")})
    frames = [m.json() for m in sub2.wait_for(f"{root2}/cam0/result", len(names), timeout_s=60)]
    assert [r["source_frame"] for r in frames] == list(range(len(names)))
    good, bad = mean_scores(frames, lambda index: labels[names[index]])
    assert bad > good
