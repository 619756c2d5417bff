"""Calibration data: which images a folder means, batches of them, and ONNX Runtime's data reader.

Folder rules (what ``fod calibrate`` and ``fod quantize`` accept; see ``docs/calibration.md``):

* a plain folder of images: all of them are good images (no labels);
* an MVTec-layout root (``ROOT/test/good`` exists): for thresholds and the accuracy gate the held-out
  ``test/good`` images are the good images and every other ``test/<type>`` folder holds labelled
  defects (with ``ground_truth/<type>/<stem>_mask.png`` masks where present). ``train/good`` is
  never used for thresholds (the model was fitted on it, its scores are biased low), but it is the
  default INT8 calibration set of ``fod quantize`` (activation ranges only need typical images);
* a folder with a ``good/`` (or ``ok/``) subfolder, e.g. ``ROOT/test``: the same, one level down.

Images go through :func:`fod.data.load_images` (the package's one preprocessing function), so a
batch is exactly what the graph sees: ``[N, H, W, 3]`` uint8 BGR.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from calibration.errors import CalibrationDataError
from fod.data import GOOD_NAMES, IMAGE_EXTENSIONS, list_images, load_images

log = logging.getLogger(__name__)

#: images below which ``fod quantize`` warns that its ranges and accuracy gate rest on a small sample
MIN_IMAGES_QUANTIZE = 20
#: fewest calibration / validation images ``fod quantize`` accepts at all
SMALL_QUANTIZE_MIN = 5
#: default cap on INT8 calibration images (evenly spaced over the sorted folder)
DEFAULT_MAX_CALIB_IMAGES = 64


@dataclass(frozen=True)
class LabelledImage:
    """One image with its label.

    Attributes:
        path: image file.
        label: 0 good, 1 defective.
        defect_type: ``good`` or the defect folder's name.
        mask_path: ground-truth mask (defects in an MVTec layout only), else None.
    """

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


@dataclass(frozen=True)
class ImageSet:
    """Good images and optional labelled defects, with where they came from.

    Attributes:
        good: good image files, sorted.
        defects: labelled defective images (may be empty).
        good_source: the folder the good images came from.
        defect_source: the folder(s) the defects came from, None when there are none.
        layout: ``folder`` (plain folder) or ``mvtec``.
    """

    good: list[Path]
    defects: list[LabelledImage]
    good_source: Path
    defect_source: str | None
    layout: str

    @property
    def defect_types(self) -> list[str]:
        """Defect type of each defective image, in order."""
        return [d.defect_type for d in self.defects]


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())


def _good_subfolder(folder: Path) -> Path | None:
    for name in sorted(GOOD_NAMES):
        if (folder / name).is_dir():
            return folder / name
    return None


def _find_mask(root: Path | None, defect_type: str, image: Path) -> Path | None:
    if root is None:
        return None
    folder = root / "ground_truth" / defect_type
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png", f"{image.stem}.bmp"):
        if (folder / name).is_file():
            return folder / name
    return None


def _defects_under(folder: Path, mvtec_root: Path | None) -> list[LabelledImage]:
    """Every image in non-good subfolders of ``folder`` (one defect type per subfolder)."""
    out: list[LabelledImage] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in GOOD_NAMES):
        if not _has_images(sub):
            continue
        for path in list_images(sub):
            out.append(LabelledImage(path, 1, sub.name, _find_mask(mvtec_root, sub.name, path)))
    return out


def resolve_evaluation_set(normal: str | Path, anomalous: str | Path | None = None) -> ImageSet:
    """Resolve ``--normal`` / ``--anomalous`` folders into good images and labelled defects.

    Args:
        normal: a plain folder of good images, an MVTec-layout root, or a folder with ``good/``.
        anomalous: optional defects: a plain folder of defect images (type = folder name), a folder of
            defect-type subfolders, or an MVTec root (its ``test/<type>``). When None and ``normal`` is
            an MVTec root (or has ``good/``), the defects next to the good images are used.

    Returns:
        :class:`ImageSet`.

    Raises:
        CalibrationDataError: a folder does not exist or holds no images in any accepted layout.
    """
    normal = Path(normal)
    if not normal.is_dir():
        raise CalibrationDataError(f"{normal}: no such folder; pass a folder of good images or an MVTec-layout root")
    mvtec_root: Path | None = None
    split_dir: Path | None = None
    if _good_subfolder(normal / "test") is not None:
        mvtec_root, split_dir = normal, normal / "test"
    elif _good_subfolder(normal) is not None and not _has_images(normal):
        split_dir = normal
        mvtec_root = normal.parent if normal.name == "test" else None
    if split_dir is not None:
        found = _good_subfolder(split_dir)
        if found is None:  # unreachable: checked above; keeps the type checker informed
            raise CalibrationDataError(f"{split_dir}: no good/ subfolder")
        good_dir = found
        good = list_images(good_dir)
        layout = "mvtec"
    elif _has_images(normal):
        good_dir, good, layout = normal, list_images(normal), "folder"
    else:
        raise CalibrationDataError(
            f"{normal}: no images here and no test/good/ or good/ subfolder; pass a folder of held-out good "
            "images or an MVTec-layout root (ROOT/test/good, ROOT/test/<defect>)"
        )
    if good_dir.parent.name == "train":
        log.warning(
            "%s looks like training images: the model was fitted on them, so their scores are biased low and "
            "the threshold will give more false alarms than stated; pass held-out good images",
            good_dir,
        )
    defects: list[LabelledImage] = []
    defect_source: str | None = None
    if anomalous is not None:
        defects, defect_source = resolve_defects(anomalous)
    elif split_dir is not None:
        defects = _defects_under(split_dir, mvtec_root)
        defect_source = str(split_dir) if defects else None
    return ImageSet(good, defects, good_dir, defect_source, layout)


def resolve_defects(anomalous: str | Path) -> tuple[list[LabelledImage], str]:
    """Resolve an ``--anomalous`` folder into labelled defect images (see :func:`resolve_evaluation_set`).

    Raises:
        CalibrationDataError: missing folder or no defect images found.
    """
    folder = Path(anomalous)
    if not folder.is_dir():
        raise CalibrationDataError(f"{folder}: no such folder (--anomalous); pass a folder of defect images")
    if (folder / "test").is_dir():
        defects = _defects_under(folder / "test", folder)
    elif _has_images(folder):
        defects = [LabelledImage(p, 1, folder.name) for p in list_images(folder)]
    else:
        defects = _defects_under(folder, folder.parent if folder.name == "test" else None)
    if not defects:
        raise CalibrationDataError(
            f"{folder}: no defect images (--anomalous); expected images, defect-type subfolders, or ROOT/test/<type>"
        )
    return defects, str(folder)


def resolve_calibration_images(calib: str | Path, max_images: int | None = DEFAULT_MAX_CALIB_IMAGES) -> list[Path]:
    """Good images for INT8 calibration (``--calib``): a plain folder, ``good/``, or an MVTec ``train/good``.

    Args:
        calib: the folder.
        max_images: keep at most this many, evenly spaced over the sorted list (None keeps all).

    Raises:
        CalibrationDataError: no images found.
    """
    folder = Path(calib)
    if not folder.is_dir():
        raise CalibrationDataError(f"{folder}: no such folder (--calib); pass a folder of good images")
    candidates = [folder / "train" / "good", folder / "train" / "ok", folder]
    sub = _good_subfolder(folder)
    if sub is not None:
        candidates.append(sub)
    for cand in candidates:
        if _has_images(cand):
            paths = list_images(cand)
            break
    else:
        raise CalibrationDataError(
            f"{folder}: no images (--calib); pass a folder of good images or an MVTec root with train/good/"
        )
    if max_images is not None and len(paths) > max_images:
        idx = np.linspace(0, len(paths) - 1, max_images).round().astype(int)
        paths = [paths[i] for i in sorted(set(idx.tolist()))]
    return paths


def iter_batches(
    paths: list[Path], image_size: tuple[int, int], batch_size: int
) -> Iterator[tuple[list[Path], np.ndarray]]:
    """Yield ``(paths, images)`` batches, images ``[B, H, W, 3]`` uint8 BGR at ``image_size`` (h, w).

    Raises:
        fod.errors.DataError: an image cannot be read (the file is named).
    """
    for start in range(0, len(paths), max(1, batch_size)):
        chunk = paths[start : start + max(1, batch_size)]
        yield chunk, load_images(chunk, image_size)


def add_synthetic_defects(images: np.ndarray, seed: int = 0, blobs: int = 2) -> np.ndarray:
    """Copies of ``images`` with random filled ellipses and lines of random grey level painted on.

    Used for INT8 calibration: activation ranges measured on good images alone clip the larger
    activations that real defects cause, which flattens exactly the signal the model exists for
    (see ``docs/calibration.md``). These crude "defects" stretch the ranges to cover them.

    Args:
        images: ``[N, H, W, 3]`` uint8 BGR.
        seed: random seed (deterministic output).
        blobs: shapes painted per image.

    Returns:
        ``[N, H, W, 3]`` uint8, a new array.
    """
    rng = np.random.default_rng(seed)
    out = images.copy()
    for img in out:
        h, w = img.shape[:2]
        for k in range(blobs):
            value = int(rng.integers(0, 256))
            color = (value, value, value)
            center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            if k % 2 == 0:
                axes = (int(rng.integers(2, max(3, w // 6))), int(rng.integers(2, max(3, h // 6))))
                cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
            else:
                end = (int(rng.integers(0, w)), int(rng.integers(0, h)))
                cv2.line(img, center, end, color, int(rng.integers(1, max(2, min(h, w) // 32 + 2))))
    return out


def _ort_reader_base() -> type:
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader  # type: ignore[no-any-return]


class ImageCalibrationDataReader(_ort_reader_base()):  # type: ignore[misc]
    """ONNX Runtime ``CalibrationDataReader`` over good images, for ``quantize_static``.

    Args:
        paths: image files.
        image_size: ``(height, width)`` of the graph input in px.
        batch_size: images per calibration batch.
        input_name: the graph input's name.
        augment: append a copy of each batch with synthetic defects (:func:`add_synthetic_defects`),
            so a batch holds ``2 B`` images.

    ``get_next()`` returns ``{input_name: [B or 2B, H, W, 3] uint8}`` until the images run out, then
    None; ``rewind()`` starts over. Images are loaded one batch at a time.
    """

    def __init__(
        self,
        paths: list[Path],
        image_size: tuple[int, int],
        *,
        batch_size: int = 1,
        input_name: str = "image",
        augment: bool = False,
    ) -> None:
        self.paths = list(paths)
        self.image_size = image_size
        self.batch_size = max(1, batch_size)
        self.input_name = input_name
        self.augment = augment
        self._iter: Iterator[tuple[list[Path], np.ndarray]] | None = None
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Next calibration batch, or None at the end."""
        if self._iter is None:
            self._iter = iter_batches(self.paths, self.image_size, self.batch_size)
            self._index = 0
        batch = next(self._iter, None)
        if batch is None:
            return None
        images = batch[1]
        if self.augment:
            images = np.concatenate([images, add_synthetic_defects(images, seed=self._index)])
        self._index += 1
        return {self.input_name: images}

    def rewind(self) -> None:
        """Start again from the first image."""
        self._iter = None

    def __len__(self) -> int:
        return (len(self.paths) + self.batch_size - 1) // self.batch_size
