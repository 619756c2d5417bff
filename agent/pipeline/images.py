"""The publish queue: NG and preview frames rendered, published as images, saved as snapshots.

Bounded (``pipeline.publish_queue_size``), drop-oldest, counted in ``fod_queue_dropped_total``;
rendering and file writes run in the publish pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from agent.backends import LoadedModel
from agent.capture import Frame
from agent.errors import AgentError
from agent.pipeline.runtime import AgentState, CameraRuntime, PublishJob, ScoredFrame
from agent.render import (
    MapScale,
    encode_jpeg,
    encode_png,
    frame_map,
    mask_image,
    overlay_image,
    resize_to_width,
)
from agent.schemas import Verdict
from agent.snapshots import SnapshotFiles

log = logging.getLogger(__name__)


class Images(AgentState):
    """Part of :class:`agent.pipeline.Agent`: see the module docstring."""

    def _queue_publish_job(
        self,
        runtime: CameraRuntime,
        frame: Frame,
        scored: ScoredFrame,
        verdicts: dict[str, str],
        results: list[dict[str, Any]],
        model: LoadedModel,
    ) -> None:
        now = time.perf_counter()
        name = runtime.config.name
        ng = "NG" in verdicts.values()
        link = self.link
        verdict: Verdict = "NG" if ng else "OK"
        images = link is not None and (
            link.image_wanted(name, "mask", verdict) or link.image_wanted(name, "overlay", verdict)
        )
        snapshot = runtime.snapshot_requested or (
            ng
            and self.config.snapshots.enabled
            and now - runtime.last_snapshot_mono >= self.config.snapshots.min_interval_s
        )
        preview = self.preview.watching(name) and now - runtime.last_preview_mono >= 1.0 / self.config.http.preview_fps
        if not (images or snapshot or preview):
            return
        if snapshot:
            runtime.snapshot_requested = False
            runtime.last_snapshot_mono = now
        if preview:
            runtime.last_preview_mono = now
        cal = model.calibration
        scale = MapScale(
            low=min(cal.norm_min, 0.0),
            threshold=cal.pixel_threshold,
            high=max(cal.norm_max, cal.pixel_threshold),
        )
        job = PublishJob(name, runtime.scored - 1, frame, scored, verdicts, results, images, snapshot, preview, scale)
        queue = self._publish_queue
        if queue is None:
            raise AgentError("internal error: queue used before the agent started (run() sets it up)")
        if queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
                queue.task_done()
                self.metrics.queue_dropped.labels("publish").inc()
        queue.put_nowait(job)
        self.metrics.queue_depth.labels("publish").set(queue.qsize())

    async def _publisher(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._publish_queue
        if queue is None:
            raise AgentError("internal error: queue used before the agent started (run() sets it up)")
        while True:
            job = await queue.get()
            try:
                await loop.run_in_executor(self._io_pool, self._render_job, job)
            except Exception:
                self.metrics.errors.labels("publish").inc()
                log.exception("camera %s: rendering or saving frame %s failed", job.camera, job.frame.seq)
            finally:
                queue.task_done()
                self.metrics.queue_depth.labels("publish").set(queue.qsize())

    def _render_job(self, job: PublishJob) -> None:
        """Render mask and overlay, publish images, save the snapshot, feed the preview (publish thread)."""
        image = job.frame.image
        amap = frame_map(image.shape[:2], [(r.box, r.anomaly_map) for r in job.scored.rois])
        boxes = [(r.name, r.box, job.verdicts.get(r.name, "OK")) for r in job.scored.rois]
        overlay = overlay_image(image, amap, job.scale, boxes=boxes)
        mask_png = encode_png(mask_image(amap, job.scale.threshold)) if job.images or job.snapshot else b""
        overlay_jpeg = encode_jpeg(overlay) if job.images or job.snapshot else b""
        if job.images and self.link is not None:
            self.link.publish_image(job.camera, "mask", mask_png)
            self.link.publish_image(job.camera, "overlay", overlay_jpeg)
        if job.snapshot:
            files = SnapshotFiles(encode_jpeg(image, 92), mask_png, overlay_jpeg, {"results": job.results})
            try:
                path = self.snapshots.save(job.camera, job.seq, job.frame.capture_ts, files)
                self.metrics.snapshots_saved.labels(job.camera).inc()
                log.debug("camera %s: snapshot %s", job.camera, path)
            except OSError as exc:
                self.metrics.errors.labels("snapshot").inc()
                log.error("camera %s: cannot write snapshot to %s: %s", job.camera, self.snapshots.root, exc)
        if job.preview:
            self.preview.publish(
                job.camera, encode_jpeg(resize_to_width(overlay, self.config.http.preview_width_px), 75)
            )
