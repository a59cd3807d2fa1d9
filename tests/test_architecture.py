"""The house's shape, kept: no import cycle among cityseg's modules (deferred and
TYPE_CHECKING imports counted), imports that flow one way between the packages, the heavy
libraries each imported in one place, and modules and packages of a readable size."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "cityseg"
MAX_LINES = 350
MAX_MODULES = 12  # per package, its __init__ included

# package -> the cityseg packages and top-level modules it must never import (directly or
# through a deferred import): the import order of docs/architecture.md
FORBIDDEN = {
    "runtime": {"config", "data", "models", "losses", "metrics", "optim", "viz", "checkpoints",
                "tracking", "train", "infer", "deploy", "sweep", "cli", "bench"},
    "checkpoints": {"tracking", "train", "infer", "deploy", "sweep", "cli", "bench"},
    "tracking": {"train", "infer", "deploy", "sweep", "cli", "bench", "checkpoints"},
    "config": {"train", "infer", "deploy", "tracking", "sweep", "cli", "bench", "checkpoints"},
    "data": {"train", "infer", "deploy", "tracking", "sweep", "cli", "bench"},
    "models": {"train", "infer", "deploy", "tracking", "sweep", "cli", "bench"},
    "infer": {"train", "deploy", "sweep", "cli", "bench"},
    "deploy": {"train", "sweep", "cli", "bench"},
    "train": {"sweep", "cli", "bench"},
    "sweep": {"cli", "bench"},
}
# a third-party import -> the only cityseg modules that may import it
ONLY_IN = {
    "mlflow": ("cityseg.tracking", "cityseg.deploy.pyfunc"),  # MLflow runs the pyfunc as code
    "optuna": ("cityseg.sweep.study",),
    "av": ("cityseg.infer.video",),
}


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package at `root` by dotted name (a package by its own name)."""
    found = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module name `name` imports anywhere in its file (functions and TYPE_CHECKING
    blocks included), relative imports resolved: `from a import b` names a.b when b is a
    module, else a."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                as_file = root.parent.joinpath(*f"{base}.{alias.name}".split("."))
                is_module = as_file.with_suffix(".py").is_file() or as_file.is_dir()
                found.add(f"{base}.{alias.name}" if is_module else base)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (each name resolved to its module)."""
    known = modules(root)
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        edges[name] = set()
        for imported in imports(name, path, root):
            while imported and imported not in known:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges[name].add(imported)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def _top(name: str) -> str:
    """cityseg.train.runner -> train; cityseg.checkpoints -> checkpoints."""
    return name.split(".")[1] if name.count(".") else ""


def test_no_module_of_cityseg_is_in_an_import_cycle():
    assert cycles(graph(PACKAGE)) == []


def test_the_cycle_check_finds_a_cycle_made_by_a_deferred_or_type_checking_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("from pkg.low.store import Store\n")
    (pkg / "low" / "store.py").write_text("class Store: ...\n")
    (pkg / "high.py").write_text("from pkg.low import store\n")
    assert cycles(graph(pkg)) == []  # a package re-exporting its own module: no cycle
    (pkg / "low" / "store.py").write_text(
        "class Store:\n    def load(self):\n        from pkg import high  # deferred\n")
    assert cycles(graph(pkg)) == [["pkg.high", "pkg.low.store"]]
    (pkg / "low" / "store.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import X\n")
    assert cycles(graph(pkg)) == [["pkg.high", "pkg.low.store"]]
    # a module importing its own package's __init__, which imports it back
    (pkg / "low" / "store.py").write_text("from pkg.low import Store\n")
    assert cycles(graph(pkg)) == [["pkg.low", "pkg.low.store"]]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package):
    edges = graph(PACKAGE)
    wrong = sorted(f"{m} imports {t}" for m, targets in edges.items() if _top(m) == package
                   for t in targets if _top(t) in FORBIDDEN[package])
    assert wrong == []


@pytest.mark.parametrize("library", sorted(ONLY_IN))
def test_a_heavy_library_is_imported_in_one_place(library):
    allowed = ONLY_IN[library]
    found = sorted(name for name, path in modules(PACKAGE).items()
                   if any(i == library or i.startswith(library + ".")
                          for i in imports(name, path))
                   and not any(name == a or name.startswith(a + ".") for a in allowed))
    assert found == []


def test_modules_and_packages_stay_readable():
    known = modules(PACKAGE)
    long = {name: n for name, path in known.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
    crowded = {d.name: n for d in PACKAGE.rglob("*") if d.is_dir() and d.name != "__pycache__"
               if (n := len(list(d.glob("*.py")))) > MAX_MODULES}
    assert crowded == {}


def test_every_package_names_its_modules_in_its_docstring():
    for init in PACKAGE.rglob("__init__.py"):
        if init.parent == PACKAGE:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        missing = sorted(p.name for p in init.parent.glob("*.py")
                         if p.name not in ("__init__.py", "__main__.py") and p.name not in doc)
        assert missing == [], f"{init}: its docstring does not name {missing}"
