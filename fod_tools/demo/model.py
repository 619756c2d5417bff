"""The demo's model package: trained once on synthetic good parts, then cached.

:func:`ensure_demo_package` returns the cached package folder when it is valid and was made with the
current recipe (:data:`DEMO_RECIPE`); otherwise it builds one, with a progress bar:

1. good frames from :class:`~fod_tools.demo.conveyor.SyntheticConveyor` (no defects), cropped to the
   demo's region of interest and passed through :func:`fod.preprocess.to_model_input`;
2. :func:`fod.train.train_model` + :func:`fod.checkpoint.save_checkpoint` (needs torch: the
   ``train`` extra);
3. :func:`fod.export.export_package`: the ONNX model package, parity-checked on demo frames;
4. :func:`calibration.cli_calibrate.calibrate` on held-out good frames and on frames with defects,
   so the package carries a threshold and the demo can report recall.

The package is built in a temporary folder beside the cache and renamed into place at the end, so
an interrupted first run never leaves a half-written package behind. The cache lives in
``$FOD_CACHE_DIR/demo`` (default ``~/.cache/fod-agent/demo``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.errors import AgentError
from fod.preprocess import crop_box, to_model_input
from fod_tools.demo.conveyor import SyntheticConveyor

log = logging.getLogger(__name__)

#: bump when anything below changes what the demo package contains; a cached package with another
#: recipe is rebuilt
RECIPE_VERSION = 4
#: what the first-run message announces (docs/benchmarks.md, "Shared CPUs"), recipe 4: the build on 2 idle
#: cores in s (35-45 s measured), beside one busy process in s (45-51 s measured, training on the free
#: core), and under a heavy background in minutes (recipe 2 took 576 s at a load average of 8-10)
BUILD_IDLE_S = 45
BUILD_ONE_BUSY_S = 55
BUILD_BUSY_MIN = 10


class DemoModelError(AgentError):
    """The demo model cannot be built here (torch or a ``fod`` API missing, training failed)."""


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that defines the demo model (stored in ``demo.json`` beside the package).

    Attributes:
        version: :data:`RECIPE_VERSION`.
        frame_size: ``(width, height)`` of the conveyor frames in px.
        trigger: the conveyor emulates a triggered camera (one frame per part, centred), as most
            inspection stations do; FOD compares each image with the mean appearance at each
            position of the good images, so it needs parts presented the same way every time.
        part_shapes: the product on the belt (one model per product, as on a real line).
        variation: normal part-to-part spread of the conveyor (see :class:`SyntheticConveyor`).
        gap: free belt between parts as a fraction of the frame width; wide enough that the
            neighbours stay out of the ROI.
        roi_px: ``(x, y, width, height)`` of the region the model scores, in frame px.
        image_size: square model input in px.
        levels: backbone strides of each FOD level (:attr:`fod.model.FODConfig.levels`).
        d_models: transformer width of each level.
        batch_size: training images per step.
        lr: Adam learning rate.
        train_images: good frames to train on.
        epochs: training epochs.
        calib_good: held-out good frames for the threshold.
        calib_defect: frames with a defect fully inside the ROI, for recall in the report.
        target_far: false-alarm rate the threshold aims at, per frame.
        margin_k: margin of ``fod calibrate``'s fallback rule (max good score + K robust sigmas),
            which applies while the held-out set is too small to show ``target_far``.
        seed: conveyor seed of the training frames (held-out sets use other seeds).
    """

    version: int = RECIPE_VERSION
    frame_size: tuple[int, int] = (640, 480)
    trigger: bool = True
    part_shapes: tuple[str, ...] = ("disc",)
    variation: float = 0.3
    gap: tuple[float, float] = (0.35, 0.6)
    roi_px: tuple[int, int, int, int] = (120, 40, 400, 400)
    image_size: int = 128
    levels: tuple[tuple[int, ...], ...] = ((16,),)
    d_models: tuple[int, ...] = (256,)
    batch_size: int = 4
    lr: float = 5e-4
    train_images: int = 100
    epochs: int = 12
    calib_good: int = 300
    calib_defect: int = 40
    target_far: float = 0.03
    margin_k: float = 0.5
    seed: int = 2024

    def key(self) -> str:
        """Short hash of the recipe (names what the cache holds)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


DEMO_RECIPE = DemoRecipe()


def cache_dir() -> Path:
    """The demo's cache folder: ``$FOD_CACHE_DIR/demo``, default ``~/.cache/fod-agent/demo``."""
    root = os.environ.get("FOD_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "fod-agent") / "demo"


def demo_conveyor(recipe: DemoRecipe = DEMO_RECIPE, **kwargs: Any) -> SyntheticConveyor:
    """A conveyor set up as the recipe says (frame size, trigger, product, variation, gap).

    Other settings (seed, defect rate, fps ...) are keyword arguments of :class:`SyntheticConveyor`.
    """
    width, height = recipe.frame_size
    kwargs.setdefault("trigger", recipe.trigger)
    kwargs.setdefault("part_shapes", recipe.part_shapes)
    kwargs.setdefault("variation", recipe.variation)
    kwargs.setdefault("gap", recipe.gap)
    return SyntheticConveyor(width, height, **kwargs)


def roi_box(recipe: DemoRecipe = DEMO_RECIPE) -> tuple[int, int, int, int]:
    """The demo ROI as a box ``(x0, y0, x1, y1)`` in frame px (for :meth:`FrameTruth.defective_in`)."""
    x, y, w, h = recipe.roi_px
    return (x, y, x + w, y + h)


def crop_roi(frame: np.ndarray, roi_px: tuple[int, int, int, int]) -> np.ndarray:
    """The ROI of ``roi_px = (x, y, w, h)``, clipped to the frame as the agent does (a view, no copy).

    Raises:
        ValueError: fewer than 2 px of the ROI lie inside the frame.
    """
    cropped = crop_box(frame, roi_px)
    if cropped is None:
        raise ValueError(f"ROI {roi_px} lies outside the {frame.shape[1]}x{frame.shape[0]} frame")
    return cropped[1]


def cached_package(recipe: DemoRecipe = DEMO_RECIPE, root: Path | None = None) -> Path | None:
    """The cached demo package when it exists, is valid and matches ``recipe``; else None."""
    from fod.errors import PackageError
    from fod.package import ModelPackage

    pkg = (root or cache_dir()) / "pkg"
    stamp = pkg / "demo.json"
    if not stamp.is_file():
        return None
    try:
        if json.loads(stamp.read_text()).get("recipe_key") != recipe.key():
            log.info("cached demo package %s was made with another recipe: rebuilding it", pkg)
            return None
        package = ModelPackage(pkg)
    except (OSError, ValueError, PackageError) as exc:
        log.warning("cached demo package %s is not usable (%s): rebuilding it", pkg, exc)
        return None
    if package.manifest.calibration is None:
        return None
    return pkg


def ensure_demo_package(
    recipe: DemoRecipe = DEMO_RECIPE,
    *,
    root: Path | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> Path:
    """Return the demo's model package folder, building it the first time.

    Args:
        recipe: what to build.
        root: cache folder; None = :func:`cache_dir`.
        progress: show progress bars (training, calibration).
        say: where the step-by-step messages go (the console by default).

    Returns:
        The package folder (``<root>/pkg``), calibrated.

    Raises:
        DemoModelError: torch is missing (install the ``train`` extra), a ``fod`` API it needs is
            missing, or a step failed (the message names the step).
    """
    root = root or cache_dir()
    found = cached_package(recipe, root)
    if found is not None:
        say(f"demo model: cached package {found}")
        return found
    try:
        import torch  # noqa: F401 - only to fail early with the right advice
    except ImportError as exc:
        raise DemoModelError(
            "the demo trains its model on the first run and needs torch for that: "
            "pip install torch==2.13.0 && pip install -e '.[train,demo]' (or pass --model PKG_DIR "
            "to run the demo with a package you have)"
        ) from exc
    root.mkdir(parents=True, exist_ok=True)
    work = root / f"build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    try:
        say(
            f"demo model: first run, building it in {root} (training on {recipe.train_images} synthetic "
            f"good parts at {recipe.image_size} px, export, calibration; about {BUILD_IDLE_S} s on 2 free cores, "
            f"{BUILD_ONE_BUSY_S} s beside one busy program, up to {BUILD_BUSY_MIN} minutes while many keep the CPU "
            "busy; cached afterwards)"
        )
        images = _good_images(recipe, recipe.train_images, seed=recipe.seed)
        run_dir = work / "fod-demo"
        _train(images, recipe, run_dir, progress=progress, say=say)
        pkg_dir = work / "pkg"
        say("demo model: exporting the ONNX package (with the parity check against PyTorch)")
        _export_package(run_dir, pkg_dir, images[:: max(1, len(images) // 8)][:8])
        say(f"demo model: calibrating the threshold on {recipe.calib_good} held-out good frames")
        summary = _calibrate(pkg_dir, recipe, work / "calib", progress=progress)
        (pkg_dir / "demo.json").write_text(
            json.dumps(
                {
                    "recipe_key": recipe.key(),
                    "recipe": asdict(recipe),
                    "build_seconds": round(time.perf_counter() - start, 1),
                    "calibration": summary,
                },
                indent=2,
            )
            + "\n"
        )
        final = root / "pkg"
        shutil.rmtree(final, ignore_errors=True)
        pkg_dir.replace(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"demo model: ready in {time.perf_counter() - start:.0f} s, cached in {final}")
    say(f"demo model: {describe_quality(summary)}")
    return final


def describe_quality(summary: dict[str, Any]) -> str:
    """One line on the demo model's threshold and how it does on the held-out frames of the build."""
    labelled = summary.get("labelled") or {}
    text = f"threshold {summary.get('image_threshold', float('nan')):.4g} on {summary.get('n_normal')} good frames"
    auroc, recall, far = labelled.get("image_auroc"), labelled.get("recall"), labelled.get("far")
    if isinstance(auroc, float) and isinstance(recall, float) and isinstance(far, float):
        text += (
            f"; on {labelled.get('n_defect')} held-out defective parts: image AUROC {auroc:.3f}, "
            f"recall {recall:.2f} at a false-alarm rate of {far:.2f}"
        )
    return text


def busy_cores(window_s: float = 0.3) -> float | None:
    """Cores other programs keep busy, measured with ``psutil.cpu_percent`` over ``window_s`` s.

    The caller sleeps while sampling, so the busy time is the other programs'. Returns cores, e.g. 1.0
    for one process spinning on a 2-core machine; None without psutil (a dependency of the demo's
    embedded broker, amqtt).
    """
    try:
        import psutil
    except ImportError:
        return None
    return float(psutil.cpu_percent(interval=window_s)) / 100.0 * (os.cpu_count() or 1)


def training_threads(threads: int, busy: float | None = None) -> int:
    """Threads for the demo's training: one fewer per core another program keeps busy (at least 1).

    An OpenMP region waits for its slowest thread; a thread that shares its core with a busy program
    makes every operator wait for a time slice. Beside one busy process on 2 cores the build took 73 s
    with 2 threads and 62 s with 1 (docs/benchmarks.md).

    Args:
        threads: torch's thread count.
        busy: busy cores (:func:`busy_cores`); None measures them.
    """
    busy = busy_cores() if busy is None else busy
    if busy is None:
        return threads
    taken = int(busy + 0.25)  # a core counts as taken from 0.75 busy on (start-up noise stays below)
    return max(1, min(threads, (os.cpu_count() or threads) - taken))


# ---------------------------------------------------------------------- steps
def _good_images(recipe: DemoRecipe, n: int, *, seed: int) -> np.ndarray:
    """``n`` good frames of the demo conveyor, ROI-cropped and preprocessed: ``[n, S, S, 3]`` uint8."""
    stride = 1 if recipe.trigger else 5
    frames = demo_conveyor(recipe, seed=seed, defect_rate=0.0).good_frames(n, stride=stride, seed=seed)
    size = (recipe.image_size, recipe.image_size)
    return np.stack([to_model_input(crop_roi(f, recipe.roi_px), size) for f in frames])


def _defect_frames(recipe: DemoRecipe, n: int, *, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """``n`` conveyor frames (full size) with a defect entirely inside the ROI, and the defect kinds."""
    conveyor = demo_conveyor(recipe, seed=seed, defect_rate=1.0)
    box = roi_box(recipe)
    every = 1 if recipe.trigger else 4  # free-running: every 4th frame, for varied positions
    frames: list[np.ndarray] = []
    kinds: list[str] = []
    while len(frames) < n:
        _, frame = conveyor.read()
        truth = conveyor.truth
        if truth is None or conveyor.frames_read % every or not truth.defective_in(box, 1.0):
            continue
        frames.append(frame)
        kinds.append(next(d.kind for p in truth.parts for d in p.defects if _inside(d.box, box)))
    return frames, kinds


def _inside(inner: tuple[int, int, int, int], outer: tuple[int, int, int, int]) -> bool:
    return inner[0] >= outer[0] and inner[1] >= outer[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def _train(
    images: np.ndarray, recipe: DemoRecipe, run_dir: Path, *, progress: bool, say: Callable[[str], None]
) -> None:
    try:
        from fod.checkpoint import save_checkpoint
        from fod.model import FODConfig
        from fod.train import TrainSettings, train_model
    except ImportError as exc:
        raise DemoModelError(
            f"the demo needs fod.train.train_model and fod.checkpoint.save_checkpoint ({exc}); "
            "update fod-agent, or pass --model PKG_DIR"
        ) from exc
    config = FODConfig(image_size=recipe.image_size, levels=recipe.levels, d_models=recipe.d_models)
    settings = TrainSettings(
        epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed, progress=progress
    )
    say(f"demo model: training ({recipe.epochs} epochs)")
    import torch

    threads = torch.get_num_threads()
    free = training_threads(threads)
    if free < threads:
        log.info("demo model: %d of %d cores busy with other programs: training on %d thread(s)",
                 threads - free, threads, free)
    torch.set_num_threads(free)
    try:
        model, record = train_model(images, config, settings)
    finally:
        torch.set_num_threads(threads)
    digest = hashlib.sha256()
    for image in images:
        digest.update(image.tobytes())
    record["data"] = {
        "count": len(images),
        "sha256": digest.hexdigest(),
        "root": f"synthetic conveyor (fod_tools.demo.conveyor, seed {recipe.seed}, roi {list(recipe.roi_px)})",
    }
    save_checkpoint(run_dir, model, record)


def _export_package(run_dir: Path, pkg_dir: Path, parity_images: np.ndarray | None = None) -> None:
    """Export a ``fod train`` run folder to a model package with :func:`fod.export.export_package`.

    Args:
        run_dir: the run folder (its name becomes the package's ``model_name``).
        pkg_dir: the package folder to write.
        parity_images: ``[N, S, S, 3]`` uint8 frames for the ONNX Runtime vs PyTorch parity check
            (written as PNG beside the run); None lets the export use its default.

    Raises:
        DemoModelError: the export API is missing.
    """
    try:
        from fod.export import export_package
    except ImportError as exc:
        raise DemoModelError(
            f"the demo needs fod.export.export_package(run_dir, out_dir) to turn its trained model into a "
            f"package, and this installation does not have it ({exc}); pass --model PKG_DIR to run the "
            "demo with an existing package"
        ) from exc
    data = None
    if parity_images is not None:
        data = run_dir.parent / "parity"
        data.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(parity_images):
            cv2.imwrite(str(data / f"parity_{i:02d}.png"), image)
    export_package(run_dir, pkg_dir, data=data)


def _calibrate(pkg_dir: Path, recipe: DemoRecipe, work: Path, *, progress: bool) -> dict[str, Any]:
    """Write held-out good and defect frames as PNG, calibrate the package on them, save the manifest.

    The frames are written at the model's input size: the package's preprocessing leaves them as they
    are, so the scores equal those of the full ROI crops, and a 128 px PNG is written and read several
    times faster than a 400 px one (docs/benchmarks.md, "Shared CPUs").
    """
    from calibration.cli_calibrate import calibrate
    from fod.package import ModelPackage

    size = (recipe.image_size, recipe.image_size)

    good_dir, bad_dir = work / "good", work / "defect"
    good_dir.mkdir(parents=True)
    bad_dir.mkdir(parents=True)
    good_frames = demo_conveyor(recipe, seed=recipe.seed + 1, defect_rate=0.0).good_frames(
        recipe.calib_good, stride=1 if recipe.trigger else 6, seed=recipe.seed + 1
    )
    good_paths = []
    for i, frame in enumerate(good_frames):
        path = good_dir / f"good_{i:04d}.png"
        cv2.imwrite(str(path), to_model_input(crop_roi(frame, recipe.roi_px), size))
        good_paths.append(path)
    bad_frames, kinds = _defect_frames(recipe, recipe.calib_defect, seed=recipe.seed + 2)
    bad_paths = []
    for i, (frame, kind) in enumerate(zip(bad_frames, kinds)):
        path = bad_dir / f"{kind}_{i:04d}.png"
        cv2.imwrite(str(path), to_model_input(crop_roi(frame, recipe.roi_px), size))
        bad_paths.append(path)
    pkg = ModelPackage(pkg_dir)
    calibration = calibrate(
        pkg,
        pkg.onnx_path("fp32"),
        good_paths,
        bad_paths,
        defect_types=kinds,
        target_far=recipe.target_far,
        margin_k=recipe.margin_k,
        min_images=min(30, recipe.calib_good),
        sources={"normal_source": "synthetic conveyor (held-out good)", "defect_source": "synthetic conveyor"},
    )
    pkg.manifest.calibration = calibration
    pkg.save()
    labelled = calibration.details.get("labelled", {}) if isinstance(calibration.details, dict) else {}
    return {
        "image_threshold": calibration.image_threshold,
        "method": calibration.method,
        "n_normal": calibration.n_normal,
        "labelled": labelled,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m fod_tools.demo.model [--rebuild] [--cache DIR]``: build the demo package and say how good it is.

    Returns:
        0, or 1 when the package cannot be built (the reason is printed).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fod_tools.demo.model", description=main.__doc__)
    parser.add_argument("--rebuild", action="store_true", help="delete the cached package and build it again")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: $FOD_CACHE_DIR/demo)")
    args = parser.parse_args(argv)
    root = args.cache or cache_dir()
    if args.rebuild:
        shutil.rmtree(root / "pkg", ignore_errors=True)
    try:
        pkg = ensure_demo_package(root=root)
    except AgentError as exc:
        print(f"demo model: error: {exc}", file=sys.stderr)
        return 1
    summary = json.loads((pkg / "demo.json").read_text()).get("calibration", {})
    print(f"demo model: {pkg}: {describe_quality(summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
