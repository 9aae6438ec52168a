"""`python -m sapt COMMAND`: the one front door lists every command, runs each with its own arguments and
exit status, and refuses an unknown one in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sapt.__main__ import COMMANDS, main
from sapt.experiments import pipeline


def sapt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sapt", *args], capture_output=True, text=True, timeout=300)


def test_without_a_command_every_command_is_listed():
    done = sapt()
    assert done.returncode == 0
    listed = [line.split()[0] for line in done.stdout.split("commands:\n")[1].splitlines()]
    assert listed == list(COMMANDS)


def test_an_unknown_command_is_one_line_and_exit_2():
    done = sapt("trian_task")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"sapt: unknown command 'trian_task'; use one of {', '.join(COMMANDS)}"
    ]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_shows_its_own_help(name, capsys):
    """The command's parser gets the arguments after its name (its --help exits 0 and names it)."""
    try:
        code = main([name, "--help"])
    except SystemExit as stop:  # argparse's --help
        code = stop.code
    out = capsys.readouterr().out
    assert code in (0, None) and out.startswith("usage:")
    assert f"sapt {name}" in out.splitlines()[0] or "gen_script" in out or "score.py" in out, out.splitlines()[0]


def test_a_commands_exit_status_comes_through():
    done = sapt("score", "no_such_run", "--root", "no_such_root")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_generate_knows_exactly_the_presets_that_write_pipelines():
    presets = json.loads((pipeline.PACKAGE_CONFIGS / "presets.json").read_text())
    assert set(pipeline.GENERATOR_PRESETS) == {name for name in presets if name != "quick" and not name.startswith("_")}
    assert pipeline.generate(["no_such_preset"]) == 2
    assert pipeline.generate(["--help"]) == 0
