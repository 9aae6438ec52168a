"""Every option of every command says what it does, and its help shows its default."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import fields

import pytest

from conftest import REPO_ROOT
from sapt.experiments import pipeline
from sapt.training.task_args import SaptArguments

sys.path.insert(0, str(REPO_ROOT / "bench"))

COMMANDS = ["sapt.experiments.score", "sapt.experiments.evaluate", "sapt.tools.export", "sapt.tools.interop",
            "sapt.tools.prepare_data", "sapt.tools.pseudo_data", "sapt.tools.tiny", "sapt.backbone",
            "cl_real", "cl_behaviour", "speed"]


def generator_parser(preset: str) -> argparse.ArgumentParser:
    presets = json.loads((pipeline.PACKAGE_CONFIGS / "presets.json").read_text())
    orders = json.loads((pipeline.PACKAGE_CONFIGS / "orders.json").read_text())
    return pipeline.build_parser(preset, dict(presets[preset]), orders)


def parsers_of(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers_of(sub)


def parser_of(name: str) -> argparse.ArgumentParser:
    if name.startswith("gen_script_"):
        return generator_parser(name[len("gen_script_"):])
    return importlib.import_module(name).build_parser()


@pytest.mark.parametrize("name", COMMANDS + [f"gen_script_{p}" for p in ("superni_t5", "long_t5", "superni_llama", "long_llama")])
def test_every_option_has_help_and_shows_its_default(name):
    for parser in parsers_of(parser_of(name)):
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name}: {action.dest} has no help"
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                # the text may wrap, so compare without line breaks
                flat = " ".join(text.split())
                shown = " ".join(action.help.split())
                assert shown in flat and ("default" in shown or f"(default: {action.default})" in flat), (name, action.dest)


def test_every_train_task_argument_has_help():
    assert [f.name for f in fields(SaptArguments) if not f.metadata.get("help")] == []
