"""The package's imports point one way, down the data flow, and form no circle.

Ranks, bottom to top: plain data and the tokenizer; the data pipeline; the model; quantisation; the
layers built on the model (interop, infer, train, arith, compress); fine-tuning; evaluation and
retrieval; the server; the command line. A module may import its own rank or below. Function-level
imports count: a lazy import still ties two files together.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lmstack"

RANKS = {
    "errors": 0, "atomic": 0, "textfile": 0, "presets": 0, "config": 0,
    "tokenizer": 1,
    "data": 2,
    "model": 3,
    "quant": 4,
    "interop": 5, "infer": 5, "train": 5, "arith": 5, "compress": 5,
    "finetune": 6,
    "eval": 7, "rag": 7,
    "serve": 8,
    "cli": 9, "__main__": 9, "__init__": 9,
}  # fmt: skip


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                )
                base = f"lmstack.{base}" if base else "lmstack"
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target != "lmstack" and not target.startswith("lmstack."):
                continue
            target = target.removeprefix("lmstack").removeprefix(".") or "__init__"
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _rank(module: str) -> int:
    top = module.split(".")[0]
    assert top in RANKS, f"lmstack.{module} has no rank — add its package to RANKS in this test"
    return RANKS[top]


def test_imports_point_down_the_layers():
    mods = _modules()
    upward = [
        f"lmstack.{m} (rank {_rank(m)}) imports lmstack.{t} (rank {_rank(t)})"
        for m, path in sorted(mods.items())
        for t in sorted(_imports(m, path, mods))
        if _rank(t) > _rank(m)
    ]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_no_import_circles():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    # a package's __init__ re-exporting its own submodules is not a circle of two files
    for m in graph:
        graph[m] = {t for t in graph[m] if not (t == m.rpartition(".")[0] and mods[t].name == "__init__.py")}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                circles.append(" <-> ".join(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, "import circles:\n" + "\n".join(circles)
