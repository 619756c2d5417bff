"""Snapshots on disk: complete folders, size and age retention."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from agent.snapshots import SnapshotFiles, SnapshotStore


def files(size: int = 1000) -> SnapshotFiles:
    return SnapshotFiles(b"j" * size, b"p" * size, b"o" * size, {"results": [{"seq": 1}]})


def test_save_writes_every_file(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, max_total_mb=10, max_age_h=1)
    folder = store.save("cam0", 7, time.time(), files())
    assert folder.parent == tmp_path / "cam0"
    assert sorted(p.name for p in folder.iterdir()) == ["frame.jpg", "mask.png", "overlay.jpg", "result.json"]
    assert json.loads((folder / "result.json").read_text()) == {"results": [{"seq": 1}]}
    assert not list((tmp_path / "cam0").glob("*.tmp"))


def test_size_retention_deletes_oldest_first(tmp_path: Path) -> None:
    # each snapshot is ~3 kB of payload; the cap of 0.01 MB (10 kB) keeps the newest three
    pruned: list[int] = []
    store = SnapshotStore(tmp_path, max_total_mb=0.01, max_age_h=1, on_pruned=pruned.append)
    now = time.time()
    saved = []
    for i in range(5):
        saved.append(store.save("cam0", i, now + i, files()))
    kept = store.snapshots()
    assert kept == saved[-3:]
    assert sum(pruned) == 2


def test_age_retention(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, max_total_mb=10, max_age_h=1)
    now = time.time()
    old = store.save("cam0", 1, now - 7200, files())
    os.utime(old, (now - 7200, now - 7200))
    young = store.save("cam1", 2, now, files())
    assert store.prune(now) == 0 or not old.exists()
    assert not old.exists()
    assert young.exists()
