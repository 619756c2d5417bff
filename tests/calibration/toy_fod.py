"""A small FOD-shaped graph for calibration tests: something real to quantize, built in milliseconds.

Same I/O contract as the real package (``image`` uint8 [N, H, W, 3] BGR -> ``anomaly_map`` float32
[N, 1, H, W], ``score`` float32 [N]) and the same kinds of nodes the real FOD graph has:

* two strided Convs + Relu (the backbone) -> tokens X [N, L, C];
* a projection MatMul with a constant weight (quantizable);
* attention logits against folded reference keys (MatMul with a constant, feeding a Softmax),
  Softmax, attention x folded reference values (MatMul of softmax output): must stay FP32;
* an RBF target ``softmax(-D / (2 sigma^2))`` with a learned sigma so small that ``sigma^2``
  underflows in FP16 (the real model's hazard), a KL divergence (Log, ReduceSum) and a
  reconstruction head MatMul;
* the scoring tail: patch score = rec x KL, Resize to H x W, a smoothing Conv with constant
  weights (must stay FP32 although it is a Conv), ReduceMax.

Weights are random (seeded) but the reference keys / values are computed from a mid-grey image,
so flat grey images score low and images with bright blobs score high.
Built with ``onnx.helper`` + numpy (no torch export: the exporter takes seconds, this takes ms).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.toy_package import write_package_manifest


def _conv_np(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """Reference conv (NCHW, pad 1, 3x3) in numpy, to compute the folded reference features."""
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    oh, ow = (h + 2 - 3) // stride + 1, (wd + 2 - 3) // stride + 1
    out = np.zeros((n, w.shape[0], oh, ow), np.float32)
    for i in range(3):
        for j in range(3):
            patch = xp[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + b[None, :, None, None]


def make_toy_fod_model(image_size: tuple[int, int] = (64, 64), seed: int = 0) -> onnx.ModelProto:
    """Return the toy FOD graph for ``image_size`` (both sides divisible by 4)."""
    rng = np.random.default_rng(seed)
    h, w = image_size
    c1, c2, d = 8, 16, 16
    hh, ww = h // 4, w // 4
    n_tok = hh * ww
    w1 = (rng.standard_normal((c1, 3, 3, 3)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(c1) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((c2, c1, 3, 3)) * 0.15).astype(np.float32)
    b2 = (rng.standard_normal(c2) * 0.1).astype(np.float32)
    wp = (rng.standard_normal((c2, d)) / np.sqrt(c2)).astype(np.float32)
    wo = (rng.standard_normal((d, c2)) / np.sqrt(d)).astype(np.float32)
    # reference features: the backbone on a mid-grey image (what "good" looks like)
    grey = np.full((1, 3, h, w), (128.0 - 127.5) / 64.0, np.float32)
    f = np.maximum(_conv_np(np.maximum(_conv_np(grey, w1, b1, 2), 0), w2, b2, 2), 0)
    ref_tokens = f.reshape(c2, n_tok).T  # [L, C]
    k_ref = (ref_tokens @ wp).T.astype(np.float32)  # [d, L]
    v_ref = (ref_tokens @ wp).astype(np.float32)  # [L, d]
    # RBF target with a learned per-token sigma in (1e-4, 5e-4) grid cells: sigma^2 underflows in FP16
    yy, xx = np.divmod(np.arange(n_tok), ww)
    dist = ((yy[:, None] - yy[None]) ** 2 + (xx[:, None] - xx[None]) ** 2).astype(np.float32)
    ws = (rng.standard_normal((c2, 1)) * 0.3).astype(np.float32)
    g = cv2.getGaussianKernel(9, 2.0).astype(np.float32)
    smooth = (g @ g.T)[None, None].astype(np.float32)
    inits = [
        numpy_helper.from_array(a, name)
        for name, a in {
            "w1": w1,
            "b1": b1,
            "w2": w2,
            "b2": b2,
            "wp": wp,
            "wo": wo,
            "k_ref": k_ref,
            "v_ref": v_ref,
            "dist": dist,
            "ws": ws,
            "sig_scale": np.array(4e-4, np.float32),
            "sig_min": np.array(1e-4, np.float32),
            "half": np.array(0.5, np.float32),
            "smooth": smooth,
            "mean": np.array(127.5, np.float32),
            "scale": np.array(1 / 64.0, np.float32),
            "att_scale": np.array(1 / np.sqrt(d), np.float32),
            "eps": np.array(1e-4, np.float32),
            "shape_tok": np.array([0, c2, n_tok], np.int64),
            "shape_map": np.array([0, 1, hh, ww], np.int64),
            "ax_last": np.array([-1], np.int64),
            "ax_chw": np.array([1, 2, 3], np.int64),
        }.items()
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["xf"], ["xt"], perm=[0, 3, 1, 2]),
        helper.make_node("Sub", ["xt", "mean"], ["xc"]),
        helper.make_node("Mul", ["xc", "scale"], ["xn"]),
        helper.make_node("Conv", ["xn", "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["feat"]),
        helper.make_node("Reshape", ["feat", "shape_tok"], ["tok_cl"]),
        helper.make_node("Transpose", ["tok_cl"], ["tokens"], perm=[0, 2, 1]),  # X [N, L, C]
        helper.make_node("MatMul", ["tokens", "wp"], ["q"], name="proj"),
        helper.make_node("MatMul", ["q", "k_ref"], ["logits"], name="attn_logits"),
        helper.make_node("Mul", ["logits", "att_scale"], ["logits_s"]),
        helper.make_node("Softmax", ["logits_s"], ["attn"], axis=-1),
        helper.make_node("MatMul", ["attn", "v_ref"], ["ctx"], name="attn_values"),
        helper.make_node("MatMul", ["ctx", "wo"], ["recon"], name="head"),
        # target = softmax(-D / (2 sigma^2)), sigma = 1e-4 + 4e-4 * sigmoid(tokens @ ws)
        helper.make_node("MatMul", ["tokens", "ws"], ["sigma_raw"], name="sigma_proj"),
        helper.make_node("Sigmoid", ["sigma_raw"], ["sigma_sig"]),
        helper.make_node("Mul", ["sigma_sig", "sig_scale"], ["sigma_scaled"]),
        helper.make_node("Add", ["sigma_scaled", "sig_min"], ["sigma"]),
        helper.make_node("Mul", ["sigma", "sigma"], ["sigma2"]),
        helper.make_node("Reciprocal", ["sigma2"], ["inv_sigma2"]),
        helper.make_node("Mul", ["inv_sigma2", "half"], ["inv_half"]),
        helper.make_node("Mul", ["dist", "inv_half"], ["dist_scaled"]),
        helper.make_node("Neg", ["dist_scaled"], ["target_logits"]),
        helper.make_node("Softmax", ["target_logits"], ["target"], axis=-1),
        helper.make_node("Add", ["target", "eps"], ["target_eps"]),
        helper.make_node("Log", ["target_eps"], ["log_target"]),
        # KL(target || attn) per token
        helper.make_node("Add", ["attn", "eps"], ["attn_eps"]),
        helper.make_node("Log", ["attn_eps"], ["log_attn"]),
        helper.make_node("Sub", ["log_target", "log_attn"], ["log_ratio"]),
        helper.make_node("Mul", ["target", "log_ratio"], ["kl_terms"]),
        helper.make_node("ReduceSum", ["kl_terms", "ax_last"], ["kl"], keepdims=0),
        # reconstruction error per token
        helper.make_node("Sub", ["tokens", "recon"], ["diff"]),
        helper.make_node("Mul", ["diff", "diff"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "ax_last"], ["rec"], keepdims=0),
        helper.make_node("Mul", ["rec", "kl"], ["patch"]),
        helper.make_node("Reshape", ["patch", "shape_map"], ["pmap"]),
        helper.make_node("Shape", ["pmap"], ["pmap_shape"]),
        helper.make_node("Slice", ["pmap_shape", "zero", "one"], ["n_dim"]),
        helper.make_node("Concat", ["n_dim", "tail_sizes"], ["out_sizes"], axis=0),
        helper.make_node("Resize", ["pmap", "", "", "out_sizes"], ["up"], mode="linear"),
        helper.make_node("Conv", ["up", "smooth"], ["anomaly_map"], pads=[4, 4, 4, 4], name="smoothing"),
        helper.make_node("ReduceMax", ["anomaly_map", "ax_chw"], ["score"], keepdims=0),
    ]
    inits += [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([1, h, w], np.int64), "tail_sizes"),
    ]
    graph = helper.make_graph(
        nodes,
        "toy_fod_calibration",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", h, w, 3])],
        [
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", 1, h, w]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_toy_fod_package(root: Path, image_size: tuple[int, int] = (64, 64)) -> Path:
    """Write a valid model package with the toy FOD graph into ``root``; return ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(make_toy_fod_model(image_size), str(root / "model.onnx"))
    write_package_manifest(root, image_size, model_name="toy_fod", backbone="toy")
    return root


def write_synthetic_images(
    folder: Path, n: int, *, defect: bool, seed: int, size: tuple[int, int] = (80, 72)
) -> list[Path]:
    """Write ``n`` PNGs: grey texture (good) or grey texture with a bright/dark blob (defect).

    Returns the files. Defect images also get a mask ``<stem>_mask.png`` in ``folder/../masks``
    when ``folder.parent.parent / 'ground_truth'`` is wanted by the caller (see :func:`make_mvtec`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = np.clip(128 + rng.normal(0, 6, size=(*size, 3)), 0, 255).astype(np.uint8)
        if defect:
            cy, cx = rng.integers(15, size[0] - 15), rng.integers(15, size[1] - 15)
            value = 255 if i % 2 == 0 else 0
            cv2.circle(img, (int(cx), int(cy)), int(rng.integers(5, 10)), (value, value, value), -1)
        path = folder / f"{i:03d}.png"
        cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def make_mvtec(root: Path, *, n_train: int = 24, n_good: int = 40, n_defect: int = 12) -> Path:
    """Synthetic MVTec-layout folder: train/good, test/good, test/blob (+ ground_truth masks)."""
    write_synthetic_images(root / "train" / "good", n_train, defect=False, seed=1)
    write_synthetic_images(root / "test" / "good", n_good, defect=False, seed=2)
    paths = write_synthetic_images(root / "test" / "blob", n_defect, defect=True, seed=3)
    gt = root / "ground_truth" / "blob"
    gt.mkdir(parents=True, exist_ok=True)
    for p in paths:
        img = np.asarray(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE))
        mask = np.asarray((img > 200) | (img < 60), np.uint8) * 255
        cv2.imwrite(str(gt / f"{p.stem}_mask.png"), mask)
    return root
