"""No pickle (docs/differences.md): no code of the project unpickles except the restricted unpickler of
sapt/tools/safe_pickle.py, and every torch.load passes weights_only=True. Checked on the syntax tree of every
.py file of the repository (package, scripts, benchmarks, top-level scripts; tests excluded)."""

from __future__ import annotations

import ast
import os
import textwrap
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
PICKLE_NAMES = ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler")
FORBIDDEN = {f"{module}.{name}" for module in PICKLE_MODULES for name in PICKLE_NAMES}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
SAFE_PICKLE = Path("src/sapt/tools/safe_pickle.py")
SKIPPED_DIRS = {"tests", "__pycache__", "build", "dist", "logs_and_outputs", "tiny_models", "CL_Benchmark",
                "generated_data", "node_modules", "results"}


def project_files(root: Path = REPO_ROOT) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".") and not d.endswith(".egg-info"))
        found += [Path(folder) / name for name in sorted(files) if name.endswith(".py")]
    return found


class _Names(ast.NodeVisitor):
    """Local name -> the dotted name it stands for, from the module's imports."""

    def __init__(self):
        self.aliases: dict[str, str] = {}

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                top = alias.name.split(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.module and not node.level:
            for alias in node.names:
                self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _is_restricted_unpickler(parent: ast.AST | None, node: ast.AST) -> bool:
    """`class X(pickle.Unpickler)` that overrides find_class (the allowlisting loader)."""
    return (
        isinstance(parent, ast.ClassDef)
        and node in parent.bases
        and any(isinstance(item, ast.FunctionDef) and item.name == "find_class" for item in parent.body)
    )


def _weights_only(call: ast.AST | None, node: ast.AST) -> bool:
    if not isinstance(call, ast.Call) or call.func is not node:
        return False
    return any(
        kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
        for kw in call.keywords
    )


def violations(source: str, relative: Path) -> list[str]:
    tree = ast.parse(source, filename=str(relative))
    names = _Names()
    names.visit(tree)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Name, ast.Attribute)) or isinstance(parents.get(node), ast.Attribute):
            continue  # only whole dotted names (pickle.loads, not its `pickle` part)
        dotted = _dotted(node, names.aliases)
        parent = parents.get(node)
        if dotted in FORBIDDEN:
            if relative == SAFE_PICKLE and _is_restricted_unpickler(parent, node):
                continue
            found.append(f"{relative}:{node.lineno}: {dotted}")
        elif dotted in TORCH_LOADS and not _weights_only(parent, node):
            found.append(f"{relative}:{node.lineno}: {dotted} without weights_only=True")
    for node in ast.walk(tree):  # `from pickle import loads` is a violation even if never called
        if isinstance(node, ast.ImportFrom) and node.module in PICKLE_MODULES:
            for alias in node.names:
                if alias.name in PICKLE_NAMES:
                    found.append(f"{relative}:{node.lineno}: from {node.module} import {alias.name}")
    return sorted(set(found))


def test_the_scan_covers_the_project():
    files = {p.relative_to(REPO_ROOT) for p in project_files()}
    assert SAFE_PICKLE in files and Path("src/sapt/tools/interop.py") in files and Path("score.py") in files
    assert not [f for f in files if f.parts[0] == "tests"]


def test_no_pickle_loading_outside_the_restricted_unpickler():
    problems = []
    for path in project_files():
        relative = path.relative_to(REPO_ROOT)
        problems += violations(path.read_text(encoding="utf-8"), relative)
    assert not problems, "unpickling outside sapt/tools/safe_pickle.py's restricted loader:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "source,flagged",
    [
        ("import pickle\npickle.load(f)", True),
        ("import pickle as p\np.loads(b)", True),
        ("from pickle import loads\n", True),
        ("from pickle import Unpickler as U\nU(f).load()", True),
        ("import pickle\nclass U(pickle.Unpickler):\n    pass", True),
        ("import _pickle\n_pickle.loads(b)", True),
        ("import pickle\npickle.dumps(x)", False),
        ("import torch\ntorch.load(f)", True),
        ("import torch\ntorch.load(f, weights_only=False)", True),
        ("import torch\ntorch.load(f, **options)", True),
        ("import torch\nload = torch.load", True),
        ("from torch import load\nload(f)", True),
        ("import torch as t\nt.load(f, map_location='cpu')", True),
        ("import torch\ntorch.load(f, weights_only=True, map_location='cpu')", False),
        ("from torch import load\nload(f, weights_only=True)", False),
        ("import json\njson.load(f)", False),
    ],
)
def test_scanner_recognises(source, flagged):
    assert bool(violations(textwrap.dedent(source), Path("x.py"))) == flagged


def test_only_the_restricted_unpickler_may_subclass():
    source = "import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n        raise ValueError\n"
    assert violations(source, SAFE_PICKLE) == []
    assert violations(source, Path("src/sapt/other.py"))
    assert violations(source + "pickle.loads(b)\n", SAFE_PICKLE)
