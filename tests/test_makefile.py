"""The Makefile: every target runs the interpreter named by PYTHON, and `make -n` only prints."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def targets() -> list[str]:
    phony = re.search(r"^\.PHONY:(.*)$", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE)
    return phony.group(1).split()


def test_the_phony_line_lists_the_targets():
    assert {"setup", "data", "test", "demo", "model"} <= set(targets())


@pytest.mark.parametrize("target", targets())
def test_make_n_prints_the_recipe_with_the_given_python_and_runs_nothing(tmp_path, target):
    marker = tmp_path / "ran"
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")  # any run of it leaves the marker
    python.chmod(0o755)
    done = subprocess.run(["make", "-n", "-C", str(REPO_ROOT), target, f"PYTHON={python}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"{python} " in done.stdout and not marker.exists()
    assert not re.search(r"(^|[\s;&|(])python3? ", done.stdout, re.MULTILINE)  # no bare `python` anywhere
