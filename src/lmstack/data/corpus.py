"""The embedded default corpus: English text every Python installation already carries.

Two sources, both part of CPython itself (PSF license), so `lmstack train` works offline on a fresh
machine with nothing to download:

1. `python_docs` — the reference-manual topics behind `help("if")`, `help("FORMATTING")`, ...:
   the values of `pydoc_data.topics.topics`, about 80 documents and 0.5 MB of prose and examples.
2. `python_docstrings` — the docstrings of the standard library, one document per module, found by
   *parsing* every `.py` file under the stdlib folder with `ast` (never importing it: importing runs
   code, can be slow or fail, and depends on the platform). Test suites, `site-packages` and private
   (single-underscore) functions and classes are skipped; docstrings are dedented with
   `inspect.cleandoc` (what `ast.get_docstring` does). About 2 MB.

Files are visited in sorted order and nothing depends on the environment besides the Python version,
so the corpus — and the dataset version built from it — is the same on every machine running the same
Python release. Roughly 2.5 MB of mostly English text in total.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from pathlib import Path

from lmstack.atomic import atomic_write_text

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
DOC_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def pydoc_topics() -> list[tuple[str, str]]:
    """(topic, text) for each reference-manual topic, sorted by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; the docstrings still make a corpus
        return []
    return [(name, topics[name].strip()) for name in sorted(topics) if topics[name].strip()]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """The stdlib's `.py` files, sorted by their path relative to `root`, test suites excluded."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # prune: site-packages alone can hold 10^4 files
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path.stem


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {node.name}({bases})" if bases else f"class {node.name}"
    return f"{node.name}({ast.unparse(node.args)})"


def _public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def module_docstrings(source: bytes, name: str) -> str:
    """One module's docstrings as a document: the module's own, then each public class and function
    (nested ones too, qualified by their parents), pydoc style: signature line, indented docstring."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # e.g. lib2to3 test data written in Python 2
        return ""
    sections = []
    if doc := ast.get_docstring(tree):
        sections.append(f"Module {name}\n\n{doc}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, DOC_NODES) and _public(node.name):
                if doc := ast.get_docstring(node):
                    indented = "\n".join("    " + line if line else "" for line in doc.splitlines())
                    sections.append(f"{prefix}{_signature(node)}\n{indented}")
                visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, "")
    if sections and not sections[0].startswith("Module "):
        sections.insert(0, f"Module {name}")
    return "\n\n".join(sections)


def stdlib_docstrings(root: Path | None = None) -> list[tuple[str, str]]:
    """(module name, document) for each stdlib module that has docstrings, in sorted path order."""
    root = stdlib_dir() if root is None else Path(root)
    out = []
    for path in stdlib_files(root):
        name = module_name(path, root)
        text = module_docstrings(path.read_bytes(), name)
        if text:
            out.append((name, text))
    return out


def default_corpus(root: Path | None = None) -> list[str]:
    """The documents of the default corpus: reference topics, then module docstrings."""
    return [text for _, text in pydoc_topics()] + [text for _, text in stdlib_docstrings(root)]


def write_default_corpus(directory: str | Path, root: Path | None = None) -> list[Path]:
    """Write the corpus as two JSONL files (`{"name": ..., "text": ...}` per line), one per source,
    ready for `prepare_dataset`; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename, records in (
        ("python_docs.jsonl", pydoc_topics()),
        ("python_docstrings.jsonl", stdlib_docstrings(root)),
    ):
        if not records:
            continue
        lines = (json.dumps({"name": n, "text": t}, ensure_ascii=False) for n, t in records)
        path = directory / filename
        atomic_write_text(path, "\n".join(lines) + "\n")
        paths.append(path)
    return paths
