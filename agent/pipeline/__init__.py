"""The agent's pipeline on asyncio: capture -> ROI preprocessing -> inference -> decision -> publishers.

Stages and hand-offs (each bounded, with a declared policy and a metric):

1. **capture** (one thread per camera, :class:`agent.capture.CameraWorker`) -> a one-frame
   :class:`agent.capture.FrameSlot`: newest-frame policy for live sources (replaced frames counted in
   ``fod_frames_dropped_total{reason="newest_frame"}``), model pace for files and folders;
2. **inference** (one worker thread shared by all cameras, so the runner is never used from two
   threads): every ROI of a frame is cropped, passed through :func:`fod.preprocess.to_model_input`
   and scored in one batch;
3. **decision** (event loop): per-ROI threshold, verdict, N-of-M debounce and hysteresis
   (:mod:`agent.decision`); every scored ROI is published as a result, every alarm transition is
   written to the on-disk outbox by :class:`agent.alarms.AlarmStore` (one dedicated thread, order
   kept, never on the event loop); the transition is committed only once the alarm is stored, so a
   failed write is retried on the next frame instead of being lost;
4. **publish queue** (``pipeline.publish_queue_size``, drop-oldest, ``fod_queue_dropped_total``):
   NG frames (and preview frames while someone watches) wait here for a worker thread that renders
   the mask PNG and overlay JPEG, publishes them and writes snapshots.

Commands arrive from the MQTT link's thread and are handed to the event loop with
``asyncio.run_coroutine_threadsafe``. :meth:`Agent.request_stop` is thread- and signal-safe.

Modules, one concept each: :mod:`~agent.pipeline.agent` (lifecycle and the per-camera loop),
:mod:`~agent.pipeline.runtime` (per-camera state and the values handed between stages),
:mod:`~agent.pipeline.decisions` (thresholds, debounce, results and alarm writes),
:mod:`~agent.pipeline.images` (the publish queue: mask, overlay, snapshots, preview),
:mod:`~agent.pipeline.checks` (health derived from work done), :mod:`~agent.pipeline.control`
(commands from the MQTT link).
"""

from agent.pipeline.agent import Agent
from agent.pipeline.runtime import CameraRuntime, PublishJob, RoiScore, ScoredFrame

__all__ = ["Agent", "CameraRuntime", "PublishJob", "RoiScore", "ScoredFrame"]
