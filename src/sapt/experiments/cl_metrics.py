"""Continual-learning scores (AP, F.Ra, FWT, BWT) over a task-by-task score matrix.

The matrix convention is 0-based here and 1-based in the definitions: ``matrix[i][j]`` is the score on
task ``j`` after training task ``i``; only entries with ``j <= i`` are used (tasks not yet seen are
NaN or absent). The metric functions are pure; ``read_run`` turns a run's ``outputs/`` folder
(``task_order.txt`` plus one ``<i>-<task>/all_results.json`` per trained task) into such a matrix, each
task scored by its benchmark's metric (``task_metrics``, from the benchmark specs of sapt.benchmark_spec).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..benchmark_spec import METRICS as BENCHMARK_METRICS
from ..benchmark_spec import Benchmark, BenchmarkError, benchmark_by_task_name, locate_task, shipped_benchmarks
from ..run_files import RESULT_KEY_PREFIX, RESULTS_FILE, TASK_ARGS_FILE, TASK_DIR_PATTERN, TASK_ORDER_FILE

logger = logging.getLogger(__name__)

# The release subtracts this constant in its FWT instead of single-task scores ("debugging value").
RELEASE_FWT_CONSTANT = 50.94

METRICS = ("auto", *BENCHMARK_METRICS)  # auto: each task's benchmark's metric
KEY_PREFIX = RESULT_KEY_PREFIX


class ScoreError(ValueError):
    """A run's result files are missing or malformed; the message is one line naming the file."""


# ----------------------------------------------------------------------------------------------------
# Metrics


def _as_matrix(matrix) -> np.ndarray:
    """Square float array with NaN above the diagonal; rejects missing scores on or below it."""
    if isinstance(matrix, np.ndarray):
        arr = np.array(matrix, dtype=float)
    else:
        rows = [list(r) for r in matrix]
        size = len(rows)
        arr = np.full((size, size), np.nan)
        for i, row in enumerate(rows):
            if len(row) > size:
                raise ValueError(f"score matrix row {i + 1} has {len(row)} entries for {size} tasks")
            arr[i, : len(row)] = [np.nan if v is None else float(v) for v in row]
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"score matrix must be square and non-empty, got shape {arr.shape}")
    size = arr.shape[0]
    # Scores of tasks not yet trained are irrelevant to every metric; blank them so they cannot leak in.
    arr[np.triu_indices(size, k=1)] = np.nan
    for i in range(size):
        seen = arr[i, : i + 1]
        # Joint training (mtl) scores all tasks once, after the last: earlier rows may be absent as a whole.
        absent = i < size - 1 and np.all(np.isnan(seen))
        if not absent and not np.all(np.isfinite(seen)):
            raise ValueError("score matrix needs a finite score for every task j <= i after task i")
    return arr


def _has_all_rows(a: np.ndarray) -> bool:
    """False for a joint-training run, which has only the final row (then only AP is defined)."""
    return bool(np.all(np.isfinite(np.diag(a))))


def average_performance(matrix) -> float:
    """AP = (1/T) sum_j a_{T,j}: mean score over all tasks after the last one."""
    a = _as_matrix(matrix)
    return float(np.mean(a[-1, :]))


def forgetting_rate(matrix) -> float | None:
    """F.Ra = 1/(T-1) sum_{j<T} [max_{k in j..T-1} a_{k,j} - a_{T,j}]; None when T = 1."""
    a = _as_matrix(matrix)
    size = a.shape[0]
    if size < 2 or not _has_all_rows(a):
        return None
    # 0-based: for task j, the best score it had from its own step up to (not including) the last one.
    drops = [np.max(a[j : size - 1, j]) - a[size - 1, j] for j in range(size - 1)]
    return float(np.sum(drops) / (size - 1))


def forward_transfer(matrix, single_task_scores: Sequence[float]) -> float | None:
    """FWT = (1/T) sum_j (a_{j,j} - single_j): gain of learning in sequence over training alone."""
    a = _as_matrix(matrix)
    if not _has_all_rows(a):
        return None
    single = np.asarray([float(s) for s in single_task_scores], dtype=float)
    if single.shape != (a.shape[0],):
        raise ValueError(f"need {a.shape[0]} single-task scores, got {single.shape[0]}")
    if not np.all(np.isfinite(single)):
        raise ValueError("single-task scores must be finite")
    return float(np.mean(np.diag(a) - single))


def backward_transfer(matrix) -> float | None:
    """BWT = 1/(T-1) sum_{j<T} (a_{T,j} - a_{j,j}); None when T = 1."""
    a = _as_matrix(matrix)
    size = a.shape[0]
    if size < 2 or not _has_all_rows(a):
        return None
    diffs = a[size - 1, : size - 1] - np.diag(a)[: size - 1]
    return float(np.sum(diffs) / (size - 1))


def backward_transfer_release(matrix) -> float:
    """Release-compatible only: sum_{j<T}(a_{T,j} - a_{j,j}) / T (divides by T, not T-1)."""
    a = _as_matrix(matrix)
    size = a.shape[0]
    diffs = a[size - 1, : size - 1] - np.diag(a)[: size - 1]
    return float(np.sum(diffs) / size)


def forward_transfer_release(matrix, constant: float = RELEASE_FWT_CONSTANT) -> float:
    """Release-compatible only: (1/T) sum_j (a_{j,j} - constant), the release's stand-in for FWT."""
    a = _as_matrix(matrix)
    return float(np.mean(np.diag(a) - constant))


def summarize(matrix, single: Sequence[float] | None = None) -> dict:
    """All scores of one run; FWT needs single-task scores aligned with the matrix's tasks."""
    a = _as_matrix(matrix)
    return {
        "T": int(a.shape[0]),
        "AP": average_performance(a),
        "F.Ra": forgetting_rate(a),
        "FWT": None if single is None else forward_transfer(a, single),
        "BWT": backward_transfer(a),
        # Kept under their own names: these reproduce the release's numbers, not the paper's definitions.
        "bwt_release": backward_transfer_release(a) if _has_all_rows(a) else None,
        "fwt_release": forward_transfer_release(a) if _has_all_rows(a) else None,
    }


# ----------------------------------------------------------------------------------------------------
# Reading result folders


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def task_metrics(run_outputs_dir: str | Path, tasks: Sequence[str], metric: str = "auto") -> dict[str, str]:
    """The metric scoring each task of a run: `metric`, or for "auto" the metric of the task's benchmark.

    A task's benchmark is the one whose folder holds it in a data folder the run's task steps recorded
    (``data_dir`` of their task_args.json: absolute, or relative to where the pipeline ran, which is
    where it runs score.py); for a run that records none (the release's layout) or whose data is not
    there, the first shipped benchmark whose task names it fits.
    """
    check_metric(metric)
    if metric != "auto":
        return {task: metric for task in tasks}
    outputs = Path(run_outputs_dir)
    folders = [entry for entry in sorted(outputs.iterdir()) if TASK_DIR_PATTERN.match(entry.name) and entry.is_dir()]
    data_dirs = _recorded_data_dirs(folders)
    return {task: _benchmark_of(task, data_dirs, outputs).metric for task in tasks}


def _recorded_data_dirs(folders: Sequence[Path]) -> list[Path]:
    data_dirs: list[Path] = []
    for folder in folders:
        path = folder / TASK_ARGS_FILE
        data_dir = _load_results(path).get("data_dir") if path.is_file() else None
        if isinstance(data_dir, str) and data_dir and Path(data_dir) not in data_dirs:
            data_dirs.append(Path(data_dir))
    return data_dirs


def _benchmark_of(task: str, data_dirs: Sequence[Path], outputs: Path) -> Benchmark:
    try:
        for data_dir in data_dirs:
            found = locate_task(data_dir, task)
            if found is not None:
                return found[0]
    except BenchmarkError as err:
        raise ScoreError(str(err)) from None
    spec = benchmark_by_task_name(task)
    if spec is None:
        looks = ", ".join(f"{s.name} like {s.task_name_example!r}" for s in shipped_benchmarks().values())
        raise ScoreError(
            f"{outputs}: cannot tell the benchmark of task {task!r}: no {TASK_ARGS_FILE} there names a data folder "
            f"holding it and the name fits no shipped benchmark's ({looks}); run score.py where the run's data_dir "
            "is, or pass --metric"
        )
    return spec


def _metric_name(metrics: dict[str, str]) -> str:
    used = set(metrics.values())
    return used.pop() if len(used) == 1 else "mixed"


def _warn(message: str, warnings_out: list | None) -> None:
    # A caller that collects warnings shows them itself; otherwise they go to the log.
    if warnings_out is None:
        logger.warning(message)
    else:
        warnings_out.append(message)


def read_task_order(outputs_dir: str | Path) -> list[str]:
    """Task names from ``task_order.txt`` (one line, comma-separated)."""
    path = Path(outputs_dir) / TASK_ORDER_FILE
    if not path.is_file():
        raise ScoreError(f"{path}: missing task order file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScoreError(f"{path}: cannot read task order ({type(exc).__name__})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ScoreError(f"{path}: task order is empty")
    if len(lines) > 1:
        raise ScoreError(f"{path}: expected one comma-separated line, found {len(lines)} lines")
    line = lines[0]
    if line.endswith(","):  # tolerate a trailing comma, a common hand-editing artifact
        line = line[:-1]
    names = [name.strip() for name in line.split(",")]
    for pos, name in enumerate(names, start=1):
        if not name:
            raise ScoreError(f"{path}: empty task name at position {pos}")
        if re.search(r"[\s/\\]", name):
            raise ScoreError(f"{path}: task name {name!r} contains whitespace or a path separator")
    seen = set()
    for name in names:
        if name in seen:
            raise ScoreError(f"{path}: task {name!r} listed twice")
        seen.add(name)
    return names


def _load_results(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScoreError(f"{path}: cannot read ({type(exc).__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScoreError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ScoreError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _score(data: dict, path: Path, task: str, metric: str, context: str) -> float:
    """The score of `task` by `metric` (already resolved, never "auto") in a results file."""
    key = KEY_PREFIX[metric] + task
    if key not in data:
        raise ScoreError(f"{path}: missing key {key!r} ({context})")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ScoreError(f"{path}: key {key!r} is not a finite number: {value!r}")
    if not 0.0 <= value <= 100.0:
        logger.warning("%s: key %r = %s is outside 0..100", path, key, value)
    return float(value)


def _task_folders(outputs_dir: Path, order: list[str]) -> dict[int, Path]:
    """Task folders by 1-based index; a folder that contradicts the order is an error, not a skip."""
    folders: dict[int, Path] = {}
    for entry in sorted(outputs_dir.iterdir()):
        match = TASK_DIR_PATTERN.match(entry.name)
        if not match or not entry.is_dir():
            continue
        index, task = int(match.group(1)), match.group(2)
        if not 1 <= index <= len(order) or order[index - 1] != task:
            raise ScoreError(
                f"{entry}: task folder does not match {TASK_ORDER_FILE} "
                f"(position {index} there is {order[index - 1] if 1 <= index <= len(order) else 'absent'})"
            )
        folders[index] = entry
    return folders


def _resolve_outputs(run_outputs_dir: str | Path) -> Path:
    outputs = Path(run_outputs_dir)
    if not outputs.is_dir():
        raise ScoreError(f"{outputs}: run outputs directory not found")
    return outputs


def read_run(
    run_outputs_dir: str | Path, metric: str = "auto", *, warnings_out: list | None = None
) -> tuple[list[str], np.ndarray, str]:
    """Read a sequential run into (task names, T x T score matrix, metric name).

    Only the complete prefix of tasks 1..k (folder present with its results file) is scored; a shorter
    or gapped run gives a warning (logged, or appended to ``warnings_out`` if given).
    ``metric_name`` is "rougeL", "exact_match" or "mixed" (auto picked different ones per task).
    """
    check_metric(metric)  # validate the flag before touching the disk
    outputs = _resolve_outputs(run_outputs_dir)
    order = read_task_order(outputs)
    folders = _task_folders(outputs, order)

    done = 0
    while done + 1 in folders and (folders[done + 1] / RESULTS_FILE).is_file():
        done += 1
    final = len(order)
    if done == 0 and final in folders and (folders[final] / RESULTS_FILE).is_file():
        # Joint training (mtl) writes only the last folder, scored on every task: one row.
        path = folders[final] / RESULTS_FILE
        data = _load_results(path)
        metrics = task_metrics(outputs, order, metric)
        matrix = np.full((final, final), np.nan)
        for j, task in enumerate(order):
            matrix[final - 1, j] = _score(data, path, task, metrics[task], f"task {j + 1} after joint training")
        _warn(f"{outputs}: joint-training run (only the final folder): AP only", warnings_out)
        return list(order), matrix, _metric_name(metrics)
    if done == 0:
        raise ScoreError(f"{outputs}: no results for the first task (1-{order[0]}/{RESULTS_FILE})")
    if done < len(order):
        skipped = sorted(i for i in folders if i > done)
        note = f"; ignoring later folders {', '.join(folders[i].name for i in skipped)}" if skipped else ""
        _warn(
            f"{outputs}: run incomplete: {done} of {len(order)} tasks have results; "
            f"scoring tasks 1..{done} only{note}",
            warnings_out,
        )

    tasks = order[:done]
    metrics = task_metrics(outputs, tasks, metric)
    matrix = np.full((done, done), np.nan)
    for i in range(done):
        path = folders[i + 1] / RESULTS_FILE
        data = _load_results(path)
        for j in range(i + 1):
            context = f"task {j + 1} evaluated after task {i + 1}"
            matrix[i, j] = _score(data, path, tasks[j], metrics[tasks[j]], context)
    logger.info("read %d tasks from %s", done, outputs)
    return tasks, matrix, _metric_name(metrics)


def read_single_run(
    run_outputs_dir: str | Path, metric: str = "auto", *, warnings_out: list | None = None
) -> dict[str, float]:
    """Single-task scores {task: score} from a run where folder ``<i>-<task>`` trained task i alone.

    Tasks are independent there, so every folder with results counts, gaps or not.
    """
    check_metric(metric)
    outputs = _resolve_outputs(run_outputs_dir)
    order = read_task_order(outputs)
    folders = _task_folders(outputs, order)
    metrics = task_metrics(outputs, [order[i - 1] for i in folders if (folders[i] / RESULTS_FILE).is_file()], metric)
    scores: dict[str, float] = {}
    for index, folder in sorted(folders.items()):
        path = folder / RESULTS_FILE
        if not path.is_file():
            continue
        task = order[index - 1]
        scores[task] = _score(_load_results(path), path, task, metrics[task], f"task {index} trained alone")
    missing = [t for t in order if t not in scores]
    if not scores:
        raise ScoreError(f"{outputs}: no single-task results found")
    if missing:
        _warn(f"{outputs}: single-task run lacks results for {', '.join(missing)}", warnings_out)
    return scores


def align_single_scores(task_names: Sequence[str], single: dict[str, float], source: str | Path = "") -> list[float]:
    """Single-task scores in the order of ``task_names``; every task needs one for FWT."""
    missing = [t for t in task_names if t not in single]
    if missing:
        where = f"{source}: " if source else ""
        raise ScoreError(f"{where}single-task run has no score for {', '.join(missing)}")
    return [single[t] for t in task_names]
