"""Evaluate any :class:`fod.runner.Runner` on the test split of an MVTec-layout folder.

:func:`evaluate` runs the runner over ``test/`` (``train/`` is not needed), and computes image
AUROC, pixel AUROC and PRO overall and per defect type (that type's images against all good
images) with :mod:`fod.metrics`. :func:`save_grid_png` draws images, ground truth and anomaly maps
for a person to look at.

Pixel metrics are computed on the anomaly map the runner outputs, which for the FOD graph is the
Gaussian-smoothed map (sigma 4). The reference implementation takes its pixel AUROC *before* the
smoothing (fod-method.md section 4, quirk 8). We deliberately measure the smoothed map because it
is the one shipped to users: the agent's masks and overlays come from it, so its quality is what
matters. Smoothing changes pixel AUROC and PRO (it spreads high values past the edges of small or
thin defects and suppresses isolated noise), so compare pixel numbers with published FOD results
with that in mind. Image scores (max of the smoothed map) are the reference's.

The same machinery evaluates a training checkpoint (``fod.torch_runner.TorchRunner``), an exported
package (:class:`fod.runner.OnnxRuntimeRunner`), a TensorRT engine, or the nearest-neighbour
baseline of ``benchmarks/baseline_knn.py``, so their numbers are comparable.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fod.data import TestSample, load_images, load_mask, load_test_split
from fod.errors import FodError
from fod.metrics import MetricWarning, image_auroc, pixel_auroc, pro_score
from fod.runner import Runner

logger = logging.getLogger(__name__)

#: the name of the overall row in tables and of nothing in ``per_type``
OVERALL = "overall"


@dataclass(frozen=True)
class SplitMetrics:
    """Metrics of one subset of the test split (overall, or one defect type against all good images).

    Attributes:
        name: ``overall`` or the defect type (folder name under ``test/``).
        n_good: good images in the subset.
        n_defective: defective images in the subset.
        image_auroc: image-level ROC AUC (NaN when the subset has a single class).
        pixel_auroc: pixel-level ROC AUC over all pixels of the subset (NaN without defect pixels).
        pro: normalised area under the per-region-overlap curve up to FPR 0.3 (NaN without regions).
    """

    name: str
    n_good: int
    n_defective: int
    image_auroc: float
    pixel_auroc: float
    pro: float


@dataclass(frozen=True)
class ImageResult:
    """Score of one test image.

    Attributes:
        path: image file.
        defect_type: folder name under ``test/``.
        label: 0 good, 1 defective.
        score: the runner's image score (raw, arbitrary units).
    """

    path: str
    defect_type: str
    label: int
    score: float


@dataclass(frozen=True)
class Timing:
    """Where the time of an evaluation went.

    Attributes:
        n_images: images evaluated.
        batch_size: images per runner call.
        load_s: reading and preprocessing images and masks, in s.
        inference_s: sum of the runner's ``inference_ms`` over all batches, in s.
        metrics_s: computing the metrics, in s.
        total_s: wall time of :func:`evaluate`, in s.
        inference_ms_per_image: ``inference_s`` per image, in ms.
    """

    n_images: int
    batch_size: int
    load_s: float
    inference_s: float
    metrics_s: float
    total_s: float
    inference_ms_per_image: float


@dataclass(frozen=True)
class EvalReport:
    """Result of :func:`evaluate`.

    Attributes:
        overall: metrics over the whole test split.
        per_type: defect type -> metrics of that type's images against all good images.
        images: per-image scores, in test-split order.
        timing: timings.
        runner: the runner's backend name (``onnxruntime``, ``torch``, ...).
        data: the dataset root.
        image_size: ``(height, width)`` of the maps in px.
        maps: ``[N, H, W]`` float32 anomaly maps in test-split order (for :func:`save_grid_png`;
            not serialised).
        samples: the test samples, in the same order.
    """

    overall: SplitMetrics
    per_type: dict[str, SplitMetrics]
    images: list[ImageResult]
    timing: Timing
    runner: str
    data: str
    image_size: tuple[int, int]
    maps: np.ndarray = field(repr=False, compare=False)
    samples: list[TestSample] = field(repr=False, compare=False)

    @property
    def image_auroc(self) -> float:
        """Overall image AUROC."""
        return self.overall.image_auroc

    @property
    def pixel_auroc(self) -> float:
        """Overall pixel AUROC."""
        return self.overall.pixel_auroc

    @property
    def pro(self) -> float:
        """Overall PRO (AU-PRO up to FPR 0.3, normalised)."""
        return self.overall.pro

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary of the report.

        Keys: ``image_auroc``, ``pixel_auroc``, ``pro`` (overall) at the top level, then ``per_type``,
        counts, ``timing`` and per-image ``scores``. NaN becomes None (JSON null).
        """
        return _nan_to_none(
            {
                "image_auroc": self.overall.image_auroc,
                "pixel_auroc": self.overall.pixel_auroc,
                "pro": self.overall.pro,
                "n_good": self.overall.n_good,
                "n_defective": self.overall.n_defective,
                "per_type": {name: _metrics_dict(m) for name, m in self.per_type.items()},
                "runner": self.runner,
                "data": self.data,
                "image_size": list(self.image_size),
                "pixel_metrics_on": "smoothed anomaly map (the runner's output, sigma-4 Gaussian for FOD)",
                "timing": asdict(self.timing),
                "scores": [asdict(r) for r in self.images],
            }
        )

    def table(self) -> str:
        """A plain-text table: one row per defect type and the overall row."""
        header = f"{'type':<16} {'good':>5} {'defect':>6} {'img AUROC':>10} {'pix AUROC':>10} {'PRO':>7}"
        rows = [header, "-" * len(header)]
        for m in [*self.per_type.values(), self.overall]:
            if m is self.overall:
                rows.append("-" * len(header))
            rows.append(
                f"{m.name:<16} {m.n_good:>5} {m.n_defective:>6} {_fmt(m.image_auroc):>10} "
                f"{_fmt(m.pixel_auroc):>10} {_fmt(m.pro):>7}"
            )
        t = self.timing
        rows.append(
            f"{t.n_images} images in {t.total_s:.1f} s ({self.runner}: "
            f"{t.inference_ms_per_image:.1f} ms/image at batch {t.batch_size}; "
            f"loading {t.load_s:.1f} s; metrics {t.metrics_s:.1f} s)"
        )
        return "\n".join(rows)


def evaluate(runner: Runner, root: str | Path, *, batch_size: int = 8, progress: bool = True) -> EvalReport:
    """Run ``runner`` on the test split of ``root`` and compute image AUROC, pixel AUROC and PRO.

    Masks are read (and checked) before any inference, so a broken dataset fails in seconds.
    The runner is activated if it is not active, and then deactivated again; an active runner is
    left active.

    Args:
        runner: any runner; its ``image_size`` is the evaluation resolution.
        root: MVTec-layout folder with ``test/<type>/`` and ``ground_truth/<type>/`` (no ``train/`` needed).
        batch_size: images per runner call (>= 1).
        progress: show a tqdm progress bar on stderr.

    Returns:
        :class:`EvalReport`; metrics that are undefined on a subset (e.g. no good image) are NaN,
        with a :class:`fod.metrics.MetricWarning` logged.

    Raises:
        DataError: missing or badly laid out folder, unreadable image or mask, mask of the wrong
            size (the file is named).
        FodError: the runner cannot be activated, or it returns maps of the wrong shape or
            non-finite values (the image is named).
        ValueError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    root = Path(root)
    samples = load_test_split(root)
    was_active = runner.is_active
    runner.activate()
    try:
        size = tuple(runner.image_size)
        if len(size) != 2 or min(size) < 1:
            raise FodError(f"{runner.name} runner has no valid image_size ({size}); activate it first")
        h, w = int(size[0]), int(size[1])
        t_load = time.perf_counter()
        masks = np.stack([load_mask(s, (h, w)) for s in samples])
        load_s = time.perf_counter() - t_load
        maps = np.empty((len(samples), h, w), dtype=np.float32)  # float16 would flush FOD's ~1e-5 values
        scores = np.empty(len(samples), dtype=np.float64)
        inference_s = 0.0
        for lo, hi in _progress(_batches(len(samples), batch_size), len(samples), progress):
            t0 = time.perf_counter()
            images = load_images([s.path for s in samples[lo:hi]], (h, w))
            load_s += time.perf_counter() - t0
            out = runner.infer(images)
            inference_s += out.inference_ms / 1e3
            _check_output(out.anomaly_map, out.score, samples[lo:hi], (h, w), runner.name)
            maps[lo:hi] = out.anomaly_map[:, 0]
            scores[lo:hi] = out.score
    finally:
        if not was_active:
            runner.deactivate()

    t_metrics = time.perf_counter()
    labels = np.array([s.label for s in samples])
    types = np.array([s.defect_type for s in samples])
    overall = _split_metrics(OVERALL, labels, scores, masks, maps)
    per_type = {}
    good = labels == 0
    for name in sorted({s.defect_type for s in samples if s.label == 1}):
        idx = np.flatnonzero(good | (types == name))
        per_type[name] = _split_metrics(name, labels[idx], scores[idx], masks[idx], maps[idx])
    metrics_s = time.perf_counter() - t_metrics
    total_s = time.perf_counter() - start
    timing = Timing(
        n_images=len(samples),
        batch_size=batch_size,
        load_s=load_s,
        inference_s=inference_s,
        metrics_s=metrics_s,
        total_s=total_s,
        inference_ms_per_image=inference_s * 1e3 / len(samples),
    )
    results = [ImageResult(str(s.path), s.defect_type, s.label, float(v)) for s, v in zip(samples, scores)]
    return EvalReport(overall, per_type, results, timing, runner.name, str(root), (h, w), maps, samples)


def save_grid_png(
    report: EvalReport, path: str | Path, *, per_type: int = 3, max_width_px: int = 2400
) -> Path:
    """Draw a PNG grid: one row per test folder, ``per_type`` examples per row, each as image | truth | map.

    Examples are spread over the score ranking of their folder (highest, middle, lowest), so the
    sheet shows both hits and misses; for ``good`` the highest scores (the likeliest false alarms)
    come first. Every map uses one colour scale for the whole test split (1st to 99.9th
    percentile of all map values), so brightness is comparable across panels; the ground-truth
    outline is drawn on the map in white. Titles give the file stem and the image score.

    Args:
        report: from :func:`evaluate` (its ``maps`` and ``samples``).
        path: output ``.png``; parent folders are created.
        per_type: examples per test folder (>= 1).
        max_width_px: figure width limit in px.

    Returns:
        The written path.

    Raises:
        DataError: an image or mask of the report can no longer be read.
        OSError: the PNG cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = report.image_size
    rows: list[tuple[str, list[int]]] = []
    for name in _folder_order(report.samples):
        idx = [i for i, s in enumerate(report.samples) if s.defect_type == name]
        idx.sort(key=lambda i: -report.images[i].score)
        picks = sorted({round(p) for p in np.linspace(0, len(idx) - 1, min(per_type, len(idx)))})
        rows.append((name, [idx[p] for p in picks]))
    flat = report.maps.ravel()
    vmin, vmax = (float(v) for v in np.percentile(flat[:: max(1, flat.size // 2_000_000)], [1.0, 99.9]))
    if not vmax > vmin:
        vmax = vmin + 1e-6
    n_cols = 3 * max(len(r[1]) for r in rows)
    dpi = 100
    panel_in = min(2.0, max_width_px / dpi / n_cols)
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(panel_in * n_cols, panel_in * len(rows) * 1.15), dpi=dpi, squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for r, (name, picks) in enumerate(rows):
        for c, i in enumerate(picks):
            sample = report.samples[i]
            image = load_images([sample.path], (h, w))[0]
            mask = load_mask(sample, (h, w))
            amap = report.maps[i]
            ax_img, ax_gt, ax_map = axes[r, 3 * c : 3 * c + 3]
            ax_img.imshow(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
            ax_img.set_title(f"{name}: {Path(sample.path).stem}"[:28], fontsize=6)
            ax_gt.imshow(mask, cmap="gray", vmin=0, vmax=1)
            ax_gt.set_title("ground truth", fontsize=6)
            ax_map.imshow(amap, cmap="jet", vmin=vmin, vmax=vmax)
            if mask.any():
                ax_map.contour(mask, levels=[0.5], colors="white", linewidths=0.5)
            ax_map.set_title(f"score {report.images[i].score:.4g}", fontsize=6)
    o = report.overall
    fig.suptitle(
        f"{Path(report.data).name} ({report.runner}): image AUROC {_fmt(o.image_auroc)}, "
        f"pixel AUROC {_fmt(o.pixel_auroc)}, PRO {_fmt(o.pro)}; map scale {vmin:.3g}..{vmax:.3g}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _split_metrics(
    name: str, labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray
) -> SplitMetrics:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        result = SplitMetrics(
            name=name,
            n_good=int(np.sum(labels == 0)),
            n_defective=int(np.sum(labels == 1)),
            image_auroc=image_auroc(labels, scores),
            pixel_auroc=pixel_auroc(masks, maps),
            pro=pro_score(masks, maps),
        )
    for w in caught:
        logger.warning("%s: %s", name, w.message)
    return result


def _check_output(
    anomaly_map: np.ndarray,
    score: np.ndarray,
    batch: Sequence[TestSample],
    size: tuple[int, int],
    runner: str,
) -> None:
    n = len(batch)
    if anomaly_map.shape != (n, 1, *size) or score.shape != (n,):
        raise FodError(
            f"{runner} runner returned anomaly_map {list(anomaly_map.shape)} "
            f"and score {list(score.shape)} for "
            f"{n} images; expected [{n}, 1, {size[0]}, {size[1]}] and [{n}]: the model does not follow the "
            "graph contract (re-export it)"
        )
    finite = np.isfinite(anomaly_map).all(axis=(1, 2, 3)) & np.isfinite(score)
    if not finite.all():
        bad = batch[int(np.flatnonzero(~finite)[0])].path
        raise FodError(
            f"{runner} runner returned NaN or inf for {bad}; the model is broken (retrain or re-export)"
        )


def _batches(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, batch_size):
        yield lo, min(n, lo + batch_size)


def _progress(batches: Iterator[tuple[int, int]], total: int, enabled: bool) -> Iterator[tuple[int, int]]:
    if not enabled:
        yield from batches
        return
    from tqdm import tqdm

    with tqdm(total=total, desc="eval", unit="img", leave=False) as bar:
        for lo, hi in batches:
            yield lo, hi
            bar.update(hi - lo)


def _folder_order(samples: Sequence[TestSample]) -> list[str]:
    names = sorted({s.defect_type for s in samples})
    return [n for n in names if any(s.label == 0 and s.defect_type == n for s in samples)] + [
        n for n in names if not any(s.label == 0 and s.defect_type == n for s in samples)
    ]


def _metrics_dict(m: SplitMetrics) -> dict[str, Any]:
    d = asdict(m)
    d.pop("name")
    return d


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"
