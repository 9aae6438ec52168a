"""Statistics over runs, and the conditions every reported number was measured under.

A *group* is several runs of one experiment that differ only in their seed (`gen_script_*.py --seeds`
writes them as `<run>_seed<N>`): the same tasks in the same order, metric, protocol and model.
`read_group` reads and checks such runs; `spread` gives each metric's mean, sample standard deviation
(ddof 1) and a 95% confidence interval from the t distribution with n-1 degrees of freedom; `welch`
says whether two groups' AP differ by more than their seeds' spread (Welch's unequal-variance t test,
two-sided). `read_conditions` is the one place that reads what a run was measured under (protocol,
metric, model) from its task folders; every table `score.py` prints, and every JSON it writes, carries it.

FWT needs single-task scores: one single-task run (as `score.py RUN SINGLE_RUN`) is the reference for
every run of a group, so FWT's interval covers the sequential runs' seeds, not the reference's.
"""

from __future__ import annotations

import fnmatch
import glob
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import CONFIG_NAME
from ..run_files import TASK_ARGS_FILE, task_dir_name
from ..utils.fileio import read_json
from .cl_metrics import ScoreError, align_single_scores, read_run, summarize

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05  # p below this: the difference exceeds the seeds' spread
SUMMARY_METRICS = ("AP", "F.Ra", "FWT", "BWT")
CONDITION_KEYS = ("protocol", "metric", "model")
# Group members must agree on all of these; two groups compared must agree on the first two.
GROUP_KEYS = ("tasks", "metric", "protocol", "model")
COMPARABLE_KEYS = ("tasks", "metric")
RUNS_FOLDER = "outputs"  # a run is a folder under --root that holds outputs/
_GLOB_CHARS = re.compile(r"[*?\[]")
_SEED_SUFFIX = re.compile(r"_seed\d+$")


# ----------------------------------------------------------------------------------------------------
# Conditions


def _read_object(path: Path) -> dict | None:
    """A JSON object from `path`, None when the file does not exist; anything else malformed is an error."""
    if not path.is_file():
        return None
    data = read_json(path, ScoreError, "JSON file")
    if not isinstance(data, dict):
        raise ScoreError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _agreed(values: dict[str, str]) -> str:
    """One value when every task folder agrees, else each value with the folders that hold it."""
    folders_of: dict[str, list[str]] = {}
    for folder, value in values.items():
        folders_of.setdefault(value, []).append(folder)
    if len(folders_of) == 1:
        return next(iter(folders_of))
    return "mixed (" + "; ".join(f"{v} in {', '.join(f)}" for v, f in folders_of.items()) + ")"


def _task_folders(outputs: Path, tasks: list[str]) -> list[Path]:
    """The scored tasks' folders that exist (a joint-training run has only the last)."""
    folders = [outputs / task_dir_name(i, task) for i, task in enumerate(tasks, start=1)]
    return [folder for folder in folders if folder.is_dir()]


def read_conditions(outputs: str | Path, tasks: list[str], metric: str) -> dict:
    """{"protocol", "metric", "model"} of a run, read from its scored task folders.

    Protocol and model come from each folder's task_args.json (the arguments the step ran with); the
    model, for folders written before that file existed, from sapt_config.json. Nothing is guessed: a
    folder without them reads "unknown (...)", and folders that disagree read "mixed (...)".
    """
    args_file = TASK_ARGS_FILE
    unknown_protocol, unknown_model = f"unknown (no {args_file})", f"unknown (no {args_file} or {CONFIG_NAME})"
    protocols, models = {}, {}
    for folder in _task_folders(Path(outputs), tasks):
        args = _read_object(folder / args_file)
        config = _read_object(folder / CONFIG_NAME)
        if args is not None:
            protocols[folder.name] = str(args.get("protocol", f"unknown (no protocol in {args_file})"))
        else:
            protocols[folder.name] = unknown_protocol
        if args is not None and "model_name_or_path" in args:
            models[folder.name] = str(args["model_name_or_path"])
        elif config is not None and "base_model_name_or_path" in config:
            models[folder.name] = str(config["base_model_name_or_path"])
        else:
            models[folder.name] = unknown_model
    return {
        "protocol": _agreed(protocols) if protocols else unknown_protocol,
        "metric": metric,
        "model": _agreed(models) if models else unknown_model,
    }


def conditions_line(conditions: dict) -> str:
    """The line that goes with every table: `protocol: ...; metric: ...; model: ...`."""
    return "; ".join(f"{key}: {conditions[key]}" for key in CONDITION_KEYS)


def read_seed(outputs: str | Path, tasks: list[str]) -> int | None:
    """The seed the run's first scored step ran with (task_args.json); None for older folders."""
    for folder in _task_folders(Path(outputs), tasks):
        args = _read_object(folder / TASK_ARGS_FILE)
        return None if args is None else args.get("seed")
    return None


# ----------------------------------------------------------------------------------------------------
# Finding the runs of a group


def _natural_key(name: str) -> list:
    """seed2 before seed10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _is_run(path: Path) -> bool:
    return (path / RUNS_FOLDER).is_dir() or (path.name == RUNS_FOLDER and path.is_dir())


def _runs_matching(pattern: str, root: Path) -> list[str]:
    """Run names under `root` matching a glob pattern, else run paths matching it, in natural order."""
    if root.is_dir() and "/" not in pattern:
        named = [p.name for p in root.iterdir() if fnmatch.fnmatchcase(p.name, pattern) and _is_run(p)]
        if named:
            return sorted(named, key=_natural_key)
    return sorted((p for p in glob.glob(pattern) if _is_run(Path(p))), key=_natural_key)


def expand_runs(spec: str, root: str | Path) -> list[str]:
    """Run names (or paths) named by `spec`: a name, a glob pattern (matched against the runs under
    `root`, then as a path), or several of those separated by commas."""
    runs: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise ScoreError(f"empty run name in {spec!r}")
        if not _GLOB_CHARS.search(item):
            runs.append(item)
            continue
        matched = _runs_matching(item, Path(root))
        if not matched:
            raise ScoreError(f"pattern {item!r} matches no run under {root} (a run is a folder holding {RUNS_FOLDER}/) nor any run path")
        runs.extend(matched)
    return runs


def is_group_spec(spec: str) -> bool:
    """A glob pattern or a comma-separated list names a group; a plain name names one run."""
    return "," in spec or bool(_GLOB_CHARS.search(spec))


def check_distinct(runs: list[str]) -> None:
    seen = set()
    for run in runs:
        if run in seen:
            raise ScoreError(f"run {run!r} is named twice")
        seen.add(run)


def group_name(runs: list[str]) -> str:
    """A name for a group's files: the runs' common name without `_seed<N>`, else their common prefix."""
    bases = {_SEED_SUFFIX.sub("", Path(run).name) for run in runs}
    if len(bases) == 1:
        return bases.pop()
    names = [Path(run).name for run in runs]
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    return prefix.rstrip("_-.") or "runs"


# ----------------------------------------------------------------------------------------------------
# Reading and checking a group


@dataclass
class RunScores:
    """One run as a group sees it: its scores and what they were measured under."""

    name: str
    outputs: Path
    tasks: list[str]
    summary: dict
    conditions: dict
    seed: int | None
    warnings: list[str] = field(default_factory=list)

    def value(self, key: str):
        return self.tasks if key == "tasks" else self.conditions[key]


@dataclass
class SingleReference:
    """The single-task run FWT is measured against."""

    name: str
    outputs: Path
    scores: dict[str, float]


def read_scores(name: str, outputs: Path, metric: str, single: SingleReference | None) -> RunScores:
    warnings: list[str] = []
    tasks, matrix, metric_name = read_run(outputs, metric, warnings_out=warnings)
    single_scores = None if single is None else align_single_scores(tasks, single.scores, single.outputs)
    return RunScores(
        name=name, outputs=outputs, tasks=tasks, summary=summarize(matrix, single_scores),
        conditions=read_conditions(outputs, tasks, metric_name), seed=read_seed(outputs, tasks), warnings=warnings,
    )


def check_agreement(runs: list[RunScores], keys: tuple[str, ...], what: str) -> None:
    """Every run agrees with the first on `keys`; else one line naming the run and what differs."""
    first = runs[0]
    for run in runs[1:]:
        for key in keys:
            if run.value(key) != first.value(key):
                show = (lambda v: " -> ".join(v)) if key == "tasks" else str
                raise ScoreError(
                    f"{run.name}: {key} is {show(run.value(key))!r}, {first.name}'s is {show(first.value(key))!r}; "
                    f"{what} must share {', '.join(keys)}"
                )


def read_group(runs: list[tuple[str, Path]], metric: str, single: SingleReference | None) -> list[RunScores]:
    group = [read_scores(name, outputs, metric, single) for name, outputs in runs]
    check_agreement(group, GROUP_KEYS, "the runs of a group")
    return group


# ----------------------------------------------------------------------------------------------------
# Statistics


def t_quantile(df: float, probability: float = 0.5 + CONFIDENCE / 2) -> float:
    # Imported here: only statistics over several runs need scipy (about a second to import).
    from scipy.stats import t

    return float(t.ppf(probability, df))


def t_two_sided_p(t_value: float, df: float) -> float:
    from scipy.stats import t

    return float(2.0 * t.sf(abs(t_value), df))


def spread(values: list[float | None]) -> dict:
    """n, mean, sample std (ddof 1) and the CONFIDENCE interval mean ± t(n-1) · std / sqrt(n).

    A metric undefined for some run (None) is undefined for the group; one run has no spread.
    """
    n = len(values)
    if n == 0 or any(v is None for v in values):
        return {"n": n, "mean": None, "std": None, "ci": None, "t_quantile": None}
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean())
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci": None, "t_quantile": None}
    std = float(arr.std(ddof=1))
    quantile = t_quantile(n - 1)
    half = quantile * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci": [mean - half, mean + half], "t_quantile": quantile}


def group_statistics(group: list[RunScores]) -> dict:
    return {key: spread([run.summary[key] for run in group]) for key in SUMMARY_METRICS}


def welch(a: list[float], b: list[float]) -> dict:
    """Welch's t test of mean(b) - mean(a): t, Welch-Satterthwaite df, two-sided p.

    Needs two runs per group; with no spread in either group the test is undefined (None).
    """
    if len(a) < 2 or len(b) < 2:
        raise ScoreError(f"Welch's t test needs at least 2 runs per group, got {len(a)} and {len(b)}")
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    difference = float(np.mean(b) - np.mean(a))
    if va + vb == 0:
        return {"difference": difference, "t": None, "df": None, "p": None}
    t_value = difference / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return {"difference": difference, "t": float(t_value), "df": float(df), "p": t_two_sided_p(t_value, df)}


def verdict(test: dict) -> str:
    if test["p"] is None:
        return "no spread in either group: the test is undefined"
    if test["p"] < SIGNIFICANCE:
        return f"exceeds the seeds' spread (p < {SIGNIFICANCE})"
    return f"within the seeds' spread (p >= {SIGNIFICANCE})"


# ----------------------------------------------------------------------------------------------------
# Text and JSON


def _num(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(stat: dict) -> str:
    return "n/a" if stat["ci"] is None else f"[{_num(stat['ci'][0])}, {_num(stat['ci'][1])}]"


def _mean_std(stat: dict) -> str:
    return "n/a" if stat["mean"] is None else f"{_num(stat['mean'])} ± {_num(stat['std'])}"


def _table(rows: list[list[str]], left: int = 1) -> list[str]:
    """Columns padded to width; the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return [
        "  ".join(v.ljust(w) if c < left else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]


def run_record(run: RunScores) -> dict:
    return {"run": run.name, "outputs_dir": str(run.outputs), "seed": run.seed,
            "metrics": {key: run.summary[key] for key in SUMMARY_METRICS}}


def aggregate_record(group: list[RunScores], single: SingleReference | None) -> dict:
    first = group[0]
    return {
        "runs": [run_record(run) for run in group],
        "conditions": first.conditions,
        "task_names": first.tasks,
        "single_run": None if single is None else single.name,
        "confidence": CONFIDENCE,
        "statistics": group_statistics(group),
        "warnings": [w for run in group for w in run.warnings],
    }


def format_aggregate(record: dict) -> str:
    runs = record["runs"]
    seeds = ", ".join("?" if r["seed"] is None else str(r["seed"]) for r in runs)
    if "?" in seeds:
        seeds += "; ? = not recorded"
    lines = [
        f"aggregate of {len(runs)} run(s): {', '.join(r['run'] for r in runs)} (seeds {seeds})",
        conditions_line(record["conditions"]),
        f"tasks: {' -> '.join(record['task_names'])}",
        f"single-task run for FWT: {record['single_run'] or 'none (FWT n/a)'}",
    ]
    lines += [f"warning: {w}" for w in record["warnings"]]
    if len(runs) < 2:
        lines.append("warning: one run has no spread: std and confidence interval are n/a")
    header = ["metric", "n", "mean", "std", f"{CONFIDENCE:.0%} CI (t, n-1 df)"]
    rows = [[key, str(s["n"]), _num(s["mean"]), _num(s["std"]), _ci(s)] for key, s in record["statistics"].items()]
    lines += ["", *_table([header, *rows])]
    per_run = [["run", "seed", *SUMMARY_METRICS]] + [
        [r["run"], "?" if r["seed"] is None else str(r["seed"]), *(_num(r["metrics"][k]) for k in SUMMARY_METRICS)]
        for r in runs
    ]
    lines += ["", *_table(per_run)]
    return "\n".join(lines) + "\n"


def compare_record(labels: list[str], groups: list[list[RunScores]], single: SingleReference | None) -> dict:
    """Each group's statistics, and each later group's AP against the first's (Welch)."""
    first_ap = [run.summary["AP"] for run in groups[0]]
    return {
        "groups": [
            {"label": label, "runs": [run_record(run) for run in group], "conditions": group[0].conditions,
             "statistics": group_statistics(group)}
            for label, group in zip(labels, groups)
        ],
        "task_names": groups[0][0].tasks,
        "single_run": None if single is None else single.name,
        "confidence": CONFIDENCE,
        "ap_tests": [
            {"group": label, "against": labels[0], **welch(first_ap, [run.summary["AP"] for run in group])}
            for label, group in zip(labels[1:], groups[1:])
        ],
    }


def format_compare(record: dict) -> str:
    groups = record["groups"]
    lines = [f"tasks: {' -> '.join(record['task_names'])}"]
    conditions = [conditions_line(g["conditions"]) for g in groups]
    if len(set(conditions)) == 1:
        lines.append(conditions[0])
    else:
        lines.append("note: the groups differ in their conditions")
        lines += [f"{g['label']}: {line}" for g, line in zip(groups, conditions)]
    header = ["group", "n", "AP mean ± std", f"AP {CONFIDENCE:.0%} CI", *(f"{k} mean ± std" for k in SUMMARY_METRICS[1:])]
    rows = [
        [g["label"], str(len(g["runs"])), _mean_std(g["statistics"]["AP"]), _ci(g["statistics"]["AP"]),
         *(_mean_std(g["statistics"][k]) for k in SUMMARY_METRICS[1:])]
        for g in groups
    ]
    lines += ["", *_table([header, *rows])]
    lines += [f"{g['label']} = {', '.join(r['run'] for r in g['runs'])}" for g in groups]
    lines.append("")
    for test in record["ap_tests"]:
        stats = "t n/a" if test["t"] is None else f"Welch t = {test['t']:.3f}, df = {test['df']:.2f}, p = {test['p']:.4g}"
        lines.append(
            f"AP {test['group']} - {test['against']} = {test['difference']:+.2f} ({stats}): {verdict(test)}"
        )
    return "\n".join(lines) + "\n"
