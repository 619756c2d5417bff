"""The one comparator of two runners' outputs: how far a candidate's scores and maps are from a reference.

Used by the export parity check (ONNX Runtime vs PyTorch, :func:`fod.export.check_parity`), the
accuracy gate of reduced-precision variants (:func:`calibration.gate.run_gate`) and the engine
parity check (TensorRT vs ONNX Runtime, :func:`engine_build.parity.compare_outputs`). Each caller
applies its own limits; the errors are defined once, here. Raw FOD scores have arbitrary units, so
the errors are relative to the reference's largest magnitude over the compared set:

- ``score_max_abs_err``: ``max |s_cand - s_ref|`` over images, raw units;
- ``score_max_rel_err``: ``score_max_abs_err / max |s_ref|``;
- ``map_max_rel_err``: ``max |m_cand - m_ref|`` over every pixel of every image, ``/ max |m_ref|``;
- ``map_mean_rel_err``: mean over pixels of the same difference, ``/ max |m_ref|``.

NaN handling: a NaN in the candidate makes its difference infinite (so every error it touches is
``inf`` and fails any limit) and is counted in ``nonfinite_scores`` / ``nonfinite_map_values``; an
infinite value counts there too. A zero reference scale gives 0 when the difference is 0, else inf.
Torch-free runtime core (numpy only).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fod.errors import InputError


@dataclass(frozen=True)
class OutputErrors:
    """Errors of a candidate's outputs against a reference (definitions in the module docstring).

    Attributes:
        n_images: images compared.
        score_max_abs_err: largest absolute image-score difference, raw units.
        score_max_rel_err: the same, relative to the reference's largest score magnitude.
        map_max_rel_err: worst pixel difference, relative to the reference's largest map magnitude.
        map_mean_rel_err: mean pixel difference, relative to the same scale.
        nonfinite_scores: NaN or infinite candidate scores.
        nonfinite_map_values: NaN or infinite candidate map values.
        worst_image: index of the image with the largest score difference.
        score_scale, map_scale: the reference magnitudes the errors are relative to.
    """

    n_images: int
    score_max_abs_err: float
    score_max_rel_err: float
    map_max_rel_err: float
    map_mean_rel_err: float
    nonfinite_scores: int
    nonfinite_map_values: int
    worst_image: int
    score_scale: float
    map_scale: float

    @property
    def finite(self) -> bool:
        """True when the candidate produced no NaN or infinite value."""
        return self.nonfinite_scores == 0 and self.nonfinite_map_values == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def relative(err: float, scale: float) -> float:
    """``err / scale``; with a zero scale 0 when ``err`` is 0, else inf."""
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


class OutputComparator:
    """Accumulates the comparison over batches (the gate streams a validation set through both runners).

    Call :meth:`add` per batch, then :meth:`result`.
    """

    def __init__(self) -> None:
        self._n = 0
        self._score_abs = 0.0
        self._worst = 0
        self._map_abs = 0.0
        self._map_sum = 0.0
        self._map_count = 0
        self._score_scale = 0.0
        self._map_scale = 0.0
        self._bad_scores = 0
        self._bad_maps = 0

    def add(self, ref_scores: np.ndarray, ref_maps: np.ndarray, cand_scores: np.ndarray, cand_maps: np.ndarray) -> None:
        """Add one batch: scores ``[N]`` and maps ``[N, 1, H, W]`` (any float dtype) of both runners.

        Raises:
            InputError: the two runners' shapes differ.
        """
        ref_s = np.asarray(ref_scores, np.float64).reshape(-1)
        cand_s = np.asarray(cand_scores, np.float64).reshape(-1)
        ref_m = np.asarray(ref_maps, np.float64)
        cand_m = np.asarray(cand_maps, np.float64)
        if ref_s.shape != cand_s.shape or ref_m.shape != cand_m.shape:
            raise InputError(
                f"outputs differ in shape: candidate score {list(cand_s.shape)} map {list(cand_m.shape)}, "
                f"reference score {list(ref_s.shape)} map {list(ref_m.shape)}"
            )
        self._bad_scores += int(np.count_nonzero(~np.isfinite(cand_s)))
        self._bad_maps += int(np.count_nonzero(~np.isfinite(cand_m)))
        with np.errstate(invalid="ignore"):
            score_diff = np.nan_to_num(np.abs(cand_s - ref_s), nan=np.inf)
            map_diff = np.nan_to_num(np.abs(cand_m - ref_m), nan=np.inf)
        if score_diff.size:
            i = int(score_diff.argmax())
            if float(score_diff[i]) > self._score_abs or self._n == 0:
                self._score_abs, self._worst = float(score_diff[i]), self._n + i
            self._score_scale = max(self._score_scale, float(np.abs(ref_s).max()))
        if map_diff.size:
            self._map_abs = max(self._map_abs, float(map_diff.max()))
            self._map_sum += float(map_diff.sum())
            self._map_count += map_diff.size
            self._map_scale = max(self._map_scale, float(np.abs(ref_m).max()))
        self._n += int(ref_s.size)

    def result(self) -> OutputErrors:
        """The errors over everything added so far."""
        mean = self._map_sum / self._map_count if self._map_count else 0.0
        return OutputErrors(
            n_images=self._n,
            score_max_abs_err=self._score_abs,
            score_max_rel_err=relative(self._score_abs, self._score_scale),
            map_max_rel_err=relative(self._map_abs, self._map_scale),
            map_mean_rel_err=relative(mean, self._map_scale),
            nonfinite_scores=self._bad_scores,
            nonfinite_map_values=self._bad_maps,
            worst_image=self._worst,
            score_scale=self._score_scale,
            map_scale=self._map_scale,
        )


def compare_outputs(
    ref_scores: np.ndarray, ref_maps: np.ndarray, cand_scores: np.ndarray, cand_maps: np.ndarray
) -> OutputErrors:
    """Compare one set of outputs of two runners (see :class:`OutputComparator`).

    Raises:
        InputError: the two runners' shapes differ.
    """
    comparator = OutputComparator()
    comparator.add(ref_scores, ref_maps, cand_scores, cand_maps)
    return comparator.result()
