"""The package's layers (docs/development.md, Layout): utils <- the method (src/sapt/, src/sapt/methods/) <- training
<- experiments <- tools <- the command entries. No module imports from a layer after its own, and no modules import each other in a
cycle. Checked on the syntax tree of every module, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "sapt"
LAYERS = ("utils", "method", "training", "experiments", "tools", "commands")
# `python -m sapt COMMAND`: the one front door at the top, naming each command's home below.
COMMANDS = {"__main__"}


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package at `package` (named by its folder)."""
    names = {}
    for path in package.rglob("*.py"):
        parts = [package.name, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module `name` imports (absolute or relative, at any depth of the file)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known}
    return found - {name}


def import_graph(package: Path) -> dict[str, set[str]]:
    names = module_names(package)
    return {name: imported_modules(name, path, set(names)) for name, path in names.items()}


def layer_of(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 2 and parts[1] in COMMANDS:
        return "commands"
    if parts[1:2] == ["methods"]:  # the methods' records and their code are part of the method
        return "method"
    return parts[1] if len(parts) > 2 or parts[1:] and parts[1] in LAYERS else "method"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return sorted(f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, targets in graph.items() for b in targets
                  if rank[layer_of(b)] > rank[layer_of(a)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (depth-first search; the graph is small)."""
    found, done = [], set()

    def visit(node, path):
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])
    return found


def test_the_scan_sees_the_imports():
    graph = import_graph(PACKAGE)
    assert set(LAYERS[:-1]) - {"method"} <= {name.split(".")[1] for name in graph if name.count(".") == 2}
    # A plain, a lazy (inside a function) and a relative-upwards import, each as written in the source.
    assert "sapt.checkpoint" in graph["sapt.training.train_task"]
    assert "sapt.experiments.evaluate" in graph["sapt.tools.export"]
    assert "sapt.utils.zero3" in graph["sapt.layer"]
    assert sum(len(targets) for targets in graph.values()) > 100


def test_no_module_imports_a_later_layer():
    assert upward_imports(import_graph(PACKAGE)) == []


def test_no_import_cycle_among_modules():
    assert cycles(import_graph(PACKAGE)) == []


def test_the_front_door_is_the_only_command_entry_and_imports_nothing_up_front():
    """Each command loads its own home when it runs (`python -m sapt` alone stays light)."""
    graph = import_graph(PACKAGE)
    assert graph["sapt.__main__"] == set()
    entries = {name for name, path in module_names(PACKAGE).items() if "__main__" in path.read_text(encoding="utf-8")
               and name.count(".") == 1}
    assert entries == {"sapt.__main__"}


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    fake = tmp_path / "sapt"
    for folder in ("", "experiments", "utils"):
        (fake / folder).mkdir(exist_ok=True)
        (fake / folder / "__init__.py").write_text("")
    (fake / "checkpoint.py").write_text("def f():\n    from .experiments.cl_metrics import TASK_ORDER_FILE\n")
    (fake / "experiments" / "cl_metrics.py").write_text("from ..utils import fileio\n")
    (fake / "utils" / "fileio.py").write_text("import sapt.utils.cli\n")
    (fake / "utils" / "cli.py").write_text("from sapt.utils.fileio import x\n")
    graph = import_graph(fake)
    assert upward_imports(graph) == ["sapt.checkpoint (method) imports sapt.experiments.cl_metrics (experiments)"]
    assert cycles(graph) == [["sapt.utils.fileio", "sapt.utils.cli", "sapt.utils.fileio"]]
