"""Benchmarks as data: each benchmark's spec says its metric, its prompt, how its task names look and how
its labels are drawn (docs/benchmarks.md).

The released benchmarks' specs ship in ``benchmarks.json`` beside this module. A benchmark of your own is
a folder under the data root holding its task folders and a ``benchmark.json`` with its spec. Data loading
(sapt.training.data) and scoring (sapt.experiments.cl_metrics) take the metric from here and nowhere else.
Without torch or datasets, at the bottom of the package like sapt.run_files.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .run_files import RESULT_KEY_PREFIX
from .utils.fileio import read_json

SHIPPED_FILE = Path(__file__).with_name("benchmarks.json")
SPEC_FILE = "benchmark.json"  # the spec of a benchmark that is not shipped, in its own folder
METRICS = tuple(RESULT_KEY_PREFIX)  # the metrics a run's results record for every task
# How a list-valued output becomes the label: the release draws one element per instance, seeded.
LIST_OUTPUT_RULES = ("draw_one",)
# Each field of a spec and whether it is required.
FIELDS = {
    "metric": True, "prompt": True, "prompt_without_definition": False, "task_names": True,
    "task_name_example": True, "column_label": False, "list_outputs": True,
}
# The placeholders each template may use.
TEMPLATE_FIELDS = {"prompt": {"definition", "input"}, "prompt_without_definition": {"input"}}


class BenchmarkError(ValueError):
    """An unknown benchmark or a spec that is missing or malformed; the message is one line naming the file."""


@dataclass(frozen=True)
class Benchmark:
    name: str  # also the name of its folder under the data root
    metric: str  # one of METRICS: selects the model on dev and scores the tests
    prompt: str
    prompt_without_definition: str | None  # the prompt for an empty definition; None: `prompt` always
    task_names: re.Pattern
    task_name_example: str
    column_label: re.Pattern | None
    list_outputs: str

    def format_prompt(self, definition: str, text: str) -> str:
        use_prompt = definition or self.prompt_without_definition is None
        template = self.prompt if use_prompt else self.prompt_without_definition
        return template.format(definition=definition, input=text)

    def fits(self, task: str) -> bool:
        """Whether `task` looks like a task name of this benchmark."""
        return self.task_names.search(task) is not None

    def label_of_column(self, task: str) -> str | None:
        match = self.column_label.search(task) if self.column_label is not None else None
        return match.group(0) if match else None


def _template_problem(field: str, template: str) -> str | None:
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        return f"{field} is not a valid template ({err})"
    if "input" not in used:
        return f"{field} lacks the {{input}} placeholder"
    unknown = used - TEMPLATE_FIELDS[field]
    return f"{field} uses unknown placeholder(s) {', '.join(sorted(unknown))}" if unknown else None


def _pattern(source: Path, name: str, field: str, value: str) -> re.Pattern:
    try:
        return re.compile(value)
    except re.error as err:
        raise BenchmarkError(f"{source}: {name}: {field} is not a valid regular expression ({err})") from None


def parse_spec(name: str, entry, source: str | Path) -> Benchmark:
    """One benchmark's spec, checked; any problem is a BenchmarkError naming `source` and the benchmark."""
    source = Path(source)
    if not isinstance(entry, dict):
        raise BenchmarkError(f"{source}: {name}: expected a JSON object, got {type(entry).__name__}")
    fields = {key: value for key, value in entry.items() if not key.startswith("_")}  # "_comment" keys are notes
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise BenchmarkError(f"{source}: {name}: unknown field(s) {', '.join(unknown)} (fields: {', '.join(FIELDS)})")
    missing = [key for key, required in FIELDS.items() if required and key not in fields]
    if missing:
        raise BenchmarkError(f"{source}: {name}: missing field(s) {', '.join(missing)}")
    for key, value in fields.items():
        if not isinstance(value, str) or not value:
            raise BenchmarkError(f"{source}: {name}: {key} must be a non-empty string")
    if fields["metric"] not in METRICS:
        raise BenchmarkError(f"{source}: {name}: unknown metric {fields['metric']!r} (one of {', '.join(METRICS)})")
    if fields["list_outputs"] not in LIST_OUTPUT_RULES:
        raise BenchmarkError(
            f"{source}: {name}: unknown list_outputs {fields['list_outputs']!r} (one of {', '.join(LIST_OUTPUT_RULES)})"
        )
    for field in TEMPLATE_FIELDS:
        problem = _template_problem(field, fields[field]) if field in fields else None
        if problem:
            raise BenchmarkError(f"{source}: {name}: {problem}")
    spec = Benchmark(
        name=name,
        metric=fields["metric"],
        prompt=fields["prompt"],
        prompt_without_definition=fields.get("prompt_without_definition"),
        task_names=_pattern(source, name, "task_names", fields["task_names"]),
        task_name_example=fields["task_name_example"],
        column_label=_pattern(source, name, "column_label", fields["column_label"]) if "column_label" in fields else None,
        list_outputs=fields["list_outputs"],
    )
    if not spec.fits(spec.task_name_example):
        raise BenchmarkError(f"{source}: {name}: task_name_example {spec.task_name_example!r} does not fit task_names")
    return spec


@lru_cache(maxsize=None)
def shipped_benchmarks() -> dict[str, Benchmark]:
    """The released benchmarks' specs (benchmarks.json), in the file's order."""
    data = read_json(SHIPPED_FILE, BenchmarkError, "benchmark spec file")
    if not isinstance(data, dict):
        raise BenchmarkError(f"{SHIPPED_FILE}: expected a JSON object of specs by benchmark name")
    return {name: parse_spec(name, entry, SHIPPED_FILE) for name, entry in data.items() if not name.startswith("_")}


def folder_spec(folder: str | Path) -> Benchmark | None:
    """The spec of a benchmark folder: a shipped benchmark's by its name, or the folder's own benchmark.json;
    None for a folder that is neither."""
    folder = Path(folder)
    shipped = shipped_benchmarks()
    own = folder / SPEC_FILE
    if folder.name in shipped:
        if own.is_file():
            raise BenchmarkError(f"{own}: {folder.name} is a shipped benchmark; its spec is {SHIPPED_FILE}")
        return shipped[folder.name]
    if not own.is_file():
        return None
    return parse_spec(folder.name, read_json(own, BenchmarkError, "benchmark spec"), own)


def benchmark_folders(data_dir: str | Path) -> list[tuple[Benchmark, Path]]:
    """(spec, folder) of each benchmark folder under a data root: the shipped ones first, in their order, then
    those with their own spec, by name; and the root itself when it is a benchmark folder."""
    data_dir = Path(data_dir)
    shipped = [data_dir / name for name in shipped_benchmarks() if (data_dir / name).is_dir()]
    found = [(folder_spec(folder), folder) for folder in shipped]  # a stray benchmark.json there is an error
    if data_dir.is_dir():
        own = sorted(p for p in data_dir.iterdir() if p.name not in shipped_benchmarks() and (p / SPEC_FILE).is_file())
        found += [(folder_spec(folder), folder) for folder in own]
    itself = folder_spec(data_dir) if data_dir.is_dir() else None
    if itself is not None:
        found.append((itself, data_dir))
    return found


def locate_task(data_dir: str | Path, task: str) -> tuple[Benchmark, Path] | None:
    """(spec, folder) of `task` under a data root (or a benchmark folder itself); None where it is not."""
    for spec, root in benchmark_folders(data_dir):
        if (root / task).is_dir():
            return spec, root / task
    return None


def benchmark(name: str, data_dir: str | Path | None = None) -> Benchmark:
    """The spec of benchmark `name`: a shipped one, or one with its own spec under `data_dir`."""
    if name in shipped_benchmarks():
        return shipped_benchmarks()[name]
    spec = folder_spec(Path(data_dir) / name) if data_dir is not None else None
    if spec is None:
        where = f" and no {Path(data_dir) / name / SPEC_FILE}" if data_dir is not None else ""
        raise BenchmarkError(f"unknown benchmark {name!r} (shipped: {', '.join(shipped_benchmarks())}{where})")
    return spec


def benchmark_by_task_name(task: str) -> Benchmark | None:
    """The first shipped benchmark whose task names `task` fits: for runs that record no data folder."""
    return next((spec for spec in shipped_benchmarks().values() if spec.fits(task)), None)


def column_label(task: str) -> str | None:
    """The short label of a task's column in score reports (SuperNI's 'task363'), or None."""
    spec = benchmark_by_task_name(task)
    return spec.label_of_column(task) if spec is not None else None
