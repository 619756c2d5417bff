"""Snapshots of NG frames on disk, with size and age retention.

Layout: ``<dir>/<camera>/<YYYYmmdd-HHMMSS.fff>_<seq>/`` holding ``frame.jpg`` (the captured frame),
``mask.png`` (binary mask at frame resolution), ``overlay.jpg`` (heatmap) and ``result.json``
(the result payloads of every ROI of that frame). A snapshot is written to a temporary folder and
renamed, so a folder that exists is complete. After each save, :meth:`SnapshotStore.prune` deletes
the oldest snapshots until the total size is under ``max_total_mb`` and none is older than
``max_age_h``. Writing happens in a worker thread of the pipeline, never on the event loop.
"""

from __future__ import annotations

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
    """

    def __init__(
        self,
        root: str | Path,
        *,
        max_total_mb: float,
        max_age_h: float,
        on_pruned: Callable[[int], None] | None = None,
    ) -> None:
        self.root = Path(root)
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
            OSError: the folder cannot be written (disk full, permissions); the caller logs it.
        """
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
