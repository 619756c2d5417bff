"""Exception hierarchy of :mod:`engine_build`: every message names the file or setting and the fix.

The ``fod`` CLI catches :class:`EngineBuildError`, prints the one-line message and exits 2; the agent
catches it to fall back to ONNX Runtime.
"""

from __future__ import annotations


class EngineBuildError(Exception):
    """Base class of all errors raised by :mod:`engine_build` (bad settings, failed parse or build)."""


class TensorRTUnavailableError(EngineBuildError):
    """TensorRT, pycuda or a CUDA GPU is missing; the message says what and how to install it."""


class EngineMismatchError(EngineBuildError):
    """An engine does not match this box or its package (TensorRT version, GPU, source ONNX) or is corrupt.

    The message lists every difference and the ``fod build ...`` command that rebuilds the engine.

    Attributes:
        differences: one line per mismatch (``"TensorRT version: engine 10.3.0, runtime 10.7.0"``).
        rebuild_command: the command that rebuilds the engine on this box.
    """

    def __init__(
        self, message: str, *, differences: list[str] | None = None, rebuild_command: str = ""
    ) -> None:
        super().__init__(message)
        self.differences = list(differences or [])
        self.rebuild_command = rebuild_command


class ParityError(EngineBuildError):
    """A freshly built engine disagrees with ONNX Runtime beyond the tolerance of its precision.

    Attributes:
        report: the parity report (:meth:`engine_build.parity.ParityReport.to_dict`).
    """

    def __init__(self, message: str, report: dict[str, object]) -> None:
        super().__init__(message)
        self.report = report
