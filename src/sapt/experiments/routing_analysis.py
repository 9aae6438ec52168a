"""Routing analysis of a run: how often the router sends an input to its own task's block, and what
the re-evaluations with a replaced routing (sapt.evaluate) are called wherever they are printed.

Routing accuracy, row i (the model after task i), column j (a task seen by then): the share, x100, of
task j's test inputs whose largest routing weight is on block j, strictly larger than every other
block's (a tie is not a hit). Blocks are numbered like the tasks (SAPT adds one per task, in order),
and each test record of `<i>-<task>/predictions/<task_j>.jsonl` holds its input's weights, oldest
block first (sapt.run_files.ROUTING_KEY). Runs written before those weights were stored, and methods
without a router, have none: their routing accuracy is "not stored".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..run_files import PREDICTIONS_DIR, ROUTING_KEY, task_dir_name
from .cl_metrics import ScoreError

# What each routing of sapt.evaluate means, as printed in every report of its results.
ROUTINGS = {
    "learned": "learned routing (the router's own weights: reproduces the run)",
    "oracle": "oracle routing: each input one-hot on its own task's block (reads the task id, which SAPT "
              "never sees; meant as an upper bound, but a block trained inside a mixture can score lower alone)",
    "uniform": "uniform routing: equal weights on every block",
    "mean": "mean routing ā: every input of task j gets task j's stored mean routing, zero on newer blocks "
            "(reads the task id too)",
}
SHORT_LABELS = {
    "learned": "learned routing",
    "oracle": "oracle routing: own block only, reads the task id",
    "uniform": "uniform routing",
    "mean": "mean routing ā: reads the task id",
}
ROUTING_ALIASES = {"ā": "mean"}
# Written by sapt.evaluate into the outputs folder of a re-evaluation: which routing made it, and from which run.
EVALUATION_FILE = "routing_evaluation.json"

NOT_STORED = "routing accuracy: not stored (no per-input routing weights in predictions/)"


def canonical_routing(name: str) -> str:
    routing = ROUTING_ALIASES.get(name, name)
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {name!r}; choose one of {', '.join(ROUTINGS)} (or ā for mean)")
    return routing


# ---- labels of re-evaluations ----------------------------------------------------------------------
def read_evaluation_record(outputs_dir: str | Path) -> dict | None:
    """sapt.evaluate's record of a re-evaluation ({"routing", "run_name", ...}); None for a run's own outputs."""
    path = Path(outputs_dir) / EVALUATION_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScoreError(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(record, dict) or record.get("routing") not in ROUTINGS:
        raise ScoreError(f"{path}: expected an object whose 'routing' is one of {', '.join(ROUTINGS)}")
    return record


def evaluation_name(outputs_dir: str | Path) -> str | None:
    """A re-evaluation's name in tables: its run and its routing, e.g. "run [oracle routing: own block only,
    reads the task id]" (None for a run's own outputs)."""
    record = read_evaluation_record(outputs_dir)
    return None if record is None else f"{record.get('run_name', '?')} [{SHORT_LABELS[record['routing']]}]"


def routing_description(outputs_dir: str | Path) -> str | None:
    """What a re-evaluation's routing was, in full (None for a run's own outputs)."""
    record = read_evaluation_record(outputs_dir)
    return None if record is None else f"{ROUTINGS[record['routing']]}; re-evaluation of {record.get('run_name', '?')}"


# ---- routing accuracy ------------------------------------------------------------------------------
def read_routing_rows(path: Path, num_blocks: int) -> list[list[float]] | None:
    """Each record's routing weights from one predictions file; None when none are stored."""
    if not path.is_file():
        return None
    rows, missing = [], 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScoreError(f"{path}: cannot read ({type(exc).__name__})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ScoreError(f"{path}: line {number}: malformed JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ScoreError(f"{path}: line {number}: expected a JSON object")
        if ROUTING_KEY not in record:
            missing += 1
            continue
        weights = record[ROUTING_KEY]
        if not (isinstance(weights, list) and len(weights) == num_blocks and all(map(_is_finite_number, weights))):
            expected = f"{num_blocks} finite numbers, one per block"
            raise ScoreError(f"{path}: line {number}: {ROUTING_KEY!r} must be {expected}")
        rows.append([float(w) for w in weights])
    if missing and rows:
        raise ScoreError(f"{path}: {missing} of {missing + len(rows)} records lack {ROUTING_KEY!r}")
    return rows or None


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def share_on_block(rows: list[list[float]], block: int) -> float:
    """x100 share of rows whose weight on `block` is strictly the largest."""
    weights = np.asarray(rows, dtype=float)
    others = np.delete(weights, block, axis=1)
    best_other = others.max(axis=1) if others.shape[1] else np.full(len(weights), -np.inf)
    return int(np.sum(weights[:, block] > best_other)) * 100 / len(rows)


def routing_accuracy(outputs_dir: str | Path, tasks: list[str]) -> np.ndarray | None:
    """(T, T) routing accuracy for the scored tasks of a run (NaN above the diagonal and where a
    predictions file holds no routing); None when no row stores any."""
    outputs = Path(outputs_dir)
    size = len(tasks)
    accuracy = np.full((size, size), np.nan)
    for i, row_task in enumerate(tasks):
        folder = outputs / task_dir_name(i + 1, row_task) / PREDICTIONS_DIR
        for j in range(i + 1):
            rows = read_routing_rows(folder / f"{tasks[j]}.jsonl", num_blocks=i + 1)
            if rows is not None:
                accuracy[i, j] = share_on_block(rows, j)
    return None if np.all(np.isnan(accuracy)) else accuracy
