"""Timing helpers shared by ``fod bench``, the agent benchmark and ``fod quantize``'s latency table.

Torch-free runtime core: imports numpy and :mod:`fod.runner`'s interface only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fod.errors import InputError
from fod.runner import Runner


@dataclass(frozen=True)
class Timing:
    """Summary of the timed calls of one backend at one batch size.

    Attributes:
        batch: images per call.
        calls: timed calls (warm-up calls excluded).
        p50_ms, p95_ms, mean_ms, min_ms, max_ms: wall time per call, ms.
        per_frame_ms: ``p50_ms / batch``, ms per image.
        frames_per_s: ``batch * calls / sum(call times)``, images per second.
    """

    batch: int
    calls: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    per_frame_ms: float
    frames_per_s: float


def percentile_ms(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0..100, linear interpolation) of ``values``, rounded to µs; NaN when empty."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    return round(float(np.percentile(array, q)), 3) if array.size else math.nan


def summarize_times(times_ms: Sequence[float] | np.ndarray, batch: int) -> Timing:
    """Summarise per-call wall times.

    Args:
        times_ms: one wall time per timed call, ms (at least one).
        batch: images per call.

    Returns:
        :class:`Timing`.

    Raises:
        InputError: no times, or a batch below 1.
    """
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0 or batch < 1:
        raise InputError(f"summarize_times: need at least one time and batch >= 1 (got {t.size} times, batch {batch})")
    p50 = float(np.median(t))
    return Timing(
        batch=batch,
        calls=int(t.size),
        p50_ms=round(p50, 3),
        p95_ms=round(float(np.percentile(t, 95)), 3),
        mean_ms=round(float(t.mean()), 3),
        min_ms=round(float(t.min()), 3),
        max_ms=round(float(t.max()), 3),
        per_frame_ms=round(p50 / batch, 4),
        frames_per_s=round(1e3 * batch * t.size / float(t.sum()), 2),
    )


def time_runners(
    runners: Mapping[str, Runner], images: np.ndarray, *, repeats: int, warmup: int = 2
) -> dict[str, Timing]:
    """Time active runners on the same batch, interleaved (one call of each per round).

    Interleaving spreads load from other processes evenly over the runners, so that their ratios
    stay meaningful on a shared machine. Warm-up calls (``warmup`` per runner, first) are not timed.

    Args:
        runners: label -> an *active* :class:`fod.runner.Runner`.
        images: ``[B, H, W, 3]`` uint8 BGR at the runners' image size.
        repeats: timed calls per runner (``>= 1``).
        warmup: untimed calls per runner before timing.

    Returns:
        label -> :class:`Timing` (wall time of ``runner.infer`` per call, input check included).

    Raises:
        InputError: ``repeats < 1`` or images of the wrong shape (from the runner).
        FodError: a runner is not active or fails.
    """
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(0, warmup)):
        for runner in runners.values():
            runner.infer(images)
    times: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(repeats):
        for label, runner in runners.items():
            start = time.perf_counter()
            runner.infer(images)
            times[label].append((time.perf_counter() - start) * 1e3)
    return {label: summarize_times(t, len(images)) for label, t in times.items()}


def random_images(batch: int, image_size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``[batch, H, W, 3]`` uint8 random images (the benchmark input; FOD's cost does not depend on content)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(batch, image_size[0], image_size[1], 3), dtype=np.uint8)
