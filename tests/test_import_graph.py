"""Who may import whom (docs/product.md, "Who may import whom"): a static walk of every import, plus two
subprocess checks that the torch-free parts really load without torch, scipy and sklearn.

The walk reads each module of the product packages with :mod:`ast` and collects every ``import`` /
``from ... import`` statement, at module level or inside a function (a lazy import is still an
edge). Imports by string (``importlib.import_module("fod_tools.demo")`` in the console scripts)
are how the entry points reach the tooling, and are not edges.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fod", "calibration", "engine_build", "agent", "fod_tools")

CORE = frozenset(
    {
        "fod",  # the package root: __version__ only
        "fod.errors",
        "fod.package",
        "fod.preprocess",
        "fod.runner",
        "fod.timing",
        "fod.normalization",
        "fod.compare",
    }
)
"""The torch-free runtime core: package format, preprocessing, runner base + ONNX Runtime runner,
timing, score normalisation and the one comparator of two runners' outputs."""

HEAVY = ("torch", "scipy", "sklearn")
#: engine_build modules the agent may load (lazily): the TensorRT runtime and what it needs
ENGINE_RUNTIME = frozenset({"engine_build.errors", "engine_build.runner", "engine_build.manifest"})


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``line`` (``lazy``: inside a function or class body)."""

    source: str
    target: str
    line: int
    lazy: bool

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}{' (lazily)' if self.lazy else ''}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def edges_of(path: Path) -> list[Edge]:
    source = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    found: list[Edge] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            if isinstance(child, ast.Import):
                found.extend(Edge(source, alias.name, child.lineno, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    target = f"{base}.{child.module}" if child.module else base
                else:
                    target = child.module or ""
                found.append(Edge(source, target, child.lineno, lazy))
                # ``from fod import package`` imports the submodule fod.package
                for alias in child.names:
                    candidate = f"{target}.{alias.name}"
                    if (REPO / Path(*candidate.split("."))).with_suffix(".py").is_file():
                        found.append(Edge(source, candidate, child.lineno, lazy))
            visit(child, inner)

    visit(tree, False)
    return found


def all_edges() -> list[Edge]:
    edges: list[Edge] = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            edges.extend(edges_of(path))
    return edges


def top(name: str) -> str:
    return name.split(".")[0]


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def forbidden(edge: Edge) -> str | None:
    """Why ``edge`` breaks the rules, or None when it is allowed."""
    src, dst = edge.source, edge.target
    ours = top(dst) in PACKAGES
    if top(src) != "fod_tools" and top(dst) == "fod_tools":
        return "the runtime never imports the tooling (fod_tools)"
    if src in CORE:
        if ours and dst not in CORE:
            return "the runtime core imports only the core"
        if top(dst) in (*HEAVY, "tensorrt"):
            return "the runtime core loads no torch, scipy, sklearn or TensorRT"
    if in_package(src, "fod"):
        if top(dst) in ("agent", "calibration", "engine_build", "tensorrt"):
            return "fod (the model) knows no agent, calibration, engine_build or TensorRT"
    if in_package(src, "calibration"):
        if top(dst) in ("agent", "engine_build", "tensorrt"):
            return "calibration imports the core and fod model modules, never agent or engine_build"
    if in_package(src, "engine_build"):
        if top(dst) in ("agent", "calibration"):
            return "engine_build knows no agent loop and no calibration"
        if top(dst) == "fod" and dst not in CORE:
            return "engine_build imports the core, never fod model modules"
        if top(dst) in HEAVY:
            return "engine_build loads no torch, scipy or sklearn"
    if in_package(src, "agent"):
        if top(dst) in (*HEAVY, "calibration"):
            return "the agent imports no torch, scipy, sklearn or calibration"
        if top(dst) == "fod" and dst not in CORE:
            return "the agent imports the core only, never fod model modules"
        if top(dst) == "engine_build" and (dst not in ENGINE_RUNTIME or not edge.lazy):
            return "the agent imports engine_build's runtime only, and lazily"
    return None


def test_no_forbidden_edge() -> None:
    broken = [f"{edge}: {why}" for edge in all_edges() if (why := forbidden(edge))]
    assert not broken, "forbidden imports:\n" + "\n".join(broken)


def test_every_core_module_exists() -> None:
    missing = [name for name in CORE if not (REPO / Path(*name.split("."))).with_suffix(".py").is_file()
               and not (REPO / Path(*name.split(".")) / "__init__.py").is_file()]
    assert not missing


@pytest.mark.parametrize(
    ("edge", "allowed"),
    [
        (Edge("fod.runner", "fod.preprocess", 1, False), True),
        (Edge("fod.runner", "fod.model", 1, True), False),  # core reaching into the model
        (Edge("fod.package", "scipy.stats", 1, True), False),  # core loading scipy, even lazily
        (Edge("fod.export", "engine_build.parity", 1, True), False),  # model knowing engine_build
        (Edge("fod.cli", "fod_tools.bench.models", 1, True), False),  # runtime importing tooling
        (Edge("agent.pipeline", "calibration.normalization", 1, False), False),
        (Edge("agent.backends", "engine_build.runner", 1, True), True),
        (Edge("agent.backends", "engine_build.runner", 1, False), False),  # not lazily
        (Edge("agent.backends", "engine_build.cli", 1, True), False),  # not the runtime part
        (Edge("engine_build.parity", "fod.compare", 1, False), True),
        (Edge("engine_build.cli", "fod.torch_runner", 1, True), False),
        (Edge("calibration.gate", "agent.errors", 1, False), False),
        (Edge("fod_tools.bench.agent", "agent.pipeline", 1, False), True),
    ],
)
def test_rules_table(edge: Edge, allowed: bool) -> None:
    assert (forbidden(edge) is None) == allowed


def _loads_without_heavy(modules: list[str]) -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"heavy = sorted(m for m in {list(HEAVY)!r} if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {modules} loaded {out.stdout.strip()}"


def test_core_loads_without_torch_scipy_sklearn() -> None:
    _loads_without_heavy(sorted(CORE))


def test_agent_and_engine_build_load_without_torch_scipy_sklearn() -> None:
    modules = [
        module_name(path)
        for package in ("agent", "engine_build")
        for path in sorted((REPO / package).rglob("*.py"))
    ]
    _loads_without_heavy(modules)
