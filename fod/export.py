"""ONNX export of the whole frame-to-answer graph, written as a model package with its manifest.

Graph (``FODModel.forward``): input ``image`` uint8 ``[N, H, W, 3]`` BGR -> in-graph float cast,
BGR->RGB, ImageNet normalisation, backbone, both FOD levels (the reference's K/V projections are
constants, folded by the exporter), patch scoring, bilinear upsampling, level average, separable
Gaussian smoothing, image score = max -> ``anomaly_map`` float32 ``[N, 1, H, W]``, ``score`` float32 ``[N]``.
Dynamic batch axis ``N``. The export checks its own result against PyTorch (:func:`check_parity`).
"""

from __future__ import annotations

import datetime
import logging
import platform
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from fod import __version__
from fod.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fod.compare import compare_outputs
from fod.errors import FodError
from fod.model import FODModel
from fod.package import (
    SCHEMA_VERSION,
    DataFingerprint,
    InputSpec,
    Manifest,
    ModelPackage,
    TensorSpec,
    sha256_file,
    write_manifest,
)
from fod.runner import OnnxRuntimeRunner
from fod.torch_runner import TorchRunner

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
FORBIDDEN_OPS = frozenset({"Einsum", "Tile", "Loop", "If", "SequenceConstruct"})
# Parity tolerances, relative to the largest value of the PyTorch output (justified in docs/export.md):
# FP32 graph-level rewrites (constant folding, fused LayerNorm, different GEMM blocking) reorder
# float sums; over ~40 layers that accumulates to ~1e-6..1e-5 relative, far below 1e-3.
SCORE_RTOL = 1e-3
MAP_RTOL = 1e-3
BATCH_RTOL = 1e-4


def export_onnx(model: FODModel, path: str | Path, *, opset: int = DEFAULT_OPSET) -> dict[str, int]:
    """Export ``model`` to ``path`` and return the op histogram of the graph.

    Raises:
        FodError: the graph contains an op TensorRT 10 cannot take (Einsum, Tile, control flow).
    """
    s = model.config.image_size
    dummy = torch.zeros(2, s, s, 3, dtype=torch.uint8)
    model = model.eval()
    # memory-bank mode (fod train --epochs 0): a zero correction adds nothing, so the graph skips the transformer
    bank_only = [level for level in model.levels if model.config.score == "rec" and level.correction_is_zero()]
    for level in bank_only:
        level.skip_correction = True
    try:
        _trace(model, dummy, path, opset)
    finally:
        for level in bank_only:
            level.skip_correction = False
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = Counter(node.op_type for node in graph.graph.node)
    bad = sorted(FORBIDDEN_OPS & set(ops))
    if bad:
        raise FodError(f"{path}: exported graph contains {bad}, which the TensorRT path must not have")
    return dict(sorted(ops.items()))


def _trace(model: FODModel, dummy: torch.Tensor, path: str | Path, opset: int) -> None:
    """``torch.onnx.export`` (TorchScript tracing) of ``model`` on ``dummy`` ``[2, S, S, 3]`` uint8."""
    with torch.no_grad(), warnings.catch_warnings():
        # The in-graph BGR->RGB flip is a Slice with step -1, which the TorchScript exporter cannot
        # constant-fold and says so three times; the graph is correct and the user can do nothing
        # about it, so the note is dropped (every other warning still shows).
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["image"],
            output_names=["anomaly_map", "score"],
            dynamic_axes={"image": {0: "N"}, "anomaly_map": {0: "N"}, "score": {0: "N"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def check_parity(model: FODModel, onnx_path: str | Path, images: np.ndarray) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch eager on ``images`` and check batch invariance.

    Args:
        model: the PyTorch model.
        onnx_path: its export.
        images: ``[N, S, S, 3]`` uint8 BGR (N >= 4 recommended).

    Returns:
        report with ``score_max_rel_err``, ``map_max_rel_err``, ``batch_max_rel_err``, the tolerances,
        ``images`` and ``passed``.
    """
    size = (model.config.image_size, model.config.image_size)
    with TorchRunner.from_model(model, device="cpu") as torch_runner:
        ref = torch_runner.infer(images)
    with OnnxRuntimeRunner(onnx_path, size) as ort_runner:
        out = ort_runner.infer(images)
        alone = [ort_runner.infer(images[i : i + 1]) for i in range(min(4, len(images)))]
    errors = compare_outputs(ref.score, ref.anomaly_map, out.score, out.anomaly_map)
    score_err, map_err = errors.score_max_rel_err, errors.map_max_rel_err
    # batch invariance: each image alone against the same image in the batch (fod.compare's map error)
    batch_err = max(
        compare_outputs(out.score[i : i + 1], out.anomaly_map[i : i + 1], a.score, a.anomaly_map).map_max_rel_err
        for i, a in enumerate(alone)
    )
    return {
        "images": len(images),
        "score_max_rel_err": score_err,
        "map_max_rel_err": map_err,
        "batch_max_rel_err": batch_err,
        "tolerance": {"score": SCORE_RTOL, "map": MAP_RTOL, "batch": BATCH_RTOL},
        "passed": bool(score_err < SCORE_RTOL and map_err < MAP_RTOL and batch_err < BATCH_RTOL),
    }


def parity_images(model: FODModel, record: dict[str, Any], data: str | Path | None, count: int = 8) -> tuple[
    np.ndarray, str
]:
    """Images for the parity check: from ``data`` if given, else the training folder of the record
    if it still exists, else synthetic noise (said in the returned description).
    """
    from fod.data import list_images, load_images, train_folder

    size = (model.config.image_size, model.config.image_size)
    root = data if data is not None else record.get("data", {}).get("root")
    if root is not None and Path(root).is_dir():
        folder = train_folder(root) if data is None or (Path(root) / "train").is_dir() else Path(root)
        paths = list_images(folder)
        pick = [paths[i] for i in np.linspace(0, len(paths) - 1, min(count, len(paths))).astype(int)]
        return load_images(pick, size), f"{len(pick)} real images from {folder}"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, *size, 3), dtype=np.uint8), f"{count} synthetic noise images"


def export_package(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    data: str | Path | None = None,
    force: bool = False,
) -> tuple[ModelPackage, dict[str, Any]]:
    """Export a training run to a model package and check parity.

    Args:
        run_dir: ``fod train`` output folder.
        out_dir: package folder (created; an existing ``model.onnx`` is replaced).
        opset: ONNX opset (17 by default: TensorRT 10 and 11 parse it).
        data: images for the parity check (default: the training folder, if present).
        force: write the package even when parity fails.

    Returns:
        the loaded package and a report (ops, size, parity).

    Raises:
        CheckpointError: unreadable checkpoint. FodError: parity failed (unless ``force``).
    """
    model, record = load_checkpoint(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    ops = export_onnx(model, onnx_path, opset=opset)
    images, source = parity_images(model, record, data)
    parity = check_parity(model, onnx_path, images)
    parity["source"] = source
    log.info("parity: %s", parity)
    if not parity["passed"] and not force:
        onnx_path.unlink()
        raise FodError(
            f"{onnx_path}: ONNX Runtime differs from PyTorch beyond tolerance ({parity}); "
            "not written (use --force to keep it anyway)"
        )
    s = model.config.image_size
    data_fp = record.get("data") or {"count": 0, "sha256": "", "root": "unknown"}
    import onnxruntime

    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model_name=Path(run_dir).resolve().name,
        created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        image_size=(s, s),
        backbone=model.config.backbone,
        input=InputSpec(name="image", dtype="uint8", shape=["N", s, s, 3]),
        outputs=[
            TensorSpec(name="anomaly_map", dtype="float32", shape=["N", 1, s, s]),
            TensorSpec(name="score", dtype="float32", shape=["N"]),
        ],
        files={"model.onnx": sha256_file(onnx_path)},
        checkpoint_sha256=sha256_file(Path(run_dir) / CHECKPOINT_NAME if Path(run_dir).is_dir() else run_dir),
        training_data=DataFingerprint(**data_fp),
        export={
            "opset": opset,
            "fod": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            "model_config": model.config.to_dict(),
            "training": {k: v for k, v in record.items() if k not in ("history", "data")},
        },
        parity=parity,
    )
    write_manifest(out, manifest)
    report = {"ops": ops, "size_mb": round(onnx_path.stat().st_size / 1e6, 2), "parity": parity}
    return ModelPackage(out), report
