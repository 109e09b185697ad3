"""``builtin:python-docs``: English technical text that ships with Python itself.

The quickstart must run on a machine with no network at all, so its corpus is what every Python
installation carries: the pydoc topic pages (``pydoc_data.topics``) and the docstrings of the
standard library. Docstrings are read with ``ast`` from the source files, never by importing the
modules (imports have side effects, ``antigravity`` opens a browser). The order is sorted and
therefore deterministic for a given Python version, which the manifest records as the revision.
About 2 MB of text (0.73M GPT-2 tokens) on Python 3.11.7.
"""

from __future__ import annotations

import ast
import functools
import os
import platform
import sysconfig

from data_prep.config import BuiltinSource
from data_prep.sources import BATCH, DocBatch, Piece, Plan, Task

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
FILES_PER_TASK = 96


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """Relative paths of the standard library's ``.py`` files, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("."))
        found += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py")]
    return tuple(sorted(found))


def plan(src: BuiltinSource) -> Plan:
    files = stdlib_files()
    tasks = [Task(0, (Piece(f"{src.name}:topics", "builtin"),))]
    for start in range(0, len(files), FILES_PER_TASK):
        stop = min(start + FILES_PER_TASK, len(files))
        tasks.append(Task(len(tasks), (Piece(f"{src.name}:stdlib", "builtin", start, stop),)))
    version = platform.python_version()
    desc = {"type": "builtin", "name": src.name, "python": version, "stdlib_files": len(files)}
    return Plan(tasks, desc, revision=f"python-{version}")


def module_text(relpath: str) -> tuple[str, str] | None:
    """(module name, its docstrings as one document) or None when it has none."""
    root = sysconfig.get_paths()["stdlib"]
    try:
        with open(os.path.join(root, relpath), "rb") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, ValueError, OSError):
        return None
    module = relpath[:-3].replace(os.sep, ".").removesuffix(".__init__")
    parts = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    parts.append(f"{name}\n{doc}")
                visit(child, name)

    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n{doc}")
    visit(tree, module)
    return (module, "\n\n".join(parts)) if parts else None


def read(piece: Piece):
    if piece.path.endswith(":topics"):
        from pydoc_data.topics import topics
        names = sorted(topics)
        docs = [(f"pydoc-topics:{n}", topics[n]) for n in names]
    else:
        docs = []
        for rel in stdlib_files()[piece.start:piece.stop]:
            found = module_text(rel)
            if found:
                docs.append((f"stdlib:{found[0]}", found[1]))
    for i in range(0, len(docs), BATCH):
        part = docs[i:i + BATCH]
        yield DocBatch([t for _, t in part], ids=[k for k, _ in part], rows=len(part))
