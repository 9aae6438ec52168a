"""The run-folder format: the name of every file a task step writes and the scorer, generator,
re-evaluation and importer read.

A run's ``outputs/`` holds TASK_ORDER_FILE and one ``<i>-<task>/`` folder per trained task (see the
README's run-folder format). Defined here, at the bottom of the package and without torch, so that the
method's ``checkpoint`` and the harness's writer and scorer import the same names.
"""

import re
from pathlib import Path

TASK_ORDER_FILE = "task_order.txt"
# Held by the pipeline or task step writing the run (sapt.utils.run_lock): one writer per outputs/ folder.
RUN_LOCK_FILE = "run.lock"
RESULTS_FILE = "all_results.json"
COMPLETE_FILE = "task_complete.json"  # written last by a finished task step: its folder is whole
ROUTING_FILE = "routing_weights.json"  # mean routing of each seen task's test inputs, after this task
# How routing moved while a routed task trained: one JSON line per record (sapt.training.routing_trace).
ROUTING_TRACE_FILE = "routing_trace.jsonl"
# What the task step was trained and evaluated with (train_task's arguments): for re-evaluation and reports.
TASK_ARGS_FILE = "task_args.json"
# Test predictions of a task folder: PREDICTIONS_DIR/<task>.jsonl, one record per test input; for a
# routed model each record carries under ROUTING_KEY the routing weights that input got (oldest block first).
PREDICTIONS_DIR = "predictions"
ROUTING_KEY = "routing"
# A task's folder under outputs/ (and its pipeline step config, "<i>-<task>.json"): i is its 1-based place.
TASK_DIR_PATTERN = re.compile(r"^(\d+)-(.+)$")
# all_results.json keys of each seen task's test score, by metric.
RESULT_KEY_PREFIX = {"rougeL": "predict_eval_rougeL_for_", "exact_match": "predict_exact_match_for_"}


def task_dir_name(position: int, task: str) -> str:
    """`<i>-<task>`: the folder of the task at 1-based `position` of the order."""
    return f"{position}-{task}"


def run_lock_path(task_dir: str | Path) -> Path:
    """The lock of the run a task folder belongs to: beside it, where task_order.txt is written too."""
    return Path(task_dir).parent / RUN_LOCK_FILE


def result_key(metric: str, task: str) -> str:
    return RESULT_KEY_PREFIX[metric] + task
