"""Score a continual-learning run: AP, F.Ra, FWT, BWT from ``logs_and_outputs/<run>/outputs``.

The scorer's command line, as ``python -m sapt score`` (what generated pipelines call, so they need no
checkout) or ``python score.py`` (the same ``main`` behind a thin file at the repository's top):

    python score.py RUN [SINGLE_RUN] [--root logs_and_outputs] [--metric auto|rougeL|exact_match]
                    [--results_dir results] [--compare RUN ...]
    python score.py --aggregate 'RUN_seed*' [--single SINGLE_RUN]
    python score.py --compare 'sapt_seed*' 'seq_lora_seed*' [--single SINGLE_RUN]

A thin front over ``sapt.experiments.cl_metrics``: prints the score matrix and the metrics, and writes
``<results_dir>/<run>.txt``, ``<run>.json``, ``<run>_matrix.png`` (and ``<run>_routing.png`` when the
last task folder holds ``routing_weights.json``), with the routing accuracy (``sapt.experiments.routing_analysis``; a
figure ``<run>_routing_accuracy.png`` when the predictions store per-input routing, else "not stored"), and, when the
task folders hold routing traces, the own-block weight at the end of each task and ``<run>_routing_trace.png``.
Outputs of ``python -m sapt evaluate`` are named by their run and routing in every table.
``--compare`` prints one summary row per run instead;
given groups (a quoted glob pattern or a comma-separated list per argument) it prints each group's mean
± std and Welch's t test of each group's AP against the first group's. ``--aggregate`` (``sapt.experiments.aggregate``)
prints mean, std and 95% confidence interval of every metric over the seeds of one experiment and
writes ``<results_dir>/<name>_aggregate.{txt,json}``. Every table carries its conditions line
(protocol, metric, model, read from the task folders).
Any error is one line ``score.py: error: ...`` on stderr with exit code 2, and no output file is touched.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

import numpy as np

from ..benchmark_spec import column_label
from ..run_files import ROUTING_FILE, task_dir_name
from ..utils.cli import OneLineArgumentParser, UsageError, report_error
from ..utils.fileio import remove_temporaries, write_files_atomic
from ..utils.logs import setup_cli_logging
from .aggregate import (
    COMPARABLE_KEYS,
    SingleReference,
    aggregate_record,
    check_agreement,
    check_distinct,
    compare_record,
    conditions_line,
    expand_runs,
    format_aggregate,
    format_compare,
    group_name,
    is_group_spec,
    read_conditions,
    read_group,
)
from .cl_metrics import (
    KEY_PREFIX,
    METRICS,
    RELEASE_FWT_CONSTANT,
    ScoreError,
    align_single_scores,
    read_run,
    read_single_run,
    read_task_order,
    summarize,
    task_metrics,
)
from .routing_analysis import NOT_STORED, evaluation_name, read_evaluation_record, routing_accuracy, routing_description
from .trace_report import final_own_weights, format_trace_table, png_bytes, read_run_traces, render_trace

# The documented name; `python -m sapt score` reports errors under it too.
PROG = "score.py"
logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description="Score a continual-learning run (AP, F.Ra, FWT, BWT).")
    p.add_argument("run", nargs="?", metavar="RUN", help="run name under --root, or a run/outputs directory")
    p.add_argument("single_run", nargs="?", metavar="SINGLE_RUN", help="single-task run (each task alone) for FWT")
    p.add_argument("--root", default="logs_and_outputs", help="where run names are looked up")
    p.add_argument("--metric", default="auto", choices=METRICS,
                   help="auto: each task's benchmark's metric (ROUGE-L for SuperNI, EM for Long_Sequence; docs/benchmarks.md)")
    p.add_argument("--results_dir", default="results", help="where the report files are written")
    p.add_argument("--compare", nargs="+", metavar="RUN",
                   help="one summary row per run (RUN first); with groups ('sapt_seed*' or a,b,c: one group each), "
                        "mean ± std per group and Welch's t test of each group's AP against the first's")
    p.add_argument("--aggregate", nargs="+", metavar="RUN",
                   help="runs (names, quoted glob patterns) of one experiment over seeds: mean, std, 95%% CI of each metric")
    p.add_argument("--single", default=None, metavar="SINGLE_RUN",
                   help="single-task run for FWT with --aggregate or compared groups (the positional SINGLE_RUN also works)")
    return p


# ----------------------------------------------------------------------------------------------------
# Locating runs


def _safe_name(name: str) -> str:
    """A run name usable as a file name (run names may contain path separators)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def resolve_run(run: str, root: str | Path) -> tuple[str, Path]:
    """(display name, outputs dir) for a run name under root or an existing run/outputs directory."""
    named = Path(root) / run / "outputs"
    if not Path(run).is_absolute() and named.is_dir():  # an absolute RUN would discard root anyway
        return _safe_name(run), named
    path = Path(run)
    if path.is_dir():
        outputs = path / "outputs" if (path / "outputs").is_dir() else path
        evaluation = read_evaluation_record(outputs)
        if evaluation is not None:  # RUN/routing/<r>/outputs: named after its run, not "<r>"
            return _safe_name(f"{evaluation.get('run_name', 'run')}_routing-{evaluation['routing']}"), outputs
        resolved = outputs.resolve()
        name = resolved.parent.name if resolved.name == "outputs" else resolved.name
        return _safe_name(name), outputs
    raise ScoreError(f"run {run!r} not found (no directory {named} and no directory {path})")


# ----------------------------------------------------------------------------------------------------
# Text


def _fmt(value: float | None, missing: str = "n/a") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def abbreviate(tasks: list[str], width: int = 12) -> list[str]:
    """Short, unique column labels: a benchmark's column label ('task363' for SuperNI names), the name cut to
    `width` otherwise."""
    short = []
    for task in tasks:
        label = column_label(task)
        if label is None:
            label = task if len(task) <= width else task[: width - 1] + "~"
        short.append(label)
    if len(set(short)) != len(short):  # collisions after cutting: prefix the position to disambiguate
        short = [f"{i}:{s}" for i, s in enumerate(short, start=1)]
    return short


def format_matrix(tasks: list[str], matrix: np.ndarray) -> list[str]:
    labels = abbreviate(tasks)
    rows = [f"after task {i}" for i in range(1, len(tasks) + 1)]
    head_w = max(len(r) for r in rows)
    col_w = max(7, *(len(label) for label in labels))
    lines = [" " * head_w + "".join(f"  {label:>{col_w}}" for label in labels)]
    for i, row in enumerate(rows):
        cells = "".join(f"  {_fmt(matrix[i, j], '-'):>{col_w}}" for j in range(len(tasks)))
        lines.append(f"{row:<{head_w}}{cells}")
    renamed = [f"{s} = {t}" for s, t in zip(labels, tasks) if s != t]
    if renamed:
        lines.append("columns: " + ", ".join(renamed))
    return lines


def format_report(
    run: str,
    outputs: Path,
    tasks: list[str],
    matrix: np.ndarray,
    metric_name: str,
    summary: dict,
    single_name: str | None,
    warnings: list[str],
    conditions: dict | None = None,
) -> str:
    t = summary["T"]
    undefined = "n/a (undefined for T=1)"
    lines = [f"run: {run}", f"outputs: {outputs}", f"metric: {metric_name}", f"tasks scored: {t}"]
    if conditions is not None:
        lines.insert(2, conditions_line(conditions))
    lines += [f"warning: {w}" for w in warnings]
    lines += ["", "score matrix (row: after training task i; column: task evaluated)"]
    lines += format_matrix(tasks, matrix)
    lines += ["", f"AP   = {_fmt(summary['AP'])}", f"F.Ra = {_fmt(summary['F.Ra'], undefined)}"]
    if single_name is not None:
        lines.append(f"FWT  = {_fmt(summary['FWT'])}  (single-task run: {single_name})")
    lines.append(f"BWT  = {_fmt(summary['BWT'], undefined)}")
    lines += [
        "",
        "release-compatible only (reproduce the official release's numbers; not the definitions above):",
        f"bwt_release = {_fmt(summary['bwt_release'])}  (sum_(j<T) (a_T,j - a_j,j) / T)",
        f"(fwt_release, the release's FWT against a constant {RELEASE_FWT_CONSTANT} instead of single-task scores, "
        "is in the JSON record only)",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Routing: accuracy of a run's router, and the routing a re-evaluation used (sapt.evaluate)


def add_routing_sections(text: str, tasks: list[str], accuracy: np.ndarray | None, description: str | None) -> str:
    """The report with the replaced routing named under its first line, and routing accuracy at the end."""
    first, rest = text.split("\n", 1)
    head = f"{first}\nrouting: {description}\n" if description else f"{first}\n"
    if accuracy is None:
        return f"{head}{rest}\n{NOT_STORED}\n"
    lines = ["", "routing accuracy (% of task j's test inputs whose largest routing weight is on block j)"]
    return head + rest + "\n".join(lines + format_matrix(tasks, accuracy)) + "\n"


def routing_record(accuracy: np.ndarray | None, description: str | None) -> dict:
    stored = {"stored": False} if accuracy is None else {
        "stored": True, "matrix": [[_json_number(float(v)) for v in row] for row in accuracy],
    }
    return {"routing": description, "routing_accuracy": stored}


def labelled_name(name: str, outputs: Path) -> str:
    """A re-evaluation's row is named by its run and its routing (the oracle's says it reads the task id)."""
    return evaluation_name(outputs) or name


# ----------------------------------------------------------------------------------------------------
# Figures


def render_heatmap(data: np.ndarray, rows: list[str], cols: list[str], title: str, vmax: float, label: str) -> bytes:
    """PNG bytes of an annotated heatmap; rendered in memory so a failure leaves no file behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = data.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * n_cols + 2.5), max(3.0, 0.5 * n_rows + 1.8)))
    try:
        masked = np.ma.masked_invalid(data)
        image = ax.imshow(masked, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        fig.colorbar(image, ax=ax, label=label)
        ax.set_xticks(range(n_cols), labels=cols, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n_rows), labels=rows, fontsize=8)
        ax.set_title(title, fontsize=10)
        if n_rows * n_cols <= 400:  # numbers stay legible only on small grids
            for (i, j), value in np.ndenumerate(data):
                if np.isfinite(value):
                    text = f"{value:.2f}"
                    colour = "black" if value > 0.6 * vmax else "white"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
        return png_bytes(fig)
    finally:
        plt.close(fig)


def read_routing(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(block task names, eval task names, eval x block mean routing weights) from SAPT's JSON."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ScoreError(f"{path}: cannot read ({type(exc).__name__})") from None
    except json.JSONDecodeError as exc:
        raise ScoreError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not isinstance(data.get("mean_weights"), dict):
        raise ScoreError(f"{path}: expected an object with a 'tasks' list and a 'mean_weights' object")
    blocks = [str(b) for b in data["tasks"]]
    if not blocks or not data["mean_weights"]:
        raise ScoreError(f"{path}: no blocks or no evaluated tasks")
    evals, rows = [], []
    for task, weights in data["mean_weights"].items():
        ok = isinstance(weights, list) and len(weights) == len(blocks)
        ok = ok and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)
        if not ok:
            raise ScoreError(f"{path}: mean_weights[{task!r}] must be {len(blocks)} finite numbers, one per block")
        evals.append(task)
        rows.append([float(w) for w in weights])
    return blocks, evals, np.asarray(rows, dtype=float)


# ----------------------------------------------------------------------------------------------------
# Files


def write_results(files: dict[Path, bytes]) -> None:
    """The scoring's files, all or nothing, after removing what an interrupted scoring left of them."""
    for path in files:
        remove_temporaries(path.parent, path.name)
    write_files_atomic(files)


def _json_number(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


# ----------------------------------------------------------------------------------------------------
# Commands


def score_run(args) -> None:
    run_name, outputs = resolve_run(args.run, args.root)
    warnings: list[str] = []
    tasks, matrix, metric_name = read_run(outputs, args.metric, warnings_out=warnings)
    single_name, single_scores = None, None
    if args.single_run is not None:
        single_name, single_outputs = resolve_run(args.single_run, args.root)
        single_map = read_single_run(single_outputs, args.metric, warnings_out=warnings)
        single_scores = align_single_scores(tasks, single_map, single_outputs)
    summary = summarize(matrix, single_scores)
    conditions = read_conditions(outputs, tasks, metric_name)

    text = format_report(run_name, outputs, tasks, matrix, metric_name, summary, single_name, warnings, conditions)
    accuracy, description = routing_accuracy(outputs, tasks), routing_description(outputs)
    text = add_routing_sections(text, tasks, accuracy, description)
    traces = read_run_traces(outputs, tasks)
    trace_table = None if traces is None else final_own_weights(traces, tasks)
    if trace_table is not None:
        text += "\n".join(format_trace_table(tasks, trace_table, abbreviate(tasks))) + "\n"
    order = read_task_order(outputs)
    record = {
        "run": run_name,
        "outputs_dir": str(outputs),
        "metric": metric_name,
        "conditions": conditions,
        "metric_keys": {t: KEY_PREFIX[m] + t for t, m in task_metrics(outputs, tasks, args.metric).items()},
        "task_names": tasks,
        "task_order": order,
        "complete": len(tasks) == len(order),
        "matrix": [[_json_number(float(v)) for v in row] for row in matrix],
        "single_run": single_name,
        "single_task_scores": single_scores,
        "metrics": {k: summary[k] for k in ("T", "AP", "F.Ra", "FWT", "BWT")},
        "release_compatible_only": {
            "note": "reproduce the official release's numbers; not the AP/F.Ra/FWT/BWT definitions",
            "bwt_release": summary["bwt_release"],
            "fwt_release": summary["fwt_release"],
            "fwt_release_constant": RELEASE_FWT_CONSTANT,
        },
        "warnings": warnings,
        **routing_record(accuracy, description),
        "trace_own_weight": None if trace_table is None else [[_json_number(float(v)) for v in row] for row in trace_table],
    }
    write_report(Path(args.results_dir), run_name, outputs, tasks, matrix, metric_name, accuracy, text, record, traces)


def write_report(results: Path, run_name, outputs, tasks, matrix, metric_name, accuracy, text, record, traces=None) -> None:
    """`<run>.txt`, `<run>.json` and the figures, all or nothing; a figure this scoring has no data for is
    removed (a stale one from an earlier scoring of the run would mislead)."""
    labels, rows = abbreviate(tasks), [f"after task {i}" for i in range(1, len(tasks) + 1)]
    files = {
        results / f"{run_name}.txt": text.encode("utf-8"),
        results / f"{run_name}.json": (json.dumps(record, indent=2) + "\n").encode("utf-8"),
        results / f"{run_name}_matrix.png": render_heatmap(
            matrix, rows, labels, f"{run_name}: score matrix ({metric_name})", 100.0, metric_name,
        ),
    }
    routing_png = results / f"{run_name}_routing.png"
    routing_path = outputs / task_dir_name(len(tasks), tasks[-1]) / ROUTING_FILE
    if routing_path.is_file():
        blocks, evals, weights = read_routing(routing_path)
        vmax = max(1.0, float(np.max(weights)))
        files[routing_png] = render_heatmap(
            weights, abbreviate(evals), abbreviate(blocks),
            f"{run_name}: mean routing weight (rows: eval task, columns: block)", vmax, "mean weight",
        )
    accuracy_png = results / f"{run_name}_routing_accuracy.png"
    if accuracy is not None:
        files[accuracy_png] = render_heatmap(
            accuracy, rows, labels,
            f"{run_name}: routing accuracy (% of task j's inputs routed to block j)", 100.0, "routing accuracy (%)",
        )
    trace_png = results / f"{run_name}_routing_trace.png"
    if traces is not None:
        files[trace_png] = render_trace(traces, tasks, f"{run_name}: own-block weight while training (dev probes)")
    write_results(files)
    for figure in (routing_png, accuracy_png, trace_png):
        if figure not in files and figure.exists():
            figure.unlink()
    sys.stdout.write(text)
    print_written(files)


def print_written(files) -> None:
    """The last line of a scoring: where its tables and figures are."""
    print(f"\nwrote {', '.join(str(path) for path in files)}")


def compare_runs(args) -> None:
    runs = ([args.run] if args.run is not None else []) + list(args.compare)
    single_map, single_outputs = None, None
    if args.single_run is not None:
        _, single_outputs = resolve_run(args.single_run, args.root)
        single_map = read_single_run(single_outputs, args.metric)

    rows, conditions = [], []
    for run in runs:
        name, outputs = resolve_run(run, args.root)
        name = labelled_name(name, outputs)
        tasks, matrix, metric_name = read_run(outputs, args.metric)
        conditions.append((name, read_conditions(outputs, tasks, metric_name)))
        single = None
        if single_map is not None:
            try:
                single = align_single_scores(tasks, single_map, single_outputs)
            except ScoreError as exc:  # one run outside the single-task run's tasks should not sink the table
                logger.warning("%s: no FWT: %s", name, exc)
        s = summarize(matrix, single)
        total = len(read_task_order(outputs))
        t = str(s["T"]) if s["T"] == total else f"{s['T']}/{total}"
        rows.append([name, metric_name, _fmt(s["AP"]), _fmt(s["F.Ra"]), _fmt(s["FWT"]), _fmt(s["BWT"]), t])

    header = ["run", "metric", "AP", "F.Ra", "FWT", "BWT", "T"]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [v.rjust(w) for v, w in zip(r[2:], widths[2:])]
        print("  ".join(cells).rstrip())
    print_conditions(conditions)


def print_conditions(conditions: list[tuple[str, dict]]) -> None:
    """Under a table of runs: one conditions line when all runs share them, else one line per run."""
    lines = [conditions_line(c) for _, c in conditions]
    if len(set(lines)) == 1:
        print(lines[0])
    else:
        for (name, _), line in zip(conditions, lines):
            print(f"{name}: {line}")


def single_reference(args) -> SingleReference | None:
    """The single-task run FWT is measured against, for --aggregate and compared groups."""
    if args.single_run is None:
        return None
    name, outputs = resolve_run(args.single_run, args.root)
    return SingleReference(name, outputs, read_single_run(outputs, args.metric))


def read_named_group(names: list[str], args, single: SingleReference | None):
    return read_group([resolve_run(name, args.root) for name in names], args.metric, single)


def aggregate_runs(args) -> None:
    """--aggregate: mean, std and confidence interval of each metric over the runs; text and JSON."""
    specs = ([args.run] if args.run is not None else []) + list(args.aggregate)
    names = [run for spec in specs for run in expand_runs(spec, args.root)]
    check_distinct(names)
    single = single_reference(args)
    record = aggregate_record(read_named_group(names, args, single), single)
    text = format_aggregate(record)
    results, stem = Path(args.results_dir), f"{_safe_name(group_name(names))}_aggregate"
    files = {
        results / f"{stem}.txt": text.encode("utf-8"),
        results / f"{stem}.json": (json.dumps(record, indent=2) + "\n").encode("utf-8"),
    }
    write_results(files)
    sys.stdout.write(text)
    print_written(files)


def compare_groups(args, specs: list[str]) -> None:
    """--compare with groups: each group's statistics and Welch's test of its AP against the first group's."""
    if len(specs) < 2:
        raise UsageError("--compare with a group needs at least two groups (one argument each: 'sapt_seed*' or a,b,c)")
    members = [expand_runs(spec, args.root) for spec in specs]
    check_distinct([name for names in members for name in names])
    single = single_reference(args)
    groups = [read_named_group(names, args, single) for names in members]
    check_agreement([group[0] for group in groups], COMPARABLE_KEYS, "compared groups")
    sys.stdout.write(format_compare(compare_record(specs, groups, single)))


def main(argv: list[str] | None = None) -> int:
    setup_cli_logging(logging.WARNING)
    try:
        args = build_parser().parse_args(argv)
        if args.single is not None:
            if args.single_run is not None:
                raise UsageError("name the single-task run once: SINGLE_RUN or --single")
            args.single_run = args.single
        if args.aggregate and args.compare:
            raise UsageError("--aggregate and --compare do not go together")
        specs = ([args.run] if args.run is not None else []) + list(args.compare or [])
        if args.aggregate:
            aggregate_runs(args)
        elif args.compare and any(is_group_spec(spec) for spec in specs):
            compare_groups(args, specs)
        elif args.compare:
            compare_runs(args)
        elif args.run is None:
            raise UsageError("the following arguments are required: RUN (or --compare RUN ..., or --aggregate RUN ...)")
        else:
            score_run(args)
    except OSError as exc:
        return report_error(PROG, ValueError(f"{exc.strerror or type(exc).__name__}: {exc.filename or exc}"))
    except (UsageError, ScoreError) as exc:
        return report_error(PROG, exc)
    return 0
