"""FP16 and INT8 (Q/DQ) variants of a package's FP32 graph, and a latency measurement.

* INT8: ONNX Runtime's ``quantize_static`` in QDQ format: per-channel symmetric INT8 weights and (for
  TensorRT) symmetric INT8 activations, only on the Conv / MatMul / Gemm nodes that
  :func:`calibration.graph.select_int8_nodes` picks; the attention, softmax, KL and scoring tail
  stay FP32. TensorRT 10/11 builds strongly typed engines from these explicit Q/DQ graphs.
* FP16: ``onnxruntime.transformers.float16.convert_float_to_float16`` (ONNX Runtime's maintained fork
  of ``onnxconverter-common``'s converter; the original 1.16 writes graphs ORT cannot load when a
  blocked node produces a graph output) with FP32 inputs/outputs, the ops of
  :data:`calibration.graph.FP16_BLOCKED_OPS` and the nodes of
  :func:`calibration.graph.fp16_blocked_nodes` kept in FP32.

Why ONNX Runtime's quantizer and not NVIDIA ModelOpt: see ``docs/calibration.md`` (in short: it is
already in the environment, runs on the CPU, and ``nvidia-modelopt[onnx]`` installs
``onnxruntime-gpu`` next to ``onnxruntime``, two packages that shadow each other).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import onnx

from calibration.errors import QuantizationError
from calibration.graph import (
    FP16_BLOCKED_OPS,
    INT8_OP_TYPES,
    fp16_blocked_nodes,
    keep_float_consumers,
    name_nodes,
    remove_fp16_round_trips,
    select_int8_nodes,
)

log = logging.getLogger(__name__)

CalibMethod = Literal["minmax", "percentile", "entropy"]
Target = Literal["tensorrt", "cpu"]
Scope = Literal["transformer", "all", "backbone"]


@dataclass(frozen=True)
class Int8Settings:
    """How the INT8 variant is made (recorded in the manifest).

    Attributes:
        calibrate_method: ``minmax`` (default), ``percentile`` (99.999th) or ``entropy``.
        target: ``tensorrt``: symmetric INT8 activations (what TensorRT requires), dedicated Q/DQ
            pairs, FP32 biases; ``cpu``: asymmetric UINT8 activations and INT32 biases (the
            layout ONNX Runtime's CPU kernels fuse; not for TensorRT).
        per_channel: per-output-channel weight scales.
        keep_last_matmul: keep each branch's last MatMul (reconstruction head) in FP32.
        scope: ``transformer`` (default): only the MatMul / Gemm nodes of the FOD levels; ``all``:
            also the backbone's Convs; ``backbone``: only the Convs. On magnetic-tile, INT8 backbone
            convolutions (EfficientNet-Lite0) cut the score correlation with FP32 to 0.8 and the
            AUROC by 0.09, the transformer alone kept 0.993 / -0.003 (docs/calibration.md).
        preprocess: run ONNX Runtime's ``quant_pre_process`` (shape inference and basic fusions,
            e.g. BatchNorm into Conv) first.
    """

    calibrate_method: CalibMethod = "minmax"
    target: Target = "tensorrt"
    per_channel: bool = True
    keep_last_matmul: bool = False
    scope: Scope = "transformer"
    preprocess: bool = True


def _calibration_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if name not in methods:
        raise QuantizationError(f"unknown calibration method {name!r}; choose one of {sorted(methods)}")
    return methods[name]


def _preprocess(src: Path, dst: Path) -> bool:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return True
    except Exception as exc:  # symbolic shape inference fails on some graphs: carry on without it
        log.warning("quant_pre_process failed (%s); quantizing the graph as exported", exc)
        return False


def quantize_int8(
    fp32_path: str | Path, out_path: str | Path, reader: Any, settings: Int8Settings | None = None
) -> dict[str, Any]:
    """Write an INT8 Q/DQ variant of ``fp32_path`` calibrated with ``reader``.

    Args:
        fp32_path: the FP32 ONNX file.
        out_path: where to write the Q/DQ ONNX file.
        reader: an ``onnxruntime.quantization.CalibrationDataReader`` over good images
            (:class:`calibration.reader.ImageCalibrationDataReader`).
        settings: :class:`Int8Settings`; None uses the defaults.

    Returns:
        Report: settings, counts of quantized / excluded nodes with reasons, Q/DQ node count, seconds.

    Raises:
        QuantizationError: the quantizer fails or nothing can be quantized.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    settings = settings or Int8Settings()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fod_int8_") as tmp:
        src = Path(fp32_path)
        preprocessed = False
        if settings.preprocess:
            pre = Path(tmp) / "pre.onnx"
            preprocessed = _preprocess(src, pre)
            if preprocessed:
                src = pre
        model = onnx.load(str(src))
        name_nodes(model)
        selection = select_int8_nodes(model, keep_last_matmul=settings.keep_last_matmul, scope=settings.scope)
        if not selection.quantize:
            raise QuantizationError(
                f"{fp32_path}: no Conv / MatMul / Gemm node can be quantized "
                f"({len(selection.excluded)} excluded); "
                "INT8 would bring no speed-up: use --precision fp16"
            )
        named = Path(tmp) / "named.onnx"
        onnx.save(model, str(named))
        trt = settings.target == "tensorrt"
        extra: dict[str, Any] = {
            "ActivationSymmetric": trt,
            "WeightSymmetric": True,
            "DedicatedQDQPair": trt,
            # TensorRT's DequantizeLinear takes INT8/FP8/INT4 only, not INT32 biases: it fuses FP32 biases itself
            "QuantizeBias": not trt,
            # ...and then the weight scales need no widening to keep INT32 biases in range
            "QDQDisableWeightAdjustForInt32Bias": trt,
            "OpTypesToExcludeOutputQuantization": list(INT8_OP_TYPES),
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        }
        if settings.calibrate_method == "percentile":
            extra["CalibPercentile"] = 99.999
        try:
            quantize_static(
                str(named),
                str(Path(tmp) / "q.onnx"),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(INT8_OP_TYPES),
                nodes_to_quantize=selection.quantize,
                per_channel=settings.per_channel,
                reduce_range=False,
                activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=_calibration_method(settings.calibrate_method),
                extra_options=extra,
            )
        except Exception as exc:  # the quantizer raises plain exceptions of many kinds
            raise QuantizationError(f"{fp32_path}: ONNX Runtime quantize_static failed: {exc}") from exc
        qmodel = onnx.load(str(Path(tmp) / "q.onnx"))
    rewired = keep_float_consumers(qmodel, set(selection.quantize))
    onnx.save(qmodel, str(out_path))
    ops = [n.op_type for n in qmodel.graph.node]
    reasons: dict[str, int] = {}
    for why in selection.excluded.values():
        reasons[why] = reasons.get(why, 0) + 1
    return {
        "settings": asdict(settings),
        "preprocessed": preprocessed,
        "quantized_nodes": len(selection.quantize),
        "fp32_nodes_of_quantizable_types": len(selection.excluded),
        "excluded_reasons": reasons,
        "excluded_nodes": dict(sorted(selection.excluded.items())[:200]),
        "q_nodes": ops.count("QuantizeLinear"),
        "dq_nodes": ops.count("DequantizeLinear"),
        "fp32_consumers_rewired": rewired,
        "seconds": round(time.perf_counter() - start, 2),
    }


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Write a mixed-precision FP16 variant of ``fp32_path`` (FP32 inputs and outputs).

    Args:
        fp32_path: the FP32 ONNX file.
        out_path: where to write the FP16 ONNX file.

    Returns:
        Report: blocked op types, number of nodes kept FP32 by graph rules, Cast count, seconds.

    Raises:
        QuantizationError: the conversion fails.
    """
    from onnxruntime.transformers import float16

    start = time.perf_counter()
    model = onnx.load(str(fp32_path))
    name_nodes(model)
    blocked = fp16_blocked_nodes(model)
    op_block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP16_BLOCKED_OPS))
    try:
        half = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=op_block,
            node_block_list=sorted(blocked),
            disable_shape_infer=False,
        )
    except Exception as exc:  # the converter raises plain exceptions of many kinds
        raise QuantizationError(f"{fp32_path}: FP16 conversion failed: {exc}") from exc
    round_trips = remove_fp16_round_trips(half)
    onnx.save(half, str(out_path))
    ops = [n.op_type for n in half.graph.node]
    return {
        "settings": {"keep_io_types": True, "op_block_list": [o for o in op_block if o in FP16_BLOCKED_OPS]},
        "fp32_nodes_by_graph_rule": len(blocked),
        "cast_nodes": ops.count("Cast"),
        "fp16_round_trips_removed": round_trips,
        "seconds": round(time.perf_counter() - start, 2),
    }


def compare_latency(
    onnx_paths: dict[str, Path],
    image_size: tuple[int, int],
    batch: int = 1,
    repeats: int = 10,
    *,
    warmup: int = 2,
    intra_op_threads: int | None = None,
    providers: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Latency of several ONNX files on ONNX Runtime, timed interleaved by :func:`fod.timing.time_runners`.

    Every round runs each model once on the same random ``[batch, H, W, 3]`` uint8 batch
    (:func:`fod.timing.random_images`), so that load on a shared CPU hits all models alike; this is
    the same timing loop as ``fod bench``.

    Args:
        onnx_paths: label (e.g. ``fp32``) -> ONNX file.
        image_size: ``(height, width)`` in px.
        batch: images per call.
        repeats: timed calls per model (``>= 1``).
        warmup: untimed calls per model first.
        intra_op_threads: ONNX Runtime threads; None lets ORT use every core.
        providers: ORT execution providers; None = best available.

    Returns:
        label -> ``{onnx, provider}`` plus the fields of :class:`fod.timing.Timing` (``batch, calls,
        p50_ms, p95_ms, mean_ms, min_ms, max_ms, per_frame_ms, frames_per_s``; ms per call,
        ``per_frame_ms`` = p50 / batch).

    Raises:
        fod.errors.InputError: ``repeats < 1``.
        fod.errors.FodError: a model cannot be loaded or run (named by the runner).
    """
    from contextlib import ExitStack

    from fod.runner import OnnxRuntimeRunner
    from fod.timing import random_images, time_runners

    images = random_images(batch, image_size)
    runners = {
        k: OnnxRuntimeRunner(p, image_size, providers=providers, intra_op_threads=intra_op_threads)
        for k, p in onnx_paths.items()
    }
    with ExitStack() as stack:
        for r in runners.values():
            stack.enter_context(r)
        timings = time_runners(runners, images, repeats=repeats, warmup=warmup)
        return {
            k: {"onnx": str(onnx_paths[k]), "provider": (r.active_providers or ["?"])[0], **asdict(timings[k])}
            for k, r in runners.items()
        }


def measure_latency(
    onnx_path: str | Path, image_size: tuple[int, int], batch: int = 1, repeats: int = 10
) -> dict[str, Any]:
    """Latency of one ONNX file on ONNX Runtime (see :func:`compare_latency` for the fields).

    Args:
        onnx_path: the ONNX file.
        image_size: ``(height, width)`` in px.
        batch: images per call.
        repeats: timed calls.

    Returns:
        ``{onnx, provider, batch, calls, p50_ms, p95_ms, mean_ms, min_ms, max_ms, per_frame_ms, frames_per_s}``.
    """
    return compare_latency({"model": Path(onnx_path)}, image_size, batch, repeats)["model"]
