"""Training steps per second: the landed implementation of a git revision against the current one.

Times the FOD training step (forward of every level with the training maps, the loss, backward,
Adam) at the same settings for three variants, interleaved in rounds so that load from other
processes hits each variant alike (the ``fod bench`` way of timing):

* ``landed``: ``fod/model.py`` and ``fod/losses.py`` as they were at ``--baseline-rev`` (joint
  ``[L, L]`` RBF target, loss terms converted to floats in the step, eager), loaded from git;
* ``eager``: the current code, eager;
* ``compiled``: the current step under ``torch.compile`` (what ``fod train`` runs for long runs).

Synthetic tokens of the real shapes (the backbone is not part of a training step: its features are
computed once). Usage::

    python benchmarks/train_step.py --image-size 128 --levels 8,16 --rounds 5 --steps 40
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

import fod  # noqa: F401  (sets the OpenMP wait policy before torch loads)
from fod.model import FODConfig, FODModel, parse_levels
from fod.train import _step_loss

REPO = Path(__file__).resolve().parents[1]


def load_landed(rev: str) -> tuple[types.ModuleType, types.ModuleType]:
    """``fod.model`` and ``fod.losses`` of git revision ``rev`` as modules ``landed_model``, ``landed_losses``."""
    mods = []
    for name, path in (("landed_model", "fod/model.py"), ("landed_losses", "fod/losses.py")):
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True,
                                capture_output=True, text=True).stdout
        source = source.replace("from fod.model import", "from landed_model import")
        spec = importlib.util.spec_from_loader(name, loader=None)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)  # our own history, read from git
        mods.append(module)
    return mods[0], mods[1]


def make_step(kind: str, config: FODConfig, rev: str) -> tuple[Any, Any]:
    """A zero-argument training step of ``kind`` and its parameter count."""
    torch.manual_seed(0)
    model = FODModel(config, pretrained=False)
    s = config.image_size
    shapes = []
    channels = dict(zip(config.strides, model.backbone.channels))
    for level in config.levels:
        shapes.append((1, (s // min(level)) ** 2, sum(channels[st] for st in level)))
    tokens = [torch.randn(*shape) for shape in shapes]
    if kind == "landed":
        landed_model, landed_losses = load_landed(rev)
        grids = [(s // min(lv), s // min(lv)) for lv in config.levels]
        levels = [landed_model.FODLevel(shape[2], grid, d, config.heads, config.layers, config.ffn_mult)
                  for shape, grid, d in zip(shapes, grids, config.d_models)]
        params = [p for level in levels for p in level.parameters()]
        optimizer = torch.optim.Adam(params, lr=1e-4)

        def step() -> None:
            total = torch.zeros(())
            for level, x in zip(levels, tokens):
                x_hat, maps = level(x, training_maps=True)
                loss, _terms = landed_losses.fod_loss(x, x_hat, maps, config.lambda1, config.lambda2)
                total = total + loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()

        return step, sum(p.numel() for p in params)
    fn = torch.compile(_step_loss) if kind == "compiled" else _step_loss
    optimizer = torch.optim.Adam(model.levels.parameters(), lr=1e-4)  # type: ignore[attr-defined]
    model.levels.train()  # type: ignore[attr-defined]

    def current_step() -> None:
        total, terms = fn(list(model.levels), tokens, config.lambda1, config.lambda2)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        float(total.detach())
        terms.double().cpu()

    return current_step, sum(p.numel() for p in model.levels.parameters())  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    """Print steps/s per variant (median over rounds) and the speed-ups; optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--levels", default="8,16")
    parser.add_argument("--baseline-rev", default="67b8948", help="git revision of the landed step")
    parser.add_argument("--variants", default="landed,eager,compiled")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="steps per round and variant")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    levels = parse_levels(args.levels)
    config = FODConfig(image_size=args.image_size, levels=levels,
                       d_models=tuple(128 if min(lv) <= 8 else 256 for lv in levels))
    variants = args.variants.split(",")
    if "landed" in variants and levels != ((8,), (16,)):
        parser.error("the landed code has only the 8,16 levels: use --levels 8,16 or drop 'landed'")
    steps = {}
    for kind in variants:
        t0 = time.perf_counter()
        steps[kind], n_params = make_step(kind, config, args.baseline_rev)
        for _ in range(3):  # warm-up (compiles the compiled variant)
            steps[kind]()
        print(f"{kind}: {n_params} parameters, set-up and warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for kind in variants:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[kind]()
            rates[kind].append(args.steps / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"image size {args.image_size}, levels {args.levels}, batch 1, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps")
    for kind in variants:
        ratio = f"  {med[kind] / med[variants[0]]:.2f}x {variants[0]}" if kind != variants[0] else ""
        print(f"  {kind:9s} {med[kind]:6.2f} steps/s (rounds: {', '.join(f'{r:.2f}' for r in rates[kind])}){ratio}")
    if args.json is not None:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "steps_per_s": rates,
                                         "median": med}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
