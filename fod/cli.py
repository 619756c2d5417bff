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

# subcommand -> module that defines ``add_parser(subparsers)`` and ``run(args) -> int``
COMMANDS: dict[str, str] = {
    "train": "fod.train_cli",
    "eval": "fod.eval_cli",
    "export": "fod.export_cli",
    "calibrate": "calibration.cli_calibrate",
    "quantize": "calibration.cli_quantize",
    "build": "engine_build.cli",
    "bench": "fod_tools.bench.models",
}


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="fod", description="FOD anomaly model: train, export, deploy.")
    parser.add_argument("--version", action="version", version=f"fod {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a missing optional dependency disables one command, not all
            stub = sub.add_parser(name, help=f"(unavailable: {exc})")
            stub.set_defaults(_unavailable=f"`fod {name}` needs a missing dependency: {exc}")
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fod`` console script; returns the exit code."""
    parser = build_parser()
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
