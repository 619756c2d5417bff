"""``fod bench``: model latency per backend and precision, and the end-to-end agent, on this machine.

    fod bench --model PKG_DIR [--checkpoint RUN_DIR] [--batch N] [--repeats R] [--warmup W]
              [--threads T] [--agent/--no-agent] [--frames N] [--long-frames N] [--broker URL]
              [--source DIR] [--quick] [--json OUT]

Two parts, one run:

1. **Model latency** (this module): every backend that can run here on the same random uint8
   ``[B, H, W, 3]`` batch, at batch 1 and batch ``--batch``: PyTorch eager (``--checkpoint``, when
   torch imports), ONNX Runtime for each ONNX variant of the package (``model.onnx``,
   ``model.fp16.onnx``, ``model.int8.onnx``), TensorRT for each engine of the package when
   TensorRT runs here. The backends are timed *interleaved* (one call of each per round), so that
   load from other processes on a shared machine hits all of them alike; warm-up calls are not
   timed. Reported per call: p50 / p95 / mean / min in ms, ms per frame (p50 / batch) and frames/s
   (batch x calls / total time). Then the latency ratios ONNX Runtime / PyTorch and variant / FP32.
2. **End-to-end agent** (:mod:`fod_tools.bench.agent`): the real :class:`agent.pipeline.Agent` against an
   MQTT broker, with capture->publish latency, sustained FPS, the agent / bare-backend throughput
   ratio, frame age and drops when the source outruns the model, and resident memory over a long run.

``--quick`` shrinks repeats and frame counts so the whole run takes seconds on a tiny model (tests,
smoke checks); the numbers are then indicative only. The output is a Markdown table (paste it
into the README) and, with ``--json OUT``, the same numbers with the machine description.
No torch is imported unless ``--checkpoint`` is given. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends import tensorrt_status
from fod import __version__
from fod.errors import InputError
from fod.package import VARIANT_FILES, ModelPackage
from fod.runner import OnnxRuntimeRunner, Runner
from fod.timing import random_images, time_runners

log = logging.getLogger(__name__)

BENCH_SCHEMA_VERSION = 1
"""Version of the JSON written by ``fod bench --json``; bumped on an incompatible change."""

DEFAULT_BATCH = 8
DEFAULTS = {"repeats": 30, "warmup": 3, "frames": 500, "long_frames": 10_000}
QUICK = {"repeats": 5, "warmup": 1, "frames": 60, "long_frames": 300}


# ---------------------------------------------------------------------------------------------- machine


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpu_model() -> str:
    info = _read_text("/proc/cpuinfo")
    for key in ("model name", "Hardware", "Model", "cpu model"):
        for line in info.splitlines():
            if line.split(":")[0].strip() == key and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    for line in _read_text("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def _version(distribution: str, *modules: str) -> str | None:
    """Installed version of a distribution (or of an already imported module), without importing it."""
    for module in modules:
        if module in sys.modules:
            version = getattr(sys.modules[module], "__version__", None)
            if version:
                return str(version)
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Describe this machine for the benchmark record (never raises, imports no torch).

    Returns:
        ``cpu`` (model name from /proc/cpuinfo), ``cores`` (logical), ``cores_usable`` (this
        process's CPU affinity), ``ram_gib``, ``board`` (device-tree model, e.g. a Jetson),
        ``os``, ``python``, ``load_avg_1m`` (system load when the benchmark started: a busy shared
        machine slows every number), versions of onnxruntime / torch / tensorrt / opencv / numpy,
        ``onnxruntime_providers`` and ``tensorrt`` (whether it runs here, and why not).
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    providers: list[str] = []
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except ImportError:
        pass
    trt_ok, trt_reason = tensorrt_status()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "ram_gib": _mem_total_gib(),
        "board": _read_text("/proc/device-tree/model").strip("\x00\n ") or None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_avg_1m": load,
        "versions": {
            "fod": __version__,
            "onnxruntime": _version("onnxruntime", "onnxruntime") or _version("onnxruntime-gpu"),
            "torch": _version("torch", "torch"),
            "tensorrt": _version("tensorrt", "tensorrt"),
            "opencv": _version("opencv-python-headless", "cv2") or _version("opencv-python"),
            "numpy": np.__version__,
        },
        "onnxruntime_providers": providers,
        "tensorrt": {"available": trt_ok, "detail": trt_reason},
    }


# ---------------------------------------------------------------------------------------------- model part


@dataclass
class Candidate:
    """One backend + precision to time.

    Attributes:
        backend: ``pytorch``, ``onnxruntime`` or ``tensorrt``.
        precision: ``fp32``, ``fp16`` or ``int8``.
        model_file: the checkpoint, ONNX file or engine.
        make: creates the (inactive) runner.
        runner: the active runner once activated.
        detail: provider, threads, engine batch range: what a reader needs to interpret the number.
    """

    backend: str
    precision: str
    model_file: Path
    make: Callable[[], Runner]
    runner: Runner | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``backend/precision``."""
        return f"{self.backend}/{self.precision}"


def model_candidates(
    package: ModelPackage, *, checkpoint: Path | None, threads: int | None
) -> tuple[list[Candidate], list[dict[str, str]]]:
    """Every backend and precision that could run here for this package.

    Args:
        package: the validated model package.
        checkpoint: a ``fod train`` run folder for PyTorch eager, or None.
        threads: intra-op threads for ONNX Runtime and PyTorch; None = their defaults.

    Returns:
        ``(candidates, skipped)``; ``skipped`` lists ``{backend, precision, reason}`` for what was
        looked for and cannot run (no torch, no engine, TensorRT missing).
    """
    candidates: list[Candidate] = []
    skipped: list[dict[str, str]] = []
    if checkpoint is not None:
        try:
            import torch  # noqa: F401 - only to see whether it imports

            from fod.torch_runner import TorchRunner
        except ImportError as exc:
            skipped.append({"backend": "pytorch", "precision": "fp32", "reason": f"torch does not import: {exc}"})
        else:
            candidates.append(Candidate("pytorch", "fp32", checkpoint, lambda: TorchRunner(checkpoint, device="cpu")))
    for precision, name in VARIANT_FILES.items():
        path = package.root / name
        if not path.is_file():
            skipped.append({"backend": "onnxruntime", "precision": precision, "reason": f"no {name} in the package"})
            continue
        candidates.append(
            Candidate(
                "onnxruntime",
                precision,
                path,
                lambda p=path: OnnxRuntimeRunner(p, package.image_size, intra_op_threads=threads),  # type: ignore[misc]
            )
        )
    trt_ok, trt_reason = tensorrt_status()
    if not trt_ok:
        skipped.append({"backend": "tensorrt", "precision": "*", "reason": trt_reason})
    else:
        from engine_build.manifest import find_engine
        from engine_build.runner import TensorRTRunner

        for precision in VARIANT_FILES:
            engine = find_engine(package.root, precision)
            if engine is None:
                skipped.append(
                    {
                        "backend": "tensorrt",
                        "precision": precision,
                        "reason": "no engine; build it with "
                        f"`fod build --model {package.root} --precision {precision}`",
                    }
                )
                continue
            candidates.append(
                Candidate(
                    "tensorrt",
                    precision,
                    engine,
                    lambda e=engine: TensorRTRunner(e, package.image_size, package_dir=package.root),  # type: ignore[misc]
                )
            )
    return candidates, skipped


def _activate(candidate: Candidate, package: ModelPackage, threads: int | None) -> None:
    """Create and activate the runner; fill in ``detail``. Raises whatever the backend raises."""
    runner = candidate.make()
    if candidate.backend == "pytorch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        if tuple(runner.image_size) != tuple(package.image_size):
            raise InputError(
                f"checkpoint {candidate.model_file} has image size {list(runner.image_size)} but the package "
                f"{package.root} has {list(package.image_size)}; pass the run folder the package was exported from"
            )
        candidate.detail.update(device="cpu", threads=torch.get_num_threads(), torch=torch.__version__)
        candidate.detail["same_model_as_package"] = _same_checkpoint(candidate.model_file, package)
    runner.activate()
    candidate.runner = runner
    if isinstance(runner, OnnxRuntimeRunner):
        candidate.detail.update(providers=runner.active_providers, threads=threads or "ort default (all cores)")
    max_batch = getattr(runner, "max_batch", None)
    if candidate.backend == "tensorrt" and max_batch:
        candidate.detail["engine_max_batch"] = int(max_batch)


def _same_checkpoint(run_dir: Path, package: ModelPackage) -> bool | None:
    """Whether the checkpoint's sha256 is the one recorded in the package (None when unknown)."""
    try:
        from fod.checkpoint import CHECKPOINT_NAME
        from fod.package import sha256_file

        file = run_dir / CHECKPOINT_NAME if run_dir.is_dir() else run_dir
        return sha256_file(file) == package.manifest.checkpoint_sha256
    except (ImportError, OSError, AttributeError):
        return None


def bench_models(
    package: ModelPackage,
    *,
    checkpoint: Path | None = None,
    batch: int = DEFAULT_BATCH,
    repeats: int = DEFAULTS["repeats"],
    warmup: int = DEFAULTS["warmup"],
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time every available backend and precision at batch 1 and ``batch``.

    Args:
        package: the validated model package.
        checkpoint: a ``fod train`` run folder (PyTorch eager), or None.
        batch: the second batch size (``>= 1``; 1 times batch 1 only).
        repeats: timed calls per backend and batch size.
        warmup: untimed calls per backend and batch size.
        threads: intra-op threads for ONNX Runtime and PyTorch; None = their defaults.
        progress: called with a one-line status message per step (None = silent).

    Returns:
        ``{"results": [...], "ratios": [...], "skipped": [...], "input": {...}}``; each result is
        ``{backend, precision, model_file, size_mb, detail, batch, calls, p50_ms, p95_ms, mean_ms,
        min_ms, max_ms, per_frame_ms, frames_per_s}``; each ratio is ``{comparison, candidate,
        reference, batch, latency_ratio, speedup}`` from the p50 per call.

    Raises:
        InputError: ``batch`` or ``repeats`` below 1.
    """
    if batch < 1 or repeats < 1:
        raise InputError(f"--batch and --repeats must be >= 1 (got batch {batch}, repeats {repeats})")
    say = progress or (lambda _msg: None)
    candidates, skipped = model_candidates(package, checkpoint=checkpoint, threads=threads)
    active: list[Candidate] = []
    try:
        for candidate in candidates:
            try:
                say(f"model: loading {candidate.label} ({candidate.model_file})")
                _activate(candidate, package, threads)
                active.append(candidate)
            except InputError:
                raise
            except Exception as exc:  # an optional backend that cannot load (engine mismatch, CUDA) is skipped
                skipped.append({"backend": candidate.backend, "precision": candidate.precision, "reason": str(exc)})
                log.warning("%s skipped: %s", candidate.label, exc)
        results: list[dict[str, Any]] = []
        for size in sorted({1, batch}):
            images = random_images(size, package.image_size)
            say(f"model: timing {len(active)} backend(s) at batch {size}, {repeats} calls each (+{warmup} warm-up)")
            timings = time_runners(
                {c.label: c.runner for c in active if c.runner is not None}, images, repeats=repeats, warmup=warmup
            )
            for c in active:
                results.append(
                    {
                        "backend": c.backend,
                        "precision": c.precision,
                        "model_file": str(c.model_file),
                        "size_mb": _size_mb(c.model_file),
                        "detail": c.detail,
                        **asdict(timings[c.label]),
                    }
                )
    finally:
        for c in active:
            if c.runner is not None:
                c.runner.deactivate()
    return {
        "input": {"image_size": list(package.image_size), "dtype": "uint8", "content": "random, seed 0"},
        "results": results,
        "ratios": latency_ratios(results),
        "skipped": skipped,
    }


def _size_mb(path: Path) -> float | None:
    try:
        if path.is_dir():
            return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6, 2)
        return round(path.stat().st_size / 1e6, 2)
    except OSError:
        return None


def latency_ratios(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Latency ratios (p50 per call) between backends and precisions at the same batch size.

    * ONNX Runtime / PyTorch eager, FP32 (issue goal: ONNX Runtime at least 2x faster, ratio <= 0.5);
    * each variant / FP32 of the same backend (e.g. ``onnxruntime int8 / onnxruntime fp32``);
    * TensorRT / ONNX Runtime at the same precision.

    Args:
        results: entries of :func:`bench_models` (``backend``, ``precision``, ``batch``, ``p50_ms``).

    Returns:
        ``{comparison, candidate, reference, batch, latency_ratio, speedup}`` per pair found:
        ``latency_ratio = candidate / reference`` (< 1: the candidate is faster), ``speedup`` its inverse.
    """
    by_key = {(r["backend"], r["precision"], r["batch"]): float(r["p50_ms"]) for r in results}
    pairs: list[tuple[tuple[str, str], tuple[str, str]]] = [(("onnxruntime", "fp32"), ("pytorch", "fp32"))]
    for backend in ("onnxruntime", "tensorrt"):
        pairs += [((backend, p), (backend, "fp32")) for p in ("fp16", "int8")]
    pairs += [(("tensorrt", p), ("onnxruntime", p)) for p in ("fp32", "fp16", "int8")]
    out = []
    for batch in sorted({int(r["batch"]) for r in results}):
        for cand, ref in pairs:
            c, r = by_key.get((*cand, batch)), by_key.get((*ref, batch))
            if c is None or r is None or c <= 0 or r <= 0:
                continue
            out.append(
                {
                    "comparison": f"{cand[0]} {cand[1]} / {ref[0]} {ref[1]}",
                    "candidate": f"{cand[0]}/{cand[1]}",
                    "reference": f"{ref[0]}/{ref[1]}",
                    "batch": batch,
                    "latency_ratio": round(c / r, 4),
                    "speedup": round(r / c, 2),
                }
            )
    return out


# ---------------------------------------------------------------------------------------------- report


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[bool] | None = None) -> list[str]:
    """A Markdown table; ``right[i]`` right-aligns column ``i`` (default: every column but the first)."""
    cells = [[str(h) for h in header]] + [[_fmt(v) if not isinstance(v, str) else v for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    align = list(right) if right is not None else [i > 0 for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 1) + (":" if a else "-") for w, a in zip(widths, align)) + "|")
    lines += [
        "| " + " | ".join(c.rjust(w) if a else c.ljust(w) for c, w, a in zip(row, widths, align)) + " |"
        for row in cells[1:]
    ]
    return lines


def format_report(report: Mapping[str, Any]) -> str:
    """The benchmark as Markdown tables (what ``fod bench`` prints).

    Args:
        report: the dict written by ``--json``.

    Returns:
        Text: a header with the machine and the package, the model latency table, the ratio
        table and, when the agent part ran, the end-to-end table.
    """
    m = report["machine"]
    v = m["versions"]
    pkg = report["package"]
    board = f" ({m['board']})" if m.get("board") else ""
    lines = [
        f"## fod bench: {pkg['model_name']} ({pkg['image_size'][0]}x{pkg['image_size'][1]} px, "
        f"{pkg['backbone']}){' [quick: indicative only]' if report['settings']['quick'] else ''}",
        "",
        f"Machine: {m['cpu']}{board}, {m['cores']} cores "
        f"({m['cores_usable']} usable), {m['ram_gib']} GiB RAM, load {m['load_avg_1m']} at start; "
        f"onnxruntime {v['onnxruntime']} ({', '.join(m['onnxruntime_providers'])}), torch {v['torch'] or '-'}, "
        f"TensorRT {v['tensorrt'] if m['tensorrt']['available'] else 'not available'}; {report['created_utc']}",
    ]
    model = report.get("model")
    if model:
        lines += ["", "### Model latency (warm-up excluded, random uint8 input)", ""]
        rows = [
            [
                r["backend"],
                r["precision"],
                r["batch"],
                r["p50_ms"],
                r["p95_ms"],
                r["per_frame_ms"],
                r["frames_per_s"],
                _provider(r),
            ]
            for r in model["results"]
        ]
        lines += _table(
            ["backend", "precision", "batch", "p50 ms/call", "p95 ms/call", "ms/frame", "frames/s", "detail"], rows
        )
        if model["ratios"]:
            lines += ["", "Latency ratios (p50 per call; ratio < 1 = faster than the reference):", ""]
            lines += _table(
                ["comparison", "batch", "latency ratio", "speedup"],
                [[r["comparison"], r["batch"], r["latency_ratio"], f"{r['speedup']:.2f}x"] for r in model["ratios"]],
            )
        for s in model["skipped"]:
            reason = str(s["reason"]).strip().splitlines()[0] if str(s["reason"]).strip() else "-"
            lines.append(f"- skipped {s['backend']} {s['precision']}: {reason}")
    agent = report.get("agent")
    if agent is not None:
        lines += ["", *_agent_lines(agent)]
    return "\n".join(lines)


def _provider(result: Mapping[str, Any]) -> str:
    detail = result.get("detail", {})
    if "providers" in detail:
        return str(detail["providers"][0]).removesuffix("ExecutionProvider") + f", threads {detail.get('threads')}"
    if "engine_max_batch" in detail:
        return f"engine batch 1..{detail['engine_max_batch']}"
    if "threads" in detail:
        same = detail.get("same_model_as_package")
        return f"cpu, threads {detail['threads']}" + ("" if same in (True, None) else ", NOT the package's checkpoint")
    return ""


STAGES = ("capture", "preprocess", "inference", "postprocess")


def _agent_lines(agent: Mapping[str, Any]) -> list[str]:
    if agent.get("skipped"):
        return [f"### Agent end to end: skipped ({agent['skipped']})"]
    if agent.get("error"):
        return [f"### Agent end to end: FAILED ({agent['error']})"]
    s, lat, over, mem = agent["sustained"], agent["latency"], agent["overload"], agent["memory"]
    bare = agent["bare_backend"]
    size = agent["source"]["frame_size"]

    def triple(d: Mapping[str, Any], key: str) -> str:
        return " / ".join(_fmt(d.get(f"{key}_{q}_ms"), 1) for q in ("p50", "p95", "p99"))

    rows: list[list[Any]] = [
        ["backend", f"{agent['backend']} {agent['precision']} ({agent['backend_reason']})"],
        ["source", f"{agent['source']['kind']}, {size[1]}x{size[0]} px"],
        ["broker", f"{agent['broker']['kind']} {agent['broker']['url']}"],
        [f"sustained FPS (model pace, {s['frames_scored']} frames)", _fmt(s["fps"], 1)],
        [f"bare backend FPS ({bare['backend']}, batch {bare['batch']})", _fmt(bare["frames_per_s"], 1)],
        ["agent / bare backend throughput, model pace (goal >= 0.9)", _fmt(agent["throughput_ratio"], 3)],
        [
            "agent / bare backend throughput, overload (source faster than the model)",
            _fmt(agent.get("throughput_ratio_overload"), 3),
        ],
        [
            f"capture->receive ms p50/p95/p99 (source at {lat['source_factor']}x, {lat['received']} frames, "
            f"{lat['frames_dropped']} dropped)",
            triple(lat, "receive"),
        ],
        ["payload latency_ms.total ms p50/p95/p99", triple(lat, "total")],
        ["NG verdicts in the latency run", _fmt(lat.get("ng_fraction"), 3)],
        [
            "stage means ms: capture wait / preprocess / inference / postprocess",
            " / ".join(_fmt(lat["stage_mean_ms"].get(k), 2) for k in STAGES),
        ],
        [
            f"overload: source {_fmt(over['source_fps'], 1)} fps ({over['source_factor']}x), scored "
            f"{_fmt(over['scored_fps'], 1)} fps",
            f"{over['frames_dropped']} of {over['frames_captured']} frames dropped ({_fmt(over['drop_fraction'], 3)})",
        ],
        [
            "overload: frame age at inference ms mean / p95 / max",
            " / ".join(_fmt(over.get(k), 1) for k in ("age_mean_ms", "age_p95_ms", "age_max_ms")),
        ],
        ["overload: capture->receive ms p50/p95/p99", triple(over, "receive")],
        [
            f"RSS MiB after {mem['first_frames']} / {mem['last_frames']} frames (growth)",
            f"{_fmt(mem['rss_first_mib'], 1)} / {_fmt(mem['rss_last_mib'], 1)} ({_fmt(mem['growth_mib'], 1)})",
        ],
        ["RSS growth over the second half of the run, MiB", _fmt(mem["growth_second_half_mib"], 1)],
    ]
    lines = ["### Agent end to end (real agent, MQTT result topic)", ""]
    lines += _table(["measure", "value"], rows, right=[False, False])
    lines += [f"- {note}" for note in agent.get("notes", [])]
    return lines


# ---------------------------------------------------------------------------------------------- CLI


def add_parser(subparsers: Any) -> None:
    """Register ``fod bench`` and its options."""
    p = subparsers.add_parser(
        "bench",
        help="measure model latency per backend/precision and the end-to-end agent on this machine",
        description=(
            "Model latency and throughput per backend and precision at batch 1 and N, then the real agent "
            "end to end over MQTT (latency, FPS, frame age under overload, memory). Prints Markdown tables; "
            "--json writes every number with the machine description. See docs/benchmarks.md."
        ),
    )
    p.add_argument("--model", required=True, type=Path, metavar="PKG_DIR", help="model package folder")
    p.add_argument("--checkpoint", type=Path, metavar="RUN_DIR", help="`fod train` run folder: also time PyTorch eager")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, metavar="N", help=f"second batch size ({DEFAULT_BATCH})")
    p.add_argument(
        "--repeats",
        type=int,
        metavar="R",
        help=f"timed calls per backend and batch ({DEFAULTS['repeats']}; quick {QUICK['repeats']})",
    )
    p.add_argument(
        "--warmup", type=int, metavar="W", help=f"untimed calls first ({DEFAULTS['warmup']}; quick {QUICK['warmup']})"
    )
    p.add_argument(
        "--threads", type=int, metavar="T", help="intra-op threads of ONNX Runtime and PyTorch (default: theirs)"
    )
    p.add_argument(
        "--backends",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time each backend and precision (default on; --no-backends runs the agent part only)",
    )
    p.add_argument(
        "--agent",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also benchmark the agent end to end (default on)",
    )
    p.add_argument(
        "--frames",
        type=int,
        metavar="N",
        help=f"frames of the agent's latency and overload runs ({DEFAULTS['frames']}; quick {QUICK['frames']})",
    )
    p.add_argument(
        "--long-frames",
        type=int,
        metavar="N",
        help=f"frames of the agent's sustained run at model pace, for FPS and memory ({DEFAULTS['long_frames']}; "
        f"quick {QUICK['long_frames']})",
    )
    p.add_argument(
        "--precision",
        choices=list(VARIANT_FILES),
        default="fp32",
        help="precision the agent runs (fp32)",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "onnxruntime", "tensorrt"],
        default="auto",
        help="backend the agent runs (auto: TensorRT when an engine and TensorRT are here)",
    )
    p.add_argument(
        "--broker",
        metavar="URL",
        help="MQTT broker for the agent part (mqtt://host:port); default: mosquitto (or amqtt) started on a free "
        "loopback port",
    )
    p.add_argument(
        "--source",
        type=Path,
        metavar="DIR",
        help="images the agent's replay source cycles through (default: frames of the synthetic conveyor)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="repeats {repeats}, warm-up {warmup}, frames {frames}, long frames {long_frames} (explicit options win): "
        "seconds on a tiny model; indicative numbers only".format(**QUICK),
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="write every number and the machine description here")
    p.set_defaults(run=run)


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the tables, write ``--json``.

    Returns:
        0, or 1 when the agent part failed (its error is in the table and the JSON; the model part
        still runs).

    Raises:
        FodError: invalid package or settings. Errors of the agent part (``agent.errors.AgentError``)
            are reported, not raised.
    """
    defaults = QUICK if args.quick else DEFAULTS
    repeats = args.repeats if args.repeats is not None else defaults["repeats"]
    warmup = args.warmup if args.warmup is not None else defaults["warmup"]
    frames = args.frames if args.frames is not None else defaults["frames"]
    long_frames = args.long_frames if args.long_frames is not None else defaults["long_frames"]
    if min(repeats, frames, long_frames, args.batch) < 1 or warmup < 0:
        raise InputError("--batch, --repeats, --frames and --long-frames must be >= 1, --warmup >= 0")
    if not (args.agent or args.backends):
        raise InputError("--no-agent and --no-backends together leave nothing to measure; drop one")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    package = ModelPackage(args.model)
    m = package.manifest
    report: dict[str, Any] = {
        "schema_version": BENCH_SCHEMA_VERSION,
        "tool": "fod bench",
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "package": {
            "root": str(package.root),
            "model_name": m.model_name,
            "image_size": list(package.image_size),
            "backbone": m.backbone,
            "calibrated": m.calibration is not None,
            "variants_mb": {
                p: _size_mb(package.root / f) for p, f in VARIANT_FILES.items() if (package.root / f).is_file()
            },
        },
        "settings": {
            "quick": bool(args.quick),
            "batch": args.batch,
            "repeats": repeats,
            "warmup": warmup,
            "threads": args.threads,
            "frames": frames,
            "long_frames": long_frames,
            "agent": bool(args.agent),
            "backends": bool(args.backends),
        },
    }
    # the agent part runs first, so that its resident memory is not inflated by torch and the
    # model part's sessions (PyTorch is imported only by the model part)
    if args.agent:
        report["agent"] = _run_agent_part(args, frames=frames, long_frames=long_frames)
    if args.backends:
        report["model"] = bench_models(
            package,
            checkpoint=args.checkpoint,
            batch=args.batch,
            repeats=repeats,
            warmup=warmup,
            threads=args.threads,
            progress=_say,
        )
    try:
        report["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if report["machine"]["versions"]["torch"] is None or "torch" in sys.modules:
        report["machine"]["versions"]["torch"] = _version("torch", "torch")
    print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_finite(report), indent=2, allow_nan=False, default=_json_default)
        args.json.write_text(text + "\n", encoding="utf-8")
        _say(f"wrote {args.json}")
    return 1 if report.get("agent", {}).get("error") else 0


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _run_agent_part(args: argparse.Namespace, *, frames: int, long_frames: int) -> dict[str, Any]:
    """Run :func:`fod_tools.bench.agent.bench_agent`.

    Returns:
        Its report; ``{"skipped": reason}`` when the agent cannot be imported here (a missing
        dependency), ``{"error": message}`` when the agent part failed (no broker, package refused).
    """
    try:
        from agent.errors import AgentError
        from fod_tools.bench.agent import AgentBenchSettings, bench_agent
    except ImportError as exc:
        return {"skipped": f"the agent cannot be imported here: {exc}"}
    settings = AgentBenchSettings(
        frames=frames,
        long_frames=long_frames,
        precision=args.precision,
        backend=args.backend,
        threads=args.threads,
        broker=args.broker,
        source_dir=args.source,
        quiet=not getattr(args, "verbose", False),
    )
    try:
        return bench_agent(args.model, settings, progress=_say)
    except AgentError as exc:
        _say(f"agent part failed: {exc}")
        return {"error": str(exc)}
