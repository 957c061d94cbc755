"""The package's shape: its import graph has no circle, and nothing below the ``Lamb`` face holds the optimizer.

Read from the source (every import counts, type-hint-only ones and those inside functions included).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "torch_lamb"
FACE_AND_TOOLS = {"optimizer", "__init__", "__main__", "cli", "demo", "bench", "data", "recipes"}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def _imports() -> dict[str, set[str]]:
    """Each module's imports of other modules of the package (by dotted name below ``torch_lamb``)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".") if package and package != "__init__" else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                # `from . import x` imports the submodule x, not the package's own namespace
                candidates = ([target] if node.module else []) + [f"{target}.{a.name}" if target else a.name
                                                                   for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch_lamb"):
                target = node.module.removeprefix("torch_lamb").lstrip(".")
                candidates = [target] + [f"{target}.{a.name}" if target else a.name for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name.removeprefix("torch_lamb.") for a in node.names
                              if a.name.startswith("torch_lamb.")]
            else:
                continue
            found |= {c or "__init__" for c in candidates if (c or "__init__") in modules and c != name}
        graph[name] = found
    return graph


def test_the_import_graph_has_no_circle() -> None:
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(f"import circle: {' -> '.join([*path[path.index(nxt):], nxt])}")
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert graph["optimizer"] >= {"config", "clock", "plan", "engine", "layout"}  # the reader sees the real graph


def test_nothing_below_the_face_imports_lamb_or_reads_its_fields() -> None:
    graph = _imports()
    below = [m for m in graph if m.split(".")[0] not in FACE_AND_TOOLS and not m.startswith("integrations")]
    assert "engine" in below and "backends.cpu_kernel" in below
    for name in below:
        assert "optimizer" not in graph[name], f"{name} imports the optimizer"
        path = PACKAGE / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = PACKAGE / name.replace(".", "/") / "__init__.py"
        source = path.read_text()
        assert not re.search(r"\b(?:opt|optimizer)\._[a-z]\w*", source), f"{name} reads a private field of an optimizer"
        names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
        names |= {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert "Lamb" not in names, f"{name} names Lamb in its code"
