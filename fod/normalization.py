"""Map raw scores to a normalised score in [0, 1] that is exactly 0.5 at the threshold.

Piecewise linear through ``(low, 0)``, ``(threshold, 0.5)``, ``(high, 1)``, clipped. Monotonic, so
thresholding the normalised score at 0.5 gives the same verdict as the raw one. One definition for
the published image score (:func:`normalize_score`, anchors from the package's calibration) and the
heatmap colours of the agent (:class:`agent.render.MapScale`, pixel anchors).
Torch-free runtime core; used by the agent on every frame.
"""

from __future__ import annotations

import math

import numpy as np

from fod.package import Calibration


def normalize_values(values: np.ndarray | float, *, low: float, threshold: float, high: float) -> np.ndarray:
    """Normalise raw values (any shape) to [0, 1], 0.5 exactly at ``threshold``.

    Args:
        values: raw scores or anomaly-map values.
        low: raw value mapped to 0 (moved just below ``threshold`` when it is not below it).
        threshold: raw value mapped to 0.5.
        high: raw value mapped to 1 (moved just above ``threshold`` when it is not above it).

    Returns:
        float64 array of the shape of ``values``; NaN stays NaN.
    """
    low = min(low, threshold - 1e-12)
    high = max(high, threshold + 1e-12)
    v = np.asarray(values, dtype=np.float64)
    below = 0.5 * (v - low) / (threshold - low)
    above = 0.5 + 0.5 * (v - threshold) / (high - threshold)
    return np.clip(np.where(v < threshold, below, above), 0.0, 1.0)


def normalize_score(raw: float, calibration: Calibration, threshold: float | None = None) -> float:
    """Normalise a raw image score.

    Args:
        raw: raw image score (max of the smoothed anomaly map).
        calibration: the package's calibration (``norm_min``, ``image_threshold``, ``norm_max``).
        threshold: a threshold that overrides the calibrated one (run-time change); the lower and
            upper anchors keep their distance ratio to it.

    Returns:
        float in [0, 1]; 0.5 exactly when ``raw == threshold``; 0.0 for a NaN score (as published
        since the first release).
    """
    if math.isnan(raw):
        return 0.0
    thr = calibration.image_threshold if threshold is None else threshold
    return float(normalize_values(raw, low=calibration.norm_min, threshold=thr, high=calibration.norm_max))
