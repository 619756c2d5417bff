"""Prepare the TensorRT type stubs for mypy: ``python -m tests.engine_build.trt_stubs``.

``tensorrt-stubs`` (a dev dependency) installs ``tensorrt/__init__.pyi`` and ``tensorrt_bindings/*.pyi``
into site-packages without a ``py.typed`` marker, so mypy skips them and every TensorRT call would be
typed ``Any`` (nothing checked). A few of its lines are also not valid Python (a parameter named ``in``,
a required parameter after defaulted ones). This script copies the stubs to ``build/typings`` (the
``mypy_path`` in pyproject.toml) and repairs those lines, so that ``mypy engine_build`` checks our
TensorRT calls against the real API signatures. Run it once after ``pip install -e '.[dev]'``.

``tensorrt-stubs`` declares a dependency on ``tensorrt`` itself, whose install downloads from NVIDIA's
index and fails on machines without it; when the stubs are missing this script installs them with
``pip install --no-deps`` (they need nothing at type-check time).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGET = REPO / "build" / "typings"
STUBS = "tensorrt-stubs==10.13.0.35.1"

# (pattern, replacement) applied to every stub file
FIXES: list[tuple[str, str]] = [
    # lines that Python's parser rejects
    (r"\bin: list\[", "in_: list["),  # `in` is a keyword
    (r"power: Weights = None, channel_axis: int\)", "power: Weights = None, channel_axis: int = ...)"),
    # the stubs define a module-level `bool: DataType` (tensorrt.bool), which shadows the builtin in every
    # annotation: `-> bool` became an invalid type and mypy skipped `if not parser.parse(...)` blocks as
    # unreachable. Point annotations at the builtin; the module-level `bool` (at a line start) stays.
    (r"(?<=[ \[(|,])bool\b", "builtins.bool"),
    (r"^from __future__ import annotations\n", "from __future__ import annotations\nimport builtins\n"),
]


def main() -> int:
    """Copy and repair the stubs; return the exit code (1 when tensorrt-stubs is not installed)."""
    try:
        dist = metadata.distribution("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        print(f"installing {STUBS} without its dependencies (it only needs to be read)")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", STUBS], check=False)
        if done.returncode != 0:
            print(f"cannot install {STUBS}: pip exited {done.returncode}", file=sys.stderr)
            return 1
        dist = metadata.distribution("tensorrt-stubs")
    stubs = [f for f in dist.files or [] if f.name.endswith(".pyi")]
    if not stubs:
        print("tensorrt-stubs has no .pyi files; reinstall it", file=sys.stderr)
        return 1
    shutil.rmtree(TARGET / "tensorrt", ignore_errors=True)
    shutil.rmtree(TARGET / "tensorrt_bindings", ignore_errors=True)
    for rel in stubs:
        text = Path(str(dist.locate_file(rel))).read_text()
        for pattern, repl in FIXES:
            text = re.sub(pattern, repl, text, flags=re.MULTILINE)
        out = TARGET / str(rel)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(f"TensorRT stubs {dist.version}: {len(stubs)} files -> {TARGET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
