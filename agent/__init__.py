"""fod-agent: the streaming runtime that scores camera frames and publishes results over MQTT.

The agent reads frames from cameras, video files, streams or image folders, runs a model package
(TensorRT or ONNX Runtime), decides OK/NG per region of interest and publishes scores, masks and
alarms over MQTT (:mod:`agent.mqtt`, payloads in :mod:`agent.schemas`, commands in
:mod:`agent.commands`). It does not import torch.

Concurrency, in one picture (who owns what, and every hand-over)::

    capture-<cam> thread (1 per camera)        owns the camera (cv2 / folder reader)
    watchdog-<cam> thread (live cameras)       no frame for stale_after_s -> "stalled", abandons a blocked
                                               capture thread and starts a fresh one (it reopens the source)
        | FrameSlot: 1 frame, newest wins (drops counted)        -> loop woken by call_soon_threadsafe
        v
    asyncio event loop (main thread)           owns the Agent state: thresholds, debounce, queues
        | run_in_executor(inference pool, 1 thread)  -> owns the runner (never used from 2 threads)
        |<- ScoredFrame
        | decide -> MqttLink.publish_result (thread-safe, never waits)
        | alarm transition -> AlarmStore.submit ------> alarm-store thread (1): MqttLink.publish_alarm
        |    (debounce goes on; a failed write sends      = sqlite write + fsync, in raise order;
        |     the ROI back to its last stored state)      result back via the future's callback
        | health ticker (1 s): derived health -> fod_healthy, status topic (MqttLink.set_health)
        | asyncio.Queue publish_queue (drop-oldest)
        v
    publish pool (1 thread)                    renders mask/overlay, publish_image, snapshots
    MqttLink (agent.mqtt.link):
        mqtt-link-<id> thread   connection supervisor: connect/back-off, republish, outbox delivery;
                                swaps the live paho client under the link's lock
        paho network thread     callbacks only set events / enqueue commands (never the link lock)
        mqtt-commands-<id>      applies commands one at a time; the Agent's handler hands them to
                                the loop with run_coroutine_threadsafe and waits for the answer
    http thread                 /metrics, /healthz, preview: reads snapshots of state, never blocks the loop;
                                at most http.max_connections handler threads, idle ones closed

No storage or network call runs on the event loop: alarm writes go to the alarm-store thread,
publishing hands bytes to paho, snapshots and images to the publish pool.

Stop: a signal (or ``--duration``) sets an event on the loop; the loop stops the cameras, drains
the publish queue and the alarm store (every raised alarm is stored), closes the link (publishes
``offline``, flushes the outbox) and the runner.
"""

from fod import __version__

__all__ = ["__version__"]
