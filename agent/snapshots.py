"""Snapshots of NG frames on disk, with size and age retention.

Layout: ``<dir>/<camera>/<YYYYmmdd-HHMMSS.fff>_<seq>/`` holding ``frame.jpg`` (the captured frame),
``mask.png`` (binary mask at frame resolution), ``overlay.jpg`` (heatmap) and ``result.json``
(the result payloads of every ROI of that frame). A snapshot is written to a temporary folder and
renamed, so a folder that exists is complete. After each save, :meth:`SnapshotStore.prune` deletes
the oldest snapshots until the total size is under ``max_total_mb`` and none is older than
``max_age_h``. Writing happens in a worker thread of the pipeline, never on the event loop.

Free space: snapshots have their own budget and never starve the alarm outbox. Before a save, the
free space of the snapshot file system is checked: when writing would leave less than
``min_free_mb``, the oldest snapshots are deleted first, and if that is not enough the snapshot is
not written (:class:`SnapshotSpaceError`, an ``OSError``; the pipeline counts and logs it).
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class SnapshotSpaceError(OSError):
    """A snapshot was not written: it would have left less than ``min_free_mb`` free on the disk."""


@dataclass(frozen=True)
class SnapshotFiles:
    """Encoded content of one snapshot.

    Attributes:
        frame_jpeg: the frame, JPEG bytes.
        mask_png: binary mask, PNG bytes.
        overlay_jpeg: heatmap overlay, JPEG bytes.
        results: JSON-serialisable result payloads (one per ROI) and extra fields.
    """

    frame_jpeg: bytes
    mask_png: bytes
    overlay_jpeg: bytes
    results: dict[str, Any]


class SnapshotStore:
    """A folder of snapshots with retention.

    Args:
        root: folder of the snapshots (created on first save).
        max_total_mb: total size above which the oldest snapshots are deleted, MB (1e6 bytes).
        max_age_h: snapshots older than this are deleted, hours.
        on_pruned: called with the number of snapshots deleted by one :meth:`prune`.
        min_free_mb: free space (MB, 1e6 bytes) a save must leave on the snapshot file system.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        max_total_mb: float,
        max_age_h: float,
        on_pruned: Callable[[int], None] | None = None,
        min_free_mb: float = 0.0,
    ) -> None:
        self.root = Path(root)
        self.min_free_bytes = int(min_free_mb * 1e6)
        self.max_total_bytes = int(max_total_mb * 1e6)
        self.max_age_s = max_age_h * 3600.0
        self.on_pruned = on_pruned
        self._lock = threading.Lock()

    def save(self, camera: str, seq: int, capture_ts: float, files: SnapshotFiles) -> Path:
        """Write one snapshot and apply retention.

        Args:
            camera: camera name (sub-folder).
            seq: frame sequence number (part of the folder name).
            capture_ts: capture time, unix s (folder name, local time).
            files: the encoded content.

        Returns:
            The snapshot folder.

        Raises:
            SnapshotSpaceError: writing would leave less than ``min_free_mb`` free, even after deleting
                every older snapshot.
            OSError: the folder cannot be written (disk full, permissions); the caller logs it.
        """
        self._make_room(len(files.frame_jpeg) + len(files.mask_png) + len(files.overlay_jpeg) + 65536)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(capture_ts)) + f".{int(capture_ts * 1000) % 1000:03d}"
        final = self.root / camera / f"{stamp}_{seq:08d}"
        with self._lock:
            tmp = final.with_name(final.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "frame.jpg").write_bytes(files.frame_jpeg)
            (tmp / "mask.png").write_bytes(files.mask_png)
            (tmp / "overlay.jpg").write_bytes(files.overlay_jpeg)
            (tmp / "result.json").write_text(json.dumps(files.results, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        self.prune()
        return final

    def free_bytes(self) -> int:
        """Free bytes on the file system of the snapshot folder (its nearest existing parent)."""
        path = self.root
        while not path.exists() and path != path.parent:
            path = path.parent
        return shutil.disk_usage(path).free

    def _make_room(self, needed: int) -> None:
        if self.min_free_bytes <= 0:
            return
        removed = 0
        while self.free_bytes() - needed < self.min_free_bytes:
            oldest = self.snapshots()
            if not oldest:
                if removed and self.on_pruned is not None:
                    self.on_pruned(removed)
                raise SnapshotSpaceError(
                    errno.ENOSPC,
                    f"snapshot not written: {self.free_bytes() / 1e6:.1f} MB free on the disk of {self.root}, "
                    f"snapshots.min_free_mb = {self.min_free_bytes / 1e6:g} keeps room for the alarm outbox; "
                    "free disk space or move snapshots.dir to another disk",
                )
            shutil.rmtree(oldest[0], ignore_errors=True)
            removed += 1
        if removed:
            log.info("snapshots: deleted %d old snapshot(s) in %s to keep min_free_mb free", removed, self.root)
            if self.on_pruned is not None:
                self.on_pruned(removed)

    def snapshots(self) -> list[Path]:
        """Every complete snapshot folder, oldest first (by capture time, the folder name)."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for cam in self.root.iterdir()
            if cam.is_dir()
            for p in cam.iterdir()
            if p.is_dir() and not p.name.endswith(".tmp")
        ]
        return sorted(found, key=lambda p: p.name)

    def prune(self, now: float | None = None) -> int:
        """Delete snapshots older than ``max_age_h``, then the oldest until under ``max_total_mb``.

        Args:
            now: current unix time, s (None = ``time.time()``; tests pass a value).

        Returns:
            The number of snapshots deleted.
        """
        now = time.time() if now is None else now
        removed = 0
        with self._lock:
            entries = [(p, p.stat().st_mtime, _size(p)) for p in self.snapshots()]
            total = sum(size for _, _, size in entries)
            for path, mtime, size in entries:
                if now - mtime <= self.max_age_s and total <= self.max_total_bytes:
                    continue
                shutil.rmtree(path, ignore_errors=True)
                total -= size
                removed += 1
        if removed:
            log.info("snapshots: deleted %d old snapshot(s) in %s (retention)", removed, self.root)
            if self.on_pruned is not None:
                self.on_pruned(removed)
        return removed


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
