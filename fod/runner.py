"""Inference runners with one interface for every backend.

A runner executes the exported graph: ``image`` uint8 ``[N, H, W, 3]`` BGR in, ``anomaly_map``
float32 ``[N, 1, H, W]`` and ``score`` float32 ``[N]`` out. It has an explicit lifecycle
(``activate`` / ``infer`` / ``deactivate``, or a ``with`` block) as Polygraphy's runners do.
:class:`OnnxRuntimeRunner` lives here; the TensorRT runner is ``engine_build.runner.TensorRTRunner``.
No torch is imported.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from fod.errors import FodError, InputError


@dataclass(frozen=True)
class RunnerOutput:
    """Raw outputs of one batch.

    Attributes:
        anomaly_map: ``[N, 1, H, W]`` float32 at model resolution.
        score: ``[N]`` float32 image scores (max of the smoothed map).
        inference_ms: wall time of the backend call in ms.
    """

    anomaly_map: np.ndarray
    score: np.ndarray
    inference_ms: float


class Runner(abc.ABC):
    """Base class of inference backends: activate, infer, deactivate.

    Subclasses implement ``_activate_impl``, ``_infer_impl`` and ``_deactivate_impl``;
    the public methods enforce the state machine.
    """

    #: short backend name used in logs and metrics (``onnxruntime``, ``tensorrt``)
    name: str = "runner"

    def __init__(self) -> None:
        self.is_active = False
        self.image_size: tuple[int, int] = (0, 0)

    def activate(self) -> Runner:
        """Load the model and allocate resources. Idempotent.

        Raises:
            FodError (or a subclass): the model cannot be loaded.
        """
        if not self.is_active:
            self._activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        """Release every resource held (session, engine, buffers). Idempotent."""
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def infer(self, images: np.ndarray) -> RunnerOutput:
        """Run the graph on a batch of preprocessed images.

        Args:
            images: ``[N, H, W, 3]`` uint8 BGR at the model's ``image_size``.

        Returns:
            :class:`RunnerOutput`.

        Raises:
            FodError: the runner is not active.
            InputError: wrong dtype or shape.
        """
        if not self.is_active:
            raise FodError(f"{self.name} runner is not active; call activate() or use it in a `with` block")
        expected = (*self.image_size, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise InputError(
                f"{self.name}: expected uint8 [N, {expected[0]}, {expected[1]}, 3], got {images.dtype} "
                f"{list(images.shape)}; pass frames through fod.preprocess.to_model_input"
            )
        start = time.perf_counter()
        anomaly_map, score = self._infer_impl(np.ascontiguousarray(images))
        return RunnerOutput(anomaly_map, score, (time.perf_counter() - start) * 1e3)

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.deactivate()

    @abc.abstractmethod
    def _activate_impl(self) -> None: ...

    @abc.abstractmethod
    def _infer_impl(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    @abc.abstractmethod
    def _deactivate_impl(self) -> None: ...


def onnxruntime_providers() -> list[str]:
    """ONNX Runtime execution providers available here, best first (CUDA before CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    preferred = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in preferred if p in available] or list(available)


class OnnxRuntimeRunner(Runner):
    """Run an ONNX graph with ONNX Runtime (CPU or CUDA execution provider).

    Args:
        onnx_path: the ``.onnx`` file (a package's ``model.onnx`` or a variant).
        image_size: ``(height, width)`` of the graph input in px.
        providers: execution providers; None picks :func:`onnxruntime_providers`.
        intra_op_threads: ONNX Runtime intra-op threads; None lets ORT decide (one per physical core).
        spin: let ORT's pool threads spin (busy-wait) between operators. Off by default: a spinning
            pool that shares its cores with another busy process keeps the thread that has the work
            off the CPU, and every operator waits for a time slice (the same collapse as OpenMP's
            active wait, see :mod:`fod`). Turn it on only on a box whose cores do nothing else, for
            a few per cent lower latency.
    """

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | Path,
        image_size: tuple[int, int],
        *,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        spin: bool = False,
    ) -> None:
        super().__init__()
        self.onnx_path = Path(onnx_path)
        self.image_size = tuple(image_size)  # type: ignore[assignment]
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self.spin = spin
        self._session: Any = None

    @property
    def active_providers(self) -> list[str]:
        """Providers the active session really uses (empty when inactive)."""
        return list(self._session.get_providers()) if self._session is not None else []

    def session_options(self) -> Any:
        """The ``onnxruntime.SessionOptions`` this runner opens its session with.

        Quiet logs, ``intra_op_threads`` when given, and pool spinning per ``spin`` (intra- and
        inter-op pools alike).
        """
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.intra_op_threads:
            options.intra_op_num_threads = self.intra_op_threads
        spinning = "1" if self.spin else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        return options

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        try:
            self._session = ort.InferenceSession(
                str(self.onnx_path),
                sess_options=self.session_options(),
                providers=self.providers or onnxruntime_providers(),
            )
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise FodError(
                f"{self.onnx_path}: ONNX Runtime cannot load the model ({exc}); re-export the package"
            ) from exc

    def _infer_impl(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        anomaly_map, score = self._session.run(["anomaly_map", "score"], {"image": images})
        return anomaly_map, score

    def _deactivate_impl(self) -> None:
        self._session = None
