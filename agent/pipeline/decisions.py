"""Decisions of the pipeline: thresholds, debounce, result messages and alarm writes (event loop).

An alarm is written off the loop by :class:`agent.alarms.AlarmStore`; a failed write sends the ROI
back to its last stored state so the transition is raised again (see :mod:`agent.alarms`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from typing import Any

from agent.alarms import AlarmSkipped
from agent.backends import LoadedModel
from agent.capture import Frame
from agent.decision import RoiDecision
from agent.errors import AgentError
from agent.pipeline.images import Images
from agent.pipeline.runtime import CameraRuntime, RoiScore, ScoredFrame
from agent.schemas import AlarmPayload, LatencyMs, ResultPayload
from fod.normalization import normalize_score

log = logging.getLogger(__name__)


class Decisions(Images):
    """Part of :class:`agent.pipeline.Agent`: see the module docstring."""

    def _decide_and_publish(
        self, runtime: CameraRuntime, frame: Frame, scored: ScoredFrame, model: LoadedModel
    ) -> None:
        """Thresholds, debounce, result messages, alarm writes and the NG publish job (event loop).

        A transition's alarm is written off the loop (:meth:`_write_alarm`); when the write fails,
        the ROI goes back to its last stored state and the transition is raised again (retry).
        """
        t_post = time.perf_counter()
        name = runtime.config.name
        link = self.link
        if link is None:
            raise AgentError("internal error: link used before the agent started (run() sets it up)")
        calibration = model.calibration
        seq = runtime.scored
        runtime.scored += 1
        verdicts: dict[str, str] = {}
        results: list[dict[str, Any]] = []
        published: list[ResultPayload] = []
        for roi in scored.rois:
            threshold = runtime.thresholds[roi.name]
            decision = runtime.decisions[roi.name]
            if not math.isfinite(roi.score):
                self.metrics.errors.labels("score").inc()
                runtime.work.failed(f"ROI {roi.name}: non-finite score {roi.score}")
                log.warning("camera %s/%s: non-finite score %s on frame %s", name, roi.name, roi.score, frame.seq)
                continue
            verdict = decision.rule.verdict(roi.score)
            transition = decision.update(roi.score)
            normalized = normalize_score(roi.score, calibration, threshold)
            verdicts[roi.name] = verdict
            result = self._result(name, roi, seq, frame, scored, normalized, threshold, verdict, t_post)
            link.publish_result(name, result)
            published.append(result)
            runtime.work.scored(roi.name)
            if transition is not None:
                alarm = AlarmPayload(
                    camera=name,
                    roi=roi.name,
                    state=transition.state,
                    previous=transition.previous,
                    ts=frame.capture_ts,
                    score=roi.score,
                    normalized_score=normalized,
                    threshold=threshold,
                    source_frame=frame.source_frame,
                )
                self._write_alarm(runtime, decision.copy(), alarm)
            runtime.last_scores[roi.name] = {
                "score": roi.score,
                "normalized_score": normalized,
                "verdict": verdict,
                "alarm": runtime.decisions[roi.name].state,
                "source_frame": frame.source_frame,
            }
            results.append(result.model_dump(mode="json"))
        if self.config.mqtt.plc_topics:
            self._publish_plc(runtime, published)
        self.metrics.end_to_end_latency.labels(name).observe(max(0.0, time.perf_counter() - frame.capture_mono))
        self._queue_publish_job(runtime, frame, scored, verdicts, results, model)

    def _publish_plc(self, runtime: CameraRuntime, published: list[ResultPayload]) -> None:
        """PLC tokens: the debounced alarm state ('1' NG / '0' OK) when it changes (and on the first
        scored frame), and the normalised score of every scored frame (3 decimals).

        The state is the ROI's debounced state as decided; should its alarm fail to be stored, the ROI
        goes back to its stored state and the token follows on the next frame.
        """
        link = self.link
        if link is None:
            return
        name = runtime.config.name
        for result in published:
            state = "1" if runtime.decisions[result.roi].state == "NG" else "0"
            if runtime.plc_alarm.get(result.roi) != state:
                runtime.plc_alarm[result.roi] = state
                link.publish_plc(name, result.roi, "alarm", state)
            link.publish_plc(name, result.roi, "score", f"{result.normalized_score:.3f}")

    @staticmethod
    def _result(
        camera: str,
        roi: RoiScore,
        seq: int,
        frame: Frame,
        scored: ScoredFrame,
        normalized: float,
        threshold: float,
        verdict: str,
        t_post: float,
    ) -> ResultPayload:
        postprocess_ms = (time.perf_counter() - t_post) * 1e3
        total_ms = (time.perf_counter() - frame.capture_mono) * 1e3
        return ResultPayload(
            seq=seq,
            capture_ts=frame.capture_ts,
            camera=camera,
            roi=roi.name,
            source_frame=frame.source_frame,
            score=roi.score,
            normalized_score=normalized,
            threshold=threshold,
            verdict=verdict,  # type: ignore[arg-type]
            latency_ms=LatencyMs(
                capture=round((scored.taken_mono - frame.capture_mono) * 1e3, 3),
                preprocess=round(scored.preprocess_ms, 3),
                inference=round(scored.inference_ms, 3),
                postprocess=round(postprocess_ms, 3),
                total=round(total_ms, 3),
            ),
        )

    def _write_alarm(self, runtime: CameraRuntime, after: RoiDecision, alarm: AlarmPayload) -> None:
        """Hand one alarm to the store thread; ``after`` is the ROI's decision right after the transition."""
        if self.alarms is None:
            raise AgentError("internal error: alarm store used before the agent started (run() sets it up)")
        chain = runtime.chains.get(alarm.roi, 0)
        future = self.alarms.submit(runtime.config.name, alarm, chain)
        future.add_done_callback(functools.partial(self._alarm_written, runtime, after, alarm, chain))

    def _alarm_written(
        self,
        runtime: CameraRuntime,
        after: RoiDecision,
        alarm: AlarmPayload,
        chain: int,
        future: asyncio.Future[AlarmPayload],
    ) -> None:
        """Record a stored alarm, or send the ROI back to its last stored state (event loop)."""
        name, roi = runtime.config.name, alarm.roi
        if future.cancelled() or chain != runtime.chains.get(roi, 0):
            return
        exc = future.exception()
        if isinstance(exc, AlarmSkipped):
            return
        current = runtime.decisions[roi]
        if exc is not None:
            self.metrics.alarm_store_failures.inc()
            runtime.chains[roi] = chain + 1
            base = runtime.committed.get(roi)
            restored = base.copy() if base is not None else RoiDecision(current.rule)
            restored.set_rule(current.rule)
            runtime.decisions[roi] = restored
            now = time.monotonic()
            quiet = now - self._store_error_logged < 10.0  # retried every frame: one error line per 10 s
            self._store_error_logged = now if not quiet else self._store_error_logged
            (log.debug if quiet else log.error)(
                "alarm %s/%s %s -> %s NOT stored; the ROI is back to %s and the transition is retried: %s",
                name,
                roi,
                alarm.previous,
                alarm.state,
                restored.state,
                exc,
            )
            return
        runtime.committed[roi] = after
        stored = future.result()
        self.metrics.alarm_transitions.labels(name, roi, alarm.state).inc()
        self.recent_alarms.appendleft(
            {
                "ts": alarm.ts,
                "camera": name,
                "roi": roi,
                "previous": alarm.previous,
                "state": alarm.state,
                "score": alarm.score,
                "threshold": alarm.threshold,
                "source_frame": alarm.source_frame,
            }
        )
        log.info(
            "alarm %s/%s: %s -> %s (score %.4g, threshold %.4g, frame %s, alarm_id %s)",
            name,
            roi,
            alarm.previous,
            alarm.state,
            alarm.score,
            alarm.threshold,
            alarm.source_frame,
            stored.alarm_id,
        )
