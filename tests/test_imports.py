"""The package's import graph: model-family modules stay behind the family interface, and no module imports itself
back through others (no import cycles, whether the imports sit at module level or inside functions).

The graph is read from the source with ``ast``: an edge A -> B for every ``import`` / ``from ... import`` in A that
names a module B of the package (``from pkg import name`` points at ``pkg.name`` when that is a module, else at
``pkg``). Imports under ``if TYPE_CHECKING:`` never run, so they do not count for cycles; they do count for the
family rule.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import megatron_vlmr1

PACKAGE = "megatron_vlmr1"
ROOT = Path(megatron_vlmr1.__file__).parent
# Every sub-package of vlm/ is a model family (qwen_vl, internvl, ...).
FAMILY_PACKAGES = sorted(f"{PACKAGE}.vlm.{init.parent.name}" for init in (ROOT / "vlm").glob("*/__init__.py"))


def module_name(path: Path, root: Path = ROOT, package: str = PACKAGE) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            ids.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return ids


def imports_of(source: str, name: str, is_package: bool, modules: set[str]) -> list[tuple[str, bool]]:
    """``(imported module of the package, runs at import/call time)`` for every import statement in ``source``."""
    tree = ast.parse(source)
    typing_only = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                found.append((target, id(node) not in typing_only))
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, list[tuple[str, bool]]]:
    files = {module_name(path, root, package): path for path in sorted(root.rglob("*.py"))}
    modules = set(files)
    return {name: imports_of(path.read_text(), name, path.name == "__init__.py", modules)
            for name, path in files.items()}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def runtime_edges(graph: dict[str, list[tuple[str, bool]]]) -> dict[str, set[str]]:
    return {name: {target for target, runs in found if runs and target in graph} for name, found in graph.items()}


def test_the_checks_see_cycles_and_family_imports(tmp_path):
    pkg = tmp_path / "megatron_vlmr1"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from megatron_vlmr1.a import y\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from . import x\n")
    (pkg / "a" / "z.py").write_text("from typing import TYPE_CHECKING\n"
                                    "if TYPE_CHECKING:\n    from megatron_vlmr1.a import x\n")
    graph = import_graph(pkg)
    assert graph["megatron_vlmr1.a.y"] == [("megatron_vlmr1.a.x", True)]  # relative, inside a function
    assert graph["megatron_vlmr1.a.z"] == [("megatron_vlmr1.a.x", False)]
    assert find_cycles(runtime_edges(graph)) == [["megatron_vlmr1.a.x", "megatron_vlmr1.a.y"]]


def test_no_import_cycles():
    cycles = find_cycles(runtime_edges(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_every_family_package_is_checked():
    assert f"{PACKAGE}.vlm.qwen_vl" in FAMILY_PACKAGES


@pytest.mark.parametrize("family", FAMILY_PACKAGES)
def test_family_modules_are_imported_only_inside_vlm(family):
    offenders = sorted(f"{name} imports {target}" for name, found in import_graph().items()
                       if not name.startswith(f"{PACKAGE}.vlm.") for target, _ in found
                       if target == family or target.startswith(family + "."))
    assert not offenders, offenders
