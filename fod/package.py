"""The model package: the folder that travels from the trainer to the box.

Layout::

    PKG_DIR/
      manifest.json      versioned description (this module's :class:`Manifest`)
      model.onnx         FP32 graph: image uint8 [N, H, W, 3] BGR -> anomaly_map [N, 1, H, W], score [N]
      model.fp16.onnx    optional mixed-precision variant (``fod quantize``)
      model.int8.onnx    optional Q/DQ variant (``fod quantize``)
      model.<precision>.engine + model.<precision>.engine.json   TensorRT engine built on the box (``fod build``)

Loading a package checks the schema version and the sha256 of every listed file. This module
needs no torch (the agent imports it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fod.errors import PackageError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
Precision = Literal["fp32", "fp16", "int8"]
VARIANT_FILES: dict[str, str] = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """Name, dtype and shape of a graph tensor (``-1`` or a name marks a dynamic axis)."""

    name: str
    dtype: str
    shape: list[int | str]


class InputSpec(TensorSpec):
    """The graph input: ``image`` uint8 ``[N, H, W, 3]``, channel order BGR as OpenCV decodes."""

    layout: Literal["NHWC"] = "NHWC"
    channel_order: Literal["BGR"] = "BGR"


class DataFingerprint(_Strict):
    """Identity of the training images: count and sha256 over sorted (relative path, file hash)."""

    count: int
    sha256: str
    root: str = Field(description="folder the images were read from, for the record only")


class Calibration(_Strict):
    """Score threshold and normalisation fitted on good images (written by ``fod calibrate``).

    The normalised score is piecewise linear through ``(norm_min, 0)``, ``(image_threshold, 0.5)``
    and ``(norm_max, 1)``, clipped to [0, 1]: see :func:`fod.normalization.normalize_score`.
    """

    image_threshold: float = Field(description="raw image score at or above which a frame is NG")
    pixel_threshold: float = Field(description="raw anomaly-map value at or above which a pixel is in the mask")
    norm_min: float = Field(description="raw score mapped to 0 (typically the lowest good score)")
    norm_max: float = Field(description="raw score mapped to 1 (above the threshold)")
    method: str = Field(description="how the threshold was chosen, in words")
    target_far: float = Field(description="requested false-alarm rate per good part")
    n_normal: int = Field(description="number of good images the threshold was fitted on")
    expected_far: float | None = Field(default=None, description="false-alarm rate the sample supports")
    far_upper_95: float | None = Field(default=None, description="95% upper confidence bound of the FAR")
    details: dict[str, Any] = Field(default_factory=dict, description="report: recall, F1 threshold, ...")


class Manifest(_Strict):
    """``manifest.json`` of a model package (schema version :data:`SCHEMA_VERSION`)."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    schema_version: int
    model_name: str
    created_utc: str
    image_size: tuple[int, int] = Field(description="(height, width) of the graph input in px")
    backbone: str
    input: InputSpec
    outputs: list[TensorSpec]
    files: dict[str, str] = Field(description="file name -> sha256 of every file of the package")
    checkpoint_sha256: str
    training_data: DataFingerprint
    export: dict[str, Any] = Field(description="tool versions and opset used by the export")
    parity: dict[str, Any] = Field(default_factory=dict, description="ONNX Runtime vs PyTorch report")
    calibration: Calibration | None = None
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="precision -> accuracy-gate report of model.<precision>.onnx"
    )


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelPackage:
    """A validated model package folder.

    Args:
        root: the package folder.
        verify: check the sha256 of every file listed in the manifest (default True).

    Raises:
        PackageError: missing folder or manifest, invalid JSON, a schema newer than this
            software, or a file that is missing or does not match its hash.
    """

    def __init__(self, root: str | Path, *, verify: bool = True) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if verify:
            self.verify()

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the model input in px."""
        return self.manifest.image_size

    def onnx_path(self, precision: str = "fp32") -> Path:
        """Path of the ONNX variant for ``precision`` (``fp32``, ``fp16``, ``int8``).

        Raises:
            PackageError: the variant is not in this package.
        """
        if precision not in VARIANT_FILES:
            raise PackageError(f"unknown precision {precision!r}; choose one of {sorted(VARIANT_FILES)}")
        name = VARIANT_FILES[precision]
        if name not in self.manifest.files:
            hint = "re-export with `fod export`" if precision == "fp32" else (
                f"create it with `fod quantize --model {self.root} --precision {precision} --calib DIR`"
            )
            raise PackageError(f"{self.root}: no {name} in this package; {hint}")
        return self.root / name

    def verify(self) -> None:
        """Check that every listed file exists and matches its sha256.

        Raises:
            PackageError: naming the file and how to restore it.
        """
        for name, expected in self.manifest.files.items():
            path = self.root / name
            if not path.is_file():
                raise PackageError(f"{path}: listed in {MANIFEST_NAME} but missing; re-export the package")
            actual = sha256_file(path)
            if actual != expected:
                raise PackageError(
                    f"{path}: sha256 {actual[:12]}… does not match {MANIFEST_NAME} ({expected[:12]}…); "
                    "the file was edited or corrupted in transfer: copy the package again or re-export it"
                )

    def add_file(self, name: str) -> None:
        """Record (or update) the sha256 of ``root/name`` in the manifest and save it."""
        self.manifest.files[name] = sha256_file(self.root / name)
        self.save()

    def save(self) -> None:
        """Write the manifest atomically (temp file + rename)."""
        write_manifest(self.root, self.manifest)


def read_manifest(root: str | Path) -> Manifest:
    """Read and validate ``root/manifest.json``.

    Raises:
        PackageError: missing, unreadable, newer schema, or invalid content (the key is named).
    """
    path = Path(root) / MANIFEST_NAME
    if not Path(root).is_dir():
        raise PackageError(f"{root}: not a folder; pass a model package made by `fod export`")
    if not path.is_file():
        raise PackageError(f"{path}: missing; {root} is not a model package (make one with `fod export`)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON ({exc}); re-export the package") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if not isinstance(version, int):
        raise PackageError(f"{path}: no integer 'schema_version'; re-export the package")
    if version > SCHEMA_VERSION:
        raise PackageError(
            f"{path}: schema_version {version} is newer than this software supports ({SCHEMA_VERSION}); "
            "upgrade fod-agent (pip install -U fod-agent) or export with the matching version"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise PackageError(f"{path}: key '{key}': {first['msg']}; re-export the package") from exc


def write_manifest(root: str | Path, manifest: Manifest) -> None:
    """Write ``root/manifest.json`` atomically."""
    path = Path(root) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(path)
