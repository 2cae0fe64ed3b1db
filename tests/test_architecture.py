"""The package's import graph has no circles (every import counted, those inside functions and
under TYPE_CHECKING too): a module never needs one that needs it back."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "moesim"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imported(node: ast.AST, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        return [f"{base}.{a.name}" for a in node.names] + [base]
    return []


def import_graph() -> nx.DiGraph:
    """Module -> module it imports (a ``from pkg import sub`` counts as ``pkg.sub`` only)."""
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = _imported(node, package)
            if isinstance(node, ast.ImportFrom) and all(n in modules for n in names[:-1]):
                names = names[:-1]  # submodules named: the package itself is not the target
            for target in names:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("moesim") and target != name:
                    graph.add_edge(name, target)
    return graph


def test_the_import_graph_has_no_circles() -> None:
    graph = import_graph()
    assert graph.number_of_nodes() > 50  # the check sees the package
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import circles: {sorted(cycles, key=len)[:5]}"


def test_the_check_finds_a_circle(tmp_path: Path) -> None:
    graph = import_graph()
    graph.add_edge("moesim.registry", "moesim.config.loading")  # loading -> ... -> registry
    assert list(nx.simple_cycles(graph))
