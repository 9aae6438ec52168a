"""The continual-learning benchmark as `datasets.Dataset` objects, with the release's prompts (docs/data.md).

Each example has the columns `task`, `source` (the full prompt), `target` (the label text) and
`index` (position in its split, used to match generations back to references).

`datasets` is imported only where a split becomes a Dataset, so that light commands (sapt.prepare_data,
the generators) can read the benchmark's names and files from here without loading it.
"""

from __future__ import annotations

import difflib
import random
from pathlib import Path
from typing import TYPE_CHECKING

from ..benchmark_spec import Benchmark, BenchmarkError, benchmark, benchmark_folders, locate_task, shipped_benchmarks
from ..utils.fileio import read_json

if TYPE_CHECKING:
    from datasets import Dataset

# Each benchmark's metric, prompt and label handling are its spec's (sapt.benchmark_spec, docs/benchmarks.md).
BENCHMARKS = tuple(shipped_benchmarks())
SPLITS = ("train", "dev", "test")
PSEUDO_SPLIT = "train"  # pseudo samples of a task sit where its training split would, under their own root


class DataError(ValueError):
    """Benchmark files that are missing or not in the expected format (message names the file)."""


def find_task(data_dir: str | Path, task: str) -> tuple[str, Path]:
    """(benchmark, folder) of `task` under a CL_Benchmark-style root (or a benchmark folder itself)."""
    benchmark_spec, folder = _locate(data_dir, task)
    return benchmark_spec.name, folder


def _locate(data_dir: str | Path, task: str) -> tuple[Benchmark, Path]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder does not exist")
    try:
        found = locate_task(data_dir, task)
        if found is None:  # the folders are listed again only to name them in the error
            names = " or ".join(_benchmark_names(data_dir))
            raise DataError(f"{data_dir}: no task folder named {task!r} under {names}{_known_tasks_hint(data_dir, task)}")
    except BenchmarkError as err:
        raise DataError(str(err)) from None
    return found


def _benchmark_names(data_dir: Path) -> list[str]:
    """The shipped benchmarks' names, then those of data_dir's folders with their own spec."""
    return [*BENCHMARKS, *(spec.name for spec, _ in benchmark_folders(data_dir) if spec.name not in BENCHMARKS)]


def task_names(data_dir: str | Path) -> list[str]:
    """Every task folder under a CL_Benchmark-style root (or a benchmark folder itself), sorted."""
    roots = [root for _, root in benchmark_folders(data_dir)]
    return sorted({folder.name for root in roots if root.is_dir() for folder in root.iterdir() if folder.is_dir()})


def _known_tasks_hint(data_dir: Path, task: str) -> str:
    """'; did you mean X? tasks there: ...' for a task name that is not there."""
    names = task_names(data_dir)
    if not names:
        return " (no task folders there: run `make data`, or pass the folder that holds them)"
    close = difflib.get_close_matches(task, names, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f"; {guess}tasks there: {', '.join(names)}"


def benchmark_of(data_dir: str | Path, task: str) -> Benchmark:
    """The spec of the benchmark `task` belongs to: its metric selects the model on dev."""
    return _locate(data_dir, task)[0]


def format_prompt(benchmark_name: str, definition: str, text: str) -> str:
    """The prompt of a shipped benchmark's instance."""
    return benchmark(benchmark_name).format_prompt(definition, text)


def _is_text(value) -> bool:
    """A str that is valid Unicode (JSON escapes can produce lone surrogates, which no tokenizer takes)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_split_file(path: Path, strip_definition: bool = True) -> tuple[str, list[dict]]:
    """(definition, instances) of one split file, validated. Any problem is a DataError naming the file.
    The definition is the file's first, stripped as the prompts use it (`strip_definition=False`: as
    written, for sapt.tiny's tokenizer corpus)."""
    data = read_json(path, DataError, "split file")
    if not isinstance(data, dict) or not isinstance(data.get("Instances"), list):
        raise DataError(f"{path}: expected a JSON object with an 'Instances' list")
    definition = data.get("Definition", "")
    if isinstance(definition, list):
        definition = definition[0] if definition else ""
    if not _is_text(definition):
        raise DataError(f"{path}: 'Definition' must be a string or a list of strings")
    instances = data["Instances"]
    if not instances:
        raise DataError(f"{path}: split has no instances")
    for number, instance in enumerate(instances):
        if not isinstance(instance, dict) or "input" not in instance or "output" not in instance:
            raise DataError(f"{path}: instance {number} lacks 'input' or 'output'")
        output = instance["output"]
        valid_list = isinstance(output, list) and output and all(_is_text(o) for o in output)
        if not _is_text(instance["input"]) or not (_is_text(output) or valid_list):
            raise DataError(f"{path}: instance {number} has a non-text 'input' or 'output'")
    return (definition.strip() if strip_definition else definition), instances


def load_split(
    data_dir: str | Path,
    task: str,
    split: str,
    seed: int = 42,
    max_samples: int | None = None,
    require_outputs: bool = True,
) -> Dataset:
    """One split of one task. A list-valued `output` contributes one element, drawn with `seed`."""
    from datasets import Dataset

    spec, folder = _locate(data_dir, task)
    definition, instances = read_split_file(folder / f"{split}.json")
    if max_samples is not None:
        instances = instances[:max_samples]
    rng = random.Random(f"{seed}-{task}-{split}")
    rows = {"task": [], "source": [], "target": [], "index": []}
    for index, instance in enumerate(instances):
        output = instance["output"]
        if isinstance(output, list):  # the spec's list_outputs: "draw_one", the only rule (checked with the spec)
            output = rng.choice(output)
        if require_outputs and not output.strip():
            raise DataError(f"{folder / f'{split}.json'}: instance {index} has an empty output")
        rows["task"].append(task)
        rows["source"].append(spec.format_prompt(definition, instance["input"]))
        rows["target"].append(output)
        rows["index"].append(index)
    return Dataset.from_dict(rows)


def load_pseudo_split(gen_data_dir: str | Path, task: str, seed: int = 42) -> Dataset:
    """Pseudo samples of an earlier task (docs/data.md, pseudo samples): only the prompts matter, outputs are empty."""
    return load_split(gen_data_dir, task, PSEUDO_SPLIT, seed=seed, require_outputs=False)


def carve_dev(train: Dataset, fraction: float = 0.1, seed: int = 42, min_size: int = 1) -> tuple[Dataset, Dataset]:
    """Clean protocol: hold out part of train (seeded) for model selection, since the released
    dev files equal the test files (docs/reproducing.md, protocols)."""
    size = max(min_size, int(round(len(train) * fraction)))
    if size >= len(train):
        raise DataError(f"train split of {train[0]['task']!r} is too small to carve a dev split from")
    parts = train.train_test_split(test_size=size, seed=seed, shuffle=True)
    dev = parts["test"].map(lambda _, i: {"index": i}, with_indices=True)
    return parts["train"], dev
