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


# ---------------------------------------------------------------- issue 14 item 2: snapshots never starve the outbox
def test_snapshots_keep_min_free_space_for_the_outbox(tmp_path: Path) -> None:
    import subprocess

    import pytest

    from agent.outbox import Outbox
    from agent.snapshots import SnapshotSpaceError

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        pruned: list[int] = []
        # default-like retention (far above the disk) but a free-space budget of 1 MB
        store = SnapshotStore(mnt / "snaps", max_total_mb=500, max_age_h=168, on_pruned=pruned.append, min_free_mb=1)
        for i in range(40):  # 40 x 300 kB = 12 MB on a 3 MB disk
            store.save("cam0", i, 1_700_000_000.0 + i, files(100_000))
        assert store.free_bytes() >= 1e6  # the budget held
        assert sum(pruned) > 0  # by deleting the oldest snapshots
        assert store.snapshots()[-1].name.endswith("_00000039")  # the newest is kept
        with Outbox(mnt / "outbox") as box:  # the outbox on the same disk still has room
            for _ in range(50):  # each commit appends about 8 kB to the write-ahead log
                box.add("t", lambda seq: b'{"alarm_seq": %d}' % seq)
            assert len(box) == 50
        big = SnapshotStore(mnt / "snaps", max_total_mb=500, max_age_h=168, min_free_mb=10)  # more than the disk
        with pytest.raises(SnapshotSpaceError, match="min_free_mb"):
            big.save("cam0", 99, 1_700_000_100.0, files(1000))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
