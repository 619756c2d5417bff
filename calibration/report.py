"""Human-readable reports of ``fod calibrate`` and ``fod quantize``, and the score histogram PNG.

The text goes to stdout (and ``calibration_report.txt`` beside the manifest); the histogram of raw
image scores, good vs defect, with the chosen and the F1-optimal thresholds, is saved as
``calibration_scores.png`` beside the manifest (matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fod.package import Calibration


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * float(value):.2f}%"


def format_calibration_report(calibration: Calibration, previous: Calibration | None = None) -> str:
    """Render a calibration (as written to the manifest) as a readable text report.

    Args:
        calibration: the new calibration; its ``details`` hold the fit, the labelled evaluation
            (``labelled``), the pixel evaluation (``pixels``) and the sources.
        previous: the calibration it replaced, if any (its thresholds are listed).

    Returns:
        Multi-line text (no trailing newline).
    """
    d = calibration.details
    fit = d.get("fit", {})
    lines = [
        "fod calibrate report",
        "====================",
        f"good images       : {calibration.n_normal}  ({d.get('normal_source', '?')})",
        f"defect images     : {d.get('n_defect', 0)}  ({d.get('defect_source') or 'none given'})",
        f"good scores       : min {_fmt(fit.get('good_stats', {}).get('min'))}  "
        f"median {_fmt(fit.get('good_stats', {}).get('median'))}  max "
        f"{_fmt(fit.get('good_stats', {}).get('max'))}",
        "",
        f"image threshold   : {calibration.image_threshold:.6g}   (score >= threshold -> NG)",
        f"rule              : {calibration.method}",
        f"target FAR        : {calibration.target_far:g} "
        + ("(demonstrable with this sample)" if fit.get("target_supported") else "(NOT demonstrable with this sample)"),
        f"FAR statement     : {fit.get('exceedances', '?')} of {calibration.n_normal} good images at or "
        f"above it; "
        f"95% upper bound {_fmt(calibration.far_upper_95)}, estimate {_fmt(calibration.expected_far)}",
        f"smallest FAR this sample can show at 95%: {_fmt(fit.get('min_demonstrable_far'))} (~3/n); "
        f"the target needs >= {fit.get('images_needed', '?')} good images",
        f"leave-one-out FAR : {_pct(d.get('far_leave_one_out'))} (refit without each good image, tested on it)",
        f"normalisation     : norm_min {calibration.norm_min:.6g} -> 0, threshold -> 0.5, "
        f"norm_max {calibration.norm_max:.6g} -> 1",
        f"pixel threshold   : {calibration.pixel_threshold:.6g}  ({d.get('pixel_rule', '')})",
    ]
    lab = d.get("labelled")
    if lab:
        f1o = lab.get("f1_optimal", {})
        lines += [
            "",
            f"with labelled defects (good images are the fitting set: FAR below is in-sample; "
            f"{lab.get('n_good')} good / {lab.get('n_defect')} defect):",
            f"  at the threshold : recall {_pct(lab.get('recall'))}, false alarms {lab.get('false_alarms')} "
            f"({_pct(lab.get('far'))}), precision {_pct(lab.get('precision'))}, F1 {_fmt(lab.get('f1'), 3)}",
            f"  image AUROC      : {_fmt(lab.get('image_auroc'))}",
            f"  F1-optimal       : threshold {_fmt(f1o.get('threshold'), 6)}, F1 {_fmt(f1o.get('f1'), 3)}, "
            f"recall {_pct(f1o.get('recall'))}, FAR {_pct(f1o.get('far'))}  (chosen on these labels: "
            f"optimistic)",
        ]
        for name, per in sorted(lab.get("recall_per_type", {}).items()):
            lines.append(f"    recall {name:<12}: {_pct(per['recall'])} of {per['n']}")
    else:
        lines += [
            "",
            "no labelled defects: recall and AUROC not measured (pass --anomalous DIR or an MVTec root)",
        ]
    pix = d.get("pixels")
    if pix:
        f1p = pix.get("f1_optimal", {})
        lines.append(
            f"pixels (masks)    : precision {_pct(pix.get('precision'))}, recall {_pct(pix.get('recall'))}, "
            f"F1 {_fmt(pix.get('f1'), 3)} at the pixel threshold; pixel AUROC "
            f"{_fmt(pix.get('pixel_auroc'))}; "
            f"F1-optimal pixel threshold {_fmt(f1p.get('threshold'), 6)} (F1 {_fmt(f1p.get('f1'), 3)})"
        )
    if previous is not None:
        lines += [
            "",
            f"replaced previous calibration: image threshold {previous.image_threshold:.6g} -> "
            f"{calibration.image_threshold:.6g}, pixel threshold {previous.pixel_threshold:.6g} -> "
            f"{calibration.pixel_threshold:.6g} (n={previous.n_normal} -> {calibration.n_normal})",
        ]
    if d.get("histogram"):
        lines.append(f"histogram         : {d['histogram']}")
    return "\n".join(lines)


def save_score_histogram(
    good_scores: np.ndarray,
    defect_scores: np.ndarray | None,
    threshold: float,
    path: str | Path,
    *,
    f1_threshold: float | None = None,
    title: str = "image scores",
) -> Path:
    """Save a histogram PNG of raw image scores, good vs defect, with the threshold(s) marked.

    Args:
        good_scores: ``[n_good]`` raw scores.
        defect_scores: ``[n_defect]`` raw scores, or None / empty.
        threshold: the chosen image threshold (solid red line).
        path: output PNG file.
        f1_threshold: the F1-optimal threshold (dashed line), optional.
        title: plot title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = np.asarray(good_scores, np.float64)
    bad = np.asarray(defect_scores if defect_scores is not None else [], np.float64)
    values = np.concatenate([good, bad, [threshold] + ([f1_threshold] if f1_threshold is not None else [])])
    bins = np.linspace(float(values.min()), float(values.max()), 50).tolist()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        ax.hist(good, bins=bins, alpha=0.6, color="tab:green", label=f"good (n={good.size})")
        if bad.size:
            ax.hist(bad, bins=bins, alpha=0.6, color="tab:red", label=f"defect (n={bad.size})")
        ax.axvline(threshold, color="black", linewidth=2, label=f"threshold {threshold:.4g}")
        if f1_threshold is not None:
            ax.axvline(f1_threshold, color="tab:blue", linestyle="--", label=f"F1-optimal {f1_threshold:.4g}")
        ax.set_xlabel("raw image score")
        ax.set_ylabel("images")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out


def format_gate_report(precision: str, entry: dict[str, Any]) -> str:
    """Render a variant's manifest entry (gate + quantization + latency) as text.

    Args:
        precision: ``fp16`` or ``int8``.
        entry: the dict written to ``manifest.variants[precision]``.

    Returns:
        Multi-line text (no trailing newline).
    """
    gate = entry.get("gate", {})
    m = gate.get("metrics", {})
    verdict = "PASSED" if gate.get("passed") else ("FAILED (written with --force)" if entry.get("forced") else "FAILED")
    lines = [
        f"fod quantize report: {precision} -> {entry.get('file')}",
        "=" * 40,
        f"accuracy gate     : {verdict} on {m.get('n_images')} images "
        f"({m.get('n_good')} good, {m.get('n_defect')} defect; {entry.get('val_source', '?')})",
        f"score correlation : Pearson {_fmt(m.get('score_pearson'), 5)}, Spearman {_fmt(m.get('score_spearman'), 5)}",
        _map_error_line(m),
    ]
    nf = m.get("fp32_noise_floor")
    if nf:
        noise_mean = nf.get("map_mean_rel_err", nf.get("map_mean_error"))  # old manifests: map_mean_error
        lines.append(
            f"noise floor       : FP32 vs FP32 on +-1 grey level noise: Pearson {_fmt(nf.get('score_pearson'), 5)}, "
            f"Spearman {_fmt(nf.get('score_spearman'), 5)}, mean map error {_pct(noise_mean)}"
            + (f", AUROC change {nf['auroc_change']:+.4f}" if nf.get("auroc_change") is not None else "")
        )
    if "auroc_fp32" in m:
        lines.append(
            f"image AUROC       : FP32 {_fmt(m['auroc_fp32'])}, {precision} {_fmt(m['auroc_variant'])}, "
            f"change {m['auroc_change']:+.4f}"
        )
    if "threshold" in m:
        lines.append(
            f"FP32 threshold    : {m['threshold']:.6g}; verdict agreement "
            f"{_pct(m.get('verdict_agreement'))}; "
            f"false alarms on good: FP32 {m.get('false_alarms_fp32')}, {precision} "
            f"{m.get('false_alarms_variant')}"
            + (
                f"; recall FP32 {_pct(m.get('recall_fp32'))}, {precision} {_pct(m.get('recall_variant'))}"
                if "recall_fp32" in m
                else ""
            )
        )
    lat = entry.get("latency")
    if lat:
        f32, var = lat.get("fp32", {}), lat.get(precision, {})
        lines.append(
            f"ORT CPU latency   : FP32 {_fmt(f32.get('p50_ms'))} ms, {precision} "
            f"{_fmt(var.get('p50_ms'))} ms "
            f"per call (batch {f32.get('batch')}, p50 of {f32.get('calls')}); speed-up "
            f"x{_fmt(lat.get('speedup'), 3)}"
        )
    q = entry.get("quantization", {})
    if "quantized_nodes" in q:
        lines.append(
            f"quantized nodes   : {q['quantized_nodes']} (Q {q.get('q_nodes')}, DQ "
            f"{q.get('dq_nodes')}); kept FP32: "
            + ", ".join(f"{v} {k}" for k, v in q.get("excluded_reasons", {}).items())
        )
    if "fp32_nodes_by_graph_rule" in q:
        lines.append(
            f"FP32 islands      : {q['fp32_nodes_by_graph_rule']} nodes by graph rule, {q.get('cast_nodes')} Casts"
        )
    for line in gate.get("failures", []):
        lines.append(f"  FAIL: {line}")
    for line in gate.get("skipped", []):
        lines.append(f"  skipped: {line}")
    return "\n".join(lines)


def _map_error_line(m: dict[str, Any]) -> str:
    """The map-error line of a gate report; reads manifests written before :mod:`fod.compare` too."""
    if "map_max_rel_err" in m:
        return (
            f"anomaly map error : max {_pct(m.get('map_max_rel_err'))}, mean {_pct(m.get('map_mean_rel_err'))} "
            f"of the largest FP32 map value ({_fmt(m.get('map_scale'))})"
        )
    return (  # manifests written before 0.2: relative to the FP32 map range
        f"anomaly map error : max {_pct(m.get('map_max_error'))}, mean {_pct(m.get('map_mean_error'))} "
        f"of the FP32 map range ({_fmt(m.get('map_range_fp32'))})"
    )
