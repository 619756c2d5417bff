"""Training checkpoints: ``RUN_DIR/checkpoint.pt`` holds weights (backbone included), reference
features, the full :class:`fod.model.FODConfig` and the training record. Loading needs no other file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fod.errors import CheckpointError
from fod.model import FODConfig, FODModel

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "fod-checkpoint"
VERSION = 1


def is_checkpoint_dir(path: str | Path) -> bool:
    """True when ``path`` is a run folder holding ``checkpoint.pt``."""
    return (Path(path) / CHECKPOINT_NAME).is_file()


def save_checkpoint(run_dir: str | Path, model: FODModel, record: dict[str, Any]) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically and return its path.

    Args:
        run_dir: output folder (created).
        model: the trained model (reference buffers filled).
        record: JSON-like training record (data fingerprint, epochs, seconds, losses).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT_NAME
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "state_dict": model.state_dict(),
        "record": record,
    }
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path) -> tuple[FODModel, dict[str, Any]]:
    """Load a run folder (or the ``checkpoint.pt`` file itself).

    Returns:
        the model in eval mode, and the training record.

    Raises:
        CheckpointError: missing file, not a FOD checkpoint, a newer or older format version, or
            weights that do not fit the saved config.
    """
    path = Path(path)
    file = path if path.suffix == ".pt" else path / CHECKPOINT_NAME
    if not file.is_file():
        raise CheckpointError(f"{file}: not found; train a model with `fod train --data DIR --out {path}`")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds for corrupt files
        raise CheckpointError(f"{file}: cannot be read as a checkpoint ({exc}); retrain or copy it again") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a FOD checkpoint (no format '{FORMAT}'); pass a run folder of `fod train`")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{file}: checkpoint format version {payload.get('version')} but this software reads version {VERSION}; "
            "retrain with `fod train` or use the fod-agent release that wrote it"
        )
    try:
        config = FODConfig.from_dict(payload["config"])
        model = FODModel(config, pretrained=False)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{file}: weights do not match the saved config ({exc}); retrain") from exc
    return model.eval(), dict(payload.get("record", {}))
