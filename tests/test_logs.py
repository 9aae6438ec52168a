"""One log format for every command; the Trainer's logs with numbers as numbers."""

from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
import sys
from types import SimpleNamespace

from conftest import REPO_ROOT
from sapt.training.trainer import LogMetrics

LINE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO sapt\.example: hello"


def test_the_format_wins_over_a_librarys_basic_config():
    """absl (imported by rouge_score) calls logging.basicConfig() on import; the command's format still holds."""
    code = ("import logging; logging.basicConfig(); from sapt.utils.logs import setup_cli_logging; "
            "setup_cli_logging(); logging.getLogger('sapt.example').info('hello')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert re.fullmatch(LINE, done.stderr.strip()), done.stderr


def _sets_up_logging(node: ast.AST) -> bool:
    """logging.basicConfig(...) or logging.Formatter(...); string.Formatter is a template parser, not logging."""
    if not isinstance(node, ast.Attribute):
        return False
    if node.attr == "basicConfig":
        return True
    return node.attr == "Formatter" and isinstance(node.value, ast.Name) and node.value.id == "logging"


def test_no_entry_point_sets_up_logging_its_own_way():
    """Every command (and bench) sets up logging with sapt.utils.logs.setup_cli_logging, no basicConfig."""
    files = [*(REPO_ROOT / "src").rglob("*.py"), *(REPO_ROOT / "bench").glob("*.py")]
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if path.name != "logs.py" and _sets_up_logging(node):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert offenders == []


def test_trainer_logs_are_numbers(caplog):
    state = SimpleNamespace(is_local_process_zero=True, global_step=7)
    logs = {"eval_exact_match": 0.0, "eval_rougeL": 12.345678, "epoch": 1.0, "total_flos": 3.0, "step": 7}
    with caplog.at_level(logging.INFO, logger="sapt"):
        LogMetrics().on_log(None, state, None, logs=logs)
    (record,) = caplog.records
    head, payload = record.getMessage().split(": ", 1)
    assert head == "step 7"
    assert json.loads(payload) == {"eval_exact_match": 0.0, "eval_rougeL": 12.3457, "epoch": 1.0, "step": 7}
