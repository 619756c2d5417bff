"""Thread pools on a shared CPU: ONNX Runtime with and without spinning, and training steps/s.

Run it once as it is and once beside a busy process (``python -c "while True: pass" &``)::

    python benchmarks/shared_cpu.py ort --model PKG_DIR      # p50 ms per call, spin off vs on
    python benchmarks/shared_cpu.py train                     # training steps/s of the demo-sized model

``ort`` times :class:`fod.runner.OnnxRuntimeRunner` on one random frame at the package's input size,
3 interleaved rounds of 15 calls per setting after one warm-up call. ``train`` runs
:func:`fod.train.train_model` on 40 frames of the demo conveyor (2 epochs, batch 4, eager) and prints
the record's ``steps_per_second`` (training steps only: the backbone features are computed before).
Results are in docs/benchmarks.md ("Shared CPUs").
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import fod  # noqa: F401  (passive OpenMP waits, set before torch loads)


def time_ort(model: Path, rounds: int = 3, calls: int = 15) -> dict[str, float]:
    """Median ms per batch-1 call of the package's FP32 model, spinning off and on."""
    from fod.package import ModelPackage
    from fod.runner import OnnxRuntimeRunner

    pkg = ModelPackage(model)
    h, w = pkg.image_size
    x = np.random.default_rng(0).integers(0, 255, (1, h, w, 3), dtype=np.uint8)
    times: dict[str, list[float]] = {"spin off": [], "spin on": []}
    for _ in range(rounds):
        for spin in (False, True):
            with OnnxRuntimeRunner(pkg.onnx_path("fp32"), (h, w), providers=["CPUExecutionProvider"], spin=spin) as r:
                r.infer(x)
                for _ in range(calls):
                    start = time.perf_counter()
                    r.infer(x)
                    times["spin on" if spin else "spin off"].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def train_rate() -> float:
    """Training steps per second of the demo-sized model (128 px, two levels, batch 4)."""
    from fod.model import FODConfig
    from fod.train import TrainSettings, train_model
    from fod_tools.demo.model import DEMO_RECIPE, _good_images

    images = _good_images(DEMO_RECIPE, 40, seed=1)
    settings = TrainSettings(epochs=2, batch_size=4, lr=3e-4, progress=False, holdout=0.1, compile=False)
    _, record = train_model(images, FODConfig(image_size=DEMO_RECIPE.image_size), settings)
    return float(record["steps_per_second"])


def main() -> None:
    """Command line: ``ort --model PKG_DIR`` or ``train``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    ort = sub.add_parser("ort", help="ONNX Runtime p50 ms, spinning off vs on")
    ort.add_argument("--model", type=Path, required=True, help="model package folder")
    sub.add_parser("train", help="training steps/s of the demo-sized model")
    args = parser.parse_args()
    if args.what == "ort":
        for name, ms in time_ort(args.model).items():
            print(f"{name}: p50 {ms:.1f} ms per call")
    else:
        print(f"training: {train_rate():.3f} steps/s")


if __name__ == "__main__":
    main()
