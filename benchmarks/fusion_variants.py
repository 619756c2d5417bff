"""Write fusion variants of a trained run, for the level-fusion ablation of docs/results.md.

From ``RUN/checkpoint.pt`` (trained with ``--holdout``, so ``level_norm`` is set) this writes run
folders that differ only in how the level maps are combined:

* ``OUT/plain``: the reference's plain average (``level_norm = None``);
* ``OUT/level<i>``: level ``i`` alone (the other levels' std set to 1e30, so their normalised,
  rectified maps are 0 and the fused map is level ``i``'s divided by the level count: same ranking).

Then ``fod export`` and ``fod eval`` each folder. Usage::

    python benchmarks/fusion_variants.py RUN OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

from fod.checkpoint import load_checkpoint, save_checkpoint


def main(argv: list[str]) -> int:
    """Write the variants; print their folders."""
    run, out = Path(argv[0]), Path(argv[1])
    model, record = load_checkpoint(run)
    norm = model.config.level_norm
    if norm is None:
        print(f"{run}: no level_norm in the checkpoint (trained with --holdout 0)", file=sys.stderr)
        return 2
    model.config.global_norm = None  # the variants compare the level fusion alone: no global lift
    model.config.level_norm = None
    print(save_checkpoint(out / "plain", model, record).parent)
    for i in range(len(norm)):
        model.config.level_norm = tuple(s if j == i else (s[0], 1e30) for j, s in enumerate(norm))
        print(save_checkpoint(out / f"level{i}", model, record).parent)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
