"""pyproject.toml: the dependencies are the package's imports and what requirements.txt pins; the console
scripts are the commands; the licence it declares is in LICENSE."""

from __future__ import annotations

import ast
import importlib
import sys
import tomllib
from importlib.metadata import packages_distributions

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO_ROOT

PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def declared() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, PROJECT["dependencies"])}


def extras() -> set[str]:
    return {canonicalize_name(Requirement(r).name) for group in PROJECT["optional-dependencies"].values() for r in group}


def pinned() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (version,) = [spec.version for spec in requirement.specifier if spec.operator == "=="]
            pins[canonicalize_name(requirement.name)] = version
    return pins


def test_dependencies_are_what_requirements_pins_and_admit_the_pins():
    pins = {name: version for name, version in pinned().items() if name not in extras()}  # tests' own tools aside
    assert sorted(declared()) == sorted(pins)
    for name, requirement in declared().items():
        assert requirement.specifier.contains(pins[name]), (name, str(requirement.specifier), pins[name])


def test_every_third_party_import_of_the_package_is_declared():
    distributions = packages_distributions()
    wanted = set()
    for path in (REPO_ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "sapt" and top not in sys.stdlib_module_names:
                    wanted.update(canonicalize_name(d) for d in distributions.get(top, [top]))
    assert wanted - set(declared()) - extras() == set()


def test_one_console_script_is_the_front_door_and_every_command_resolves():
    from sapt.__main__ import COMMANDS

    assert PROJECT["scripts"] == {"sapt": "sapt.__main__:main"}
    for name, (module, function, _) in COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), function)), name


def test_the_declared_licence_is_in_the_checkout():
    text = (REPO_ROOT / "LICENSE").read_text()
    assert PROJECT["license"] == {"text": "Apache-2.0"}
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "Copyright 2026 the sapt authors" in text
