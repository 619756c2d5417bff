"""A :class:`fod.runner.Runner` over a training checkpoint (PyTorch eager), for ``fod eval`` and parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fod.checkpoint import load_checkpoint
from fod.model import FODModel
from fod.runner import Runner


class TorchRunner(Runner):
    """Run a FOD checkpoint with PyTorch on the CPU (or CUDA when ``device`` says so).

    Args:
        run_dir: a ``fod train`` output folder, or an in-memory model via :meth:`from_model`.
        device: torch device string; None picks CUDA when available.
    """

    name = "pytorch"

    def __init__(self, run_dir: str | Path | None = None, *, device: str | None = None) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model: FODModel | None = None
        if run_dir is not None:
            model, _ = load_checkpoint(run_dir)
            self._set_model(model)

    @classmethod
    def from_model(cls, model: FODModel, *, device: str | None = None) -> TorchRunner:
        """Wrap an in-memory model."""
        runner = cls(device=device)
        runner._set_model(model)
        return runner

    def _set_model(self, model: FODModel) -> None:
        self.model = model.eval()
        s = model.config.image_size
        self.image_size = (s, s)

    def _activate_impl(self) -> None:
        assert self.model is not None
        self.model.to(self.device)

    @torch.inference_mode()
    def _infer_impl(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.model is not None
        anomaly_map, score = self.model(torch.from_numpy(images).to(self.device))
        return anomaly_map.float().cpu().numpy(), score.float().cpu().numpy()

    def _deactivate_impl(self) -> None:
        if self.model is not None:
            self.model.to("cpu")
