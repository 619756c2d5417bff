"""Map raw image scores to a normalised score in [0, 1] that is exactly 0.5 at the threshold.

Piecewise linear through ``(norm_min, 0)``, ``(threshold, 0.5)``, ``(norm_max, 1)``, clipped.
Monotonic, so thresholding the normalised score at 0.5 gives the same verdict as the raw one.
No torch; used by the agent on every frame.
"""

from __future__ import annotations

from fod.package import Calibration


def normalize_score(raw: float, calibration: Calibration, threshold: float | None = None) -> float:
    """Normalise a raw image score.

    Args:
        raw: raw image score (max of the smoothed anomaly map).
        calibration: the package's calibration (``norm_min``, ``image_threshold``, ``norm_max``).
        threshold: a threshold that overrides the calibrated one (run-time change); the lower and
            upper anchors keep their distance ratio to it.

    Returns:
        float in [0, 1]; 0.5 exactly when ``raw == threshold``.
    """
    thr = calibration.image_threshold if threshold is None else threshold
    low = min(calibration.norm_min, thr - 1e-12)
    high = max(calibration.norm_max, thr + 1e-12)
    if raw < thr:
        value = 0.5 * (raw - low) / (thr - low)
    else:
        value = 0.5 + 0.5 * (raw - thr) / (high - thr)
    return float(min(1.0, max(0.0, value)))
