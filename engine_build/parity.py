"""Parity check: do two runners agree on the same frames (a TensorRT engine vs ONNX Runtime)?

Works on any two :class:`fod.runner.Runner` objects. The builder runs it after each build with ONNX
Runtime on the same ONNX variant as the reference, so the check measures the compiler, not the
quantisation (the accuracy of a reduced-precision variant against FP32 is ``fod calibrate``'s gate).

The errors (``score_max_rel_err``, ``map_max_rel_err``, ``map_mean_rel_err``, ``score_max_abs_err``)
are those of the one comparator, :mod:`fod.compare`, which also serves the export parity check and
the accuracy gate of the reduced-precision variants.

The tolerance per precision (:data:`TOLERANCES`) allows for TF32 in FP32 engines, half-precision
accumulation in FP16 and INT8 kernels that round differently from ONNX Runtime's CPU Q/DQ emulation.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine_build.errors import EngineBuildError
from fod import compare as fod_compare
from fod.preprocess import read_image, to_model_input
from fod.runner import Runner

log = logging.getLogger("engine_build.parity")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class ParityTolerance:
    """Largest relative errors accepted (see the module docstring for the definitions).

    Attributes:
        score_rel: image scores.
        map_max_rel: worst pixel of the anomaly maps.
        map_mean_rel: mean pixel error of the anomaly maps.
    """

    score_rel: float
    map_max_rel: float
    map_mean_rel: float


#: tolerance per precision of the engine (and of the ONNX variant it was built from)
TOLERANCES: dict[str, ParityTolerance] = {
    "fp32": ParityTolerance(score_rel=1e-2, map_max_rel=2e-2, map_mean_rel=2e-3),
    "fp16": ParityTolerance(score_rel=3e-2, map_max_rel=6e-2, map_mean_rel=1e-2),
    "int8": ParityTolerance(score_rel=1e-1, map_max_rel=2.5e-1, map_mean_rel=4e-2),
}


@dataclass(frozen=True)
class ParityReport:
    """Outcome of :func:`compare_runners`.

    Attributes:
        passed: every error is within its tolerance and every output is finite.
        precision: precision whose tolerance was applied.
        n_images: frames compared.
        reference, candidate: backend names of the two runners.
        score_max_rel_err, map_max_rel_err, map_mean_rel_err: the measured relative errors
            (:class:`fod.compare.OutputErrors`; ``score_rel_err`` is the former name of the first).
        score_max_abs_err: largest absolute score difference (raw units).
        tolerance: the tolerance applied.
        failures: one line per violated limit (empty when passed).
        worst_image: index of the frame with the largest score difference.
    """

    passed: bool
    precision: str
    n_images: int
    reference: str
    candidate: str
    score_max_rel_err: float
    map_max_rel_err: float
    map_mean_rel_err: float
    score_max_abs_err: float
    tolerance: ParityTolerance
    failures: list[str] = field(default_factory=list)
    worst_image: int = 0

    @property
    def score_rel_err(self) -> float:
        """Former name of :attr:`score_max_rel_err` (engine.json files written before 0.2 carry it)."""
        return self.score_max_rel_err

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for the engine manifest."""
        return asdict(self)

    def summary(self) -> str:
        """One line for logs: verdict and errors against their limits."""
        t = self.tolerance
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"parity {self.candidate} vs {self.reference} ({self.precision}, {self.n_images} frames) "
            f"{verdict}: "
            f"score {self.score_max_rel_err:.2e} (limit {t.score_rel:.0e}), map max {self.map_max_rel_err:.2e} "
            f"(limit {t.map_max_rel:.0e}), map mean {self.map_mean_rel_err:.2e} (limit {t.map_mean_rel:.0e})"
        )


def compare_outputs(
    ref_scores: np.ndarray,
    ref_maps: np.ndarray,
    cand_scores: np.ndarray,
    cand_maps: np.ndarray,
    *,
    precision: str = "fp32",
    tolerance: ParityTolerance | None = None,
    reference: str = "reference",
    candidate: str = "candidate",
) -> ParityReport:
    """Compare two sets of outputs of the graph.

    Args:
        ref_scores: ``[N]`` float32 image scores of the reference.
        ref_maps: ``[N, 1, H, W]`` float32 anomaly maps of the reference.
        cand_scores: ``[N]`` float32 image scores of the candidate.
        cand_maps: ``[N, 1, H, W]`` float32 anomaly maps of the candidate.
        precision: selects the tolerance from :data:`TOLERANCES` when ``tolerance`` is None.
        tolerance: explicit limits.
        reference: name of the reference backend, for the report.
        candidate: name of the candidate backend, for the report.

    Raises:
        EngineBuildError: shapes differ, or an unknown precision without an explicit tolerance.
    """
    if tolerance is None:
        if precision not in TOLERANCES:
            raise EngineBuildError(f"no parity tolerance for precision {precision!r}; pass tolerance=")
        tolerance = TOLERANCES[precision]
    if ref_scores.shape != cand_scores.shape or ref_maps.shape != cand_maps.shape:
        raise EngineBuildError(
            f"parity: output shapes differ: {candidate} score {list(cand_scores.shape)} map "
            f"{list(cand_maps.shape)}, {reference} score {list(ref_scores.shape)} map {list(ref_maps.shape)}"
        )
    errors = fod_compare.compare_outputs(ref_scores, ref_maps, cand_scores, cand_maps)
    failures: list[str] = []
    if not errors.finite:
        failures.append(f"{candidate} produced NaN or infinite values")
    for label, value, limit in (
        ("score", errors.score_max_rel_err, tolerance.score_rel),
        ("map max", errors.map_max_rel_err, tolerance.map_max_rel),
        ("map mean", errors.map_mean_rel_err, tolerance.map_mean_rel),
    ):
        if not value <= limit:
            failures.append(f"{label} relative error {value:.3e} > {limit:.0e}")
    return ParityReport(
        passed=not failures,
        precision=precision,
        n_images=errors.n_images,
        reference=reference,
        candidate=candidate,
        score_max_rel_err=errors.score_max_rel_err,
        map_max_rel_err=errors.map_max_rel_err,
        map_mean_rel_err=errors.map_mean_rel_err,
        score_max_abs_err=errors.score_max_abs_err,
        tolerance=tolerance,
        failures=failures,
        worst_image=errors.worst_image,
    )


def run_batched(
    runner: Runner, images: np.ndarray, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``images`` through an active runner in batches of at most ``batch_size``.

    Args:
        runner: an active runner.
        images: ``[N, H, W, 3]`` uint8 BGR.
        batch_size: largest batch per call (None: all at once).

    Returns:
        ``(scores [N] float32, maps [N, 1, H, W] float32)``.
    """
    step = len(images) if not batch_size else int(batch_size)
    scores, maps = [], []
    for start in range(0, len(images), max(step, 1)):
        out = runner.infer(images[start : start + step])
        scores.append(out.score)
        maps.append(out.anomaly_map)
    return np.concatenate(scores).astype(np.float32), np.concatenate(maps).astype(np.float32)


def compare_runners(
    reference: Runner,
    candidate: Runner,
    images: np.ndarray,
    *,
    precision: str = "fp32",
    tolerance: ParityTolerance | None = None,
    batch_size: int | None = None,
) -> ParityReport:
    """Run the same frames through two runners and compare their scores and maps.

    Runners that are not active are activated for the comparison and deactivated after it; active
    ones are left active.

    Args:
        reference: the trusted runner (ONNX Runtime).
        candidate: the runner under test (the TensorRT engine).
        images: ``[N, H, W, 3]`` uint8 BGR frames at the model's input size.
        precision: tolerance to apply (:data:`TOLERANCES`) unless ``tolerance`` is given.
        tolerance: explicit limits.
        batch_size: largest batch per call (the engine's max batch); None: one call.

    Returns:
        the :class:`ParityReport`.

    Raises:
        EngineBuildError: no images, or outputs of different shapes.
        FodError: a runner cannot be activated or rejects the images.
    """
    if images.ndim != 4 or len(images) == 0:
        raise EngineBuildError(f"parity: need a non-empty [N, H, W, 3] uint8 batch, got {list(images.shape)}")
    started: list[Runner] = []
    try:
        for runner in (reference, candidate):
            if not runner.is_active:
                runner.activate()
                started.append(runner)
        ref_scores, ref_maps = run_batched(reference, images, batch_size)
        cand_scores, cand_maps = run_batched(candidate, images, batch_size)
    finally:
        for runner in started:
            runner.deactivate()
    report = compare_outputs(
        ref_scores,
        ref_maps,
        cand_scores,
        cand_maps,
        precision=precision,
        tolerance=tolerance,
        reference=reference.name,
        candidate=candidate.name,
    )
    log.info("%s", report.summary())
    return report


def synthetic_frames(image_size: tuple[int, int], count: int = 8, seed: int = 0) -> np.ndarray:
    """Deterministic test frames with structure: grey, noise, bright and dark blobs, gradients, edges.

    Args:
        image_size: ``(height, width)`` in px.
        count: number of frames (>= 1).
        seed: random seed.

    Returns:
        ``[count, H, W, 3]`` uint8 BGR.
    """
    h, w = image_size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = np.empty((count, h, w, 3), np.uint8)
    for i in range(count):
        base = 128.0 + rng.normal(0.0, 6.0 + 4.0 * i, size=(h, w, 3))
        if i % 2 == 1:  # gradient
            base += (xx / max(w - 1, 1) * 60.0 - 30.0)[..., None]
        for _ in range(int(rng.integers(1, 4))):  # blobs, bright or dark
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.04, 0.15) * min(h, w)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            base += (rng.choice([-1.0, 1.0]) * rng.uniform(40, 110) * blob)[..., None]
        if i % 3 == 2:  # a straight scratch
            row = int(rng.integers(0, h))
            base[row : row + max(1, h // 64)] = rng.uniform(0, 255, size=3)
        frames[i] = np.clip(base, 0, 255).astype(np.uint8)
    if count > 0:
        frames[0] = 128  # a perfectly uniform frame: scores near zero, a hard case for relative errors
        frames[0, h // 4 : h // 2, w // 4 : w // 2] = 200
    return frames


def load_frames(folder: str | Path, image_size: tuple[int, int], limit: int = 16) -> np.ndarray:
    """Read up to ``limit`` images (sorted by name) from ``folder`` and resize them for the model.

    Returns:
        ``[N, H, W, 3]`` uint8 BGR, through :func:`fod.preprocess.to_model_input`.

    Raises:
        EngineBuildError: the folder does not exist or holds no image.
        FodError: an image cannot be read.
    """
    root = Path(folder)
    if not root.is_dir():
        raise EngineBuildError(f"--parity-images {root}: not a folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise EngineBuildError(f"--parity-images {root}: no {'/'.join(IMAGE_SUFFIXES)} files in it")
    return np.stack([to_model_input(read_image(str(p)), image_size, source=str(p)) for p in files])
