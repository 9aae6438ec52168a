"""The data of one task step, read as its plan (sapt.training.task_args.TaskPlan) lists it: training and dev sets
by method and protocol, the test sets of every task learned so far, ARM's pseudo sets and targets ā.

The pre-flight checks (sapt.training.validation) call these same functions before any model is loaded, so a bad
file ends the step in one line naming it; the run (sapt.train_task) calls them again to train.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, concatenate_datasets

from ..checkpoint import ROUTING_MEAN_FILE, CheckpointError, load_routing_mean
from ..methods.registry import get_method
from ..utils.cli import UsageError
from .data import BENCHMARKS, DataError, carve_dev, find_task, load_pseudo_split, load_split
from .task_args import SaptArguments, TaskPlan


def replay_memory(train_sets: list[Dataset], ratio: float, seed: int) -> Dataset:
    """A seeded sample of `ratio` of each earlier task's real training set (at least one example each)."""
    samples = []
    for number, train in enumerate(train_sets):
        size = max(1, round(ratio * len(train)))
        samples.append(train.shuffle(seed=seed + number).select(range(min(size, len(train)))))
    return concatenate_datasets(samples)


def union(datasets: list[Dataset]) -> Dataset:
    """Concatenate splits of several tasks, renumbering `index` so it addresses the union."""
    joined = concatenate_datasets(datasets)
    return joined.map(lambda _, i: {"index": i}, with_indices=True)


def read_splits(data_dir: str | Path, task_plan: TaskPlan, seed: int) -> dict:
    """{(task, split): Dataset} for every split file of the plan."""
    return {
        (read.task, read.split): load_split(data_dir, read.task, read.split, seed, read.max_samples)
        for read in task_plan.splits
    }


def _train_and_dev(args: SaptArguments, task_plan: TaskPlan, files: dict, task: str, seed: int):
    """A task's (train, dev): the clean protocol carves dev from train (train is None where only dev is
    read), the paper's reads the dev file."""
    if task_plan.dev_carved:
        train, dev = carve_dev(files[task, "train"], seed=seed)
    else:
        train, dev = files.get((task, "train")), files[task, "dev"]
    if args.max_eval_samples is not None:
        dev = dev.select(range(min(args.max_eval_samples, len(dev))))
    return train, dev


def load_training_data(args: SaptArguments, task_plan: TaskPlan, seed: int):
    """(train, dev, tests, probes) for this step: mtl trains on the union of the tasks learned so far,
    replay adds a memory of the earlier tasks' training sets; the clean protocol carves dev from train.
    `probes`: task -> the first dev inputs the routing trace routes, for every probe task."""
    files = read_splits(args.data_dir, task_plan, seed)

    def train_and_dev(task):
        return _train_and_dev(args, task_plan, files, task, seed)

    pairs = [train_and_dev(task) for task in task_plan.training_tasks]
    if get_method(args.method).joint:  # renumbered even for one task: `index` addresses the union
        train, dev = union([p[0] for p in pairs]), union([p[1] for p in pairs])
    else:
        (train, dev), = pairs
    if task_plan.memory_tasks:
        earlier = [train_and_dev(task)[0] for task in task_plan.memory_tasks]
        train = concatenate_datasets([train, replay_memory(earlier, args.replay_ratio, seed)])
    tests = {task: files[task, "test"] for task in task_plan.learned}
    probes = {}
    for task in task_plan.probe_tasks:
        task_dev = train_and_dev(task)[1]
        probes[task] = task_dev.select(range(min(args.routing_trace_inputs, len(task_dev))))
    return train, dev, tests, probes


def load_pseudo_sets(args: SaptArguments, task_plan: TaskPlan, seed: int) -> list:
    """ARM's pseudo inputs of every earlier task, oldest first (none when the step has no ARM)."""
    if not task_plan.pseudo_tasks:
        return []
    hint = f"pass --no_reflection to train {args.task} without ARM (no pseudo data needed)"
    if not args.gen_data_dir:
        raise UsageError(f"--gen_data_dir is required for ARM after the first task (or {hint})")
    gen_dir = Path(args.gen_data_dir)
    if not gen_dir.is_dir():
        raise DataError(f"--gen_data_dir {gen_dir}: pseudo data folder does not exist; {hint}")
    sets = []
    for task in task_plan.pseudo_tasks:
        try:
            find_task(gen_dir, task)
        except DataError:
            raise DataError(
                f"{gen_dir}: no pseudo data for earlier task {task!r} "
                f"(expected {gen_dir}/{{{','.join(BENCHMARKS)}}}/{task}/train.json); {hint}"
            ) from None
        try:
            sets.append(load_pseudo_split(gen_dir, task, seed))
        except DataError as err:
            raise DataError(f"{err}; fix the pseudo data or {hint}") from None
    return sets


def load_arm_targets(task_plan: TaskPlan, earlier_dirs: list[Path]) -> list[list[float]]:
    """ā of every earlier task from its folder (task i's over its i blocks), oldest first; none
    when the step has no ARM."""
    if not task_plan.pseudo_tasks:
        return []
    means = []
    for position, task_dir in enumerate(earlier_dirs, start=1):
        weights = load_routing_mean(task_dir)
        if len(weights) != position:
            raise CheckpointError(
                f"{task_dir / ROUTING_MEAN_FILE}: {len(weights)} routing weights, "
                f"expected {position} for task {position}"
            )
        means.append(weights)
    return means
