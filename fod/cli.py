"""The ``fod`` command: train, eval, export, calibrate, quantize, build, bench.

Each subcommand registers its own arguments from the package that implements it and is imported
lazily, so ``fod build`` works without torch and ``fod --help`` is fast. Errors of the
:class:`fod.errors.FodError` family (and the other packages' error roots) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from fod import __version__

# subcommand -> (module that defines ``add_parser(subparsers)`` and ``run(args) -> int``, one-line help).
# The help lines are repeated here so that ``fod --help`` lists the commands without importing them
# (their modules pull in torch, scipy or onnxruntime: seconds on a small machine).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("fod.train_cli", "train a FOD model on good images"),
    "eval": ("fod.eval_cli", "image/pixel AUROC and PRO on a test split"),
    "export": ("fod.export_cli", "export a trained model to a model package (ONNX + manifest)"),
    "calibrate": ("calibration.cli_calibrate", "fit thresholds and score normalisation on held-out good images"),
    "quantize": ("calibration.cli_quantize", "write an INT8 (Q/DQ) or FP16 variant behind an accuracy gate"),
    "build": ("engine_build.cli", "compile a model package to a TensorRT engine on this GPU (once per box)"),
    "bench": ("fod_tools.bench.models", "measure model latency per backend/precision and the end-to-end agent"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser.

    Args:
        command: the subcommand whose module is imported and whose full parser is registered; the
            others get a help-only entry (enough for ``fod --help``). None registers every command in
            full (slow: imports torch, scipy and onnxruntime).
    """
    parser = argparse.ArgumentParser(prog="fod", description="FOD anomaly model: train, export, deploy.")
    parser.add_argument("--version", action="version", version=f"fod {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_text)
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a missing optional dependency disables one command, not all
            stub = sub.add_parser(name, help=f"(unavailable: {exc})",
                                  description=f"`fod {name}` is unavailable: {exc} (reinstall: pip install -e .)")
            stub.set_defaults(_unavailable=f"`fod {name}` needs a missing dependency: {exc}")
            continue
        module.add_parser(sub)
    return parser


def _command_of(argv: Sequence[str]) -> str:
    """The subcommand named in ``argv`` (the first argument that is one), or ``""`` when none is."""
    for arg in argv:
        if arg in COMMANDS:
            return arg
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fod`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    _configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    if getattr(args, "_unavailable", None):
        print(f"fod: error: {args._unavailable}", file=sys.stderr)
        return 2
    error_roots = _error_roots()
    try:
        return int(args.run(args) or 0)
    except error_roots as exc:
        print(f"fod {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fod {args.command}: interrupted", file=sys.stderr)
        return 130


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the record (not the stream of the first call)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging(level: int) -> None:
    """One handler on the root logger, added once, following the current ``sys.stderr``."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


def _error_roots() -> tuple[type[BaseException], ...]:
    from fod.errors import FodError

    roots: list[type[BaseException]] = [FodError]
    for module_name, attr in (("calibration.errors", "CalibrationError"), ("engine_build.errors", "EngineBuildError")):
        try:
            roots.append(getattr(importlib.import_module(module_name), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(roots)


if __name__ == "__main__":
    sys.exit(main())
