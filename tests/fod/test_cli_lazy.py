"""``fod --help`` lists every command without importing the heavy modules behind them."""

from __future__ import annotations

import argparse
import subprocess
import sys

from fod.cli import COMMANDS, build_parser

_PROBE = """
import contextlib, io, sys
from fod.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(["--help"])
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "onnxruntime", "scipy", "sklearn", "cv2", "onnx") if m in sys.modules)
print(",".join(heavy))
print(out.getvalue())
"""


def test_top_level_help_imports_no_heavy_module() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    heavy, _, help_text = done.stdout.partition("\n")
    assert heavy == ""
    for name in COMMANDS:
        assert f"    {name} " in help_text


def _help_lines(parser: argparse.ArgumentParser) -> dict[str, str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: str(choice.help) for choice in sub._choices_actions}


def test_static_help_lines_name_every_command() -> None:
    lazy = _help_lines(build_parser(""))
    assert set(lazy) == set(COMMANDS)
    assert all(text and "unavailable" not in text for text in lazy.values())


def test_named_command_gets_its_full_parser() -> None:
    args = build_parser("build").parse_args(["build", "--model", "pkg", "--precision", "fp16"])
    assert args.command == "build"
    assert args.precision == "fp16"
    assert callable(args.run)
