"""Write a whole experiment as per-task JSON configs plus one shell pipeline that runs them.

The four `gen_script_*.py` files are presets over `main()`. The pipeline trains the tasks in order, one
process each, skips tasks whose folder is complete (so running it again continues where it stopped),
and ends with `python -m sapt score` (what `score.py` runs). With `--seeds 1,2,3` one pipeline runs the
whole experiment once per seed, one seed after another (runs `<run>_seed1`, ...), and ends with
`python -m sapt score --aggregate` over them. A pipeline holds its runs' locks throughout: a second one
on the same run stops at once, naming the first.

Everything is written under `--workdir` (default: the directory the generator runs in), and every
relative path is read there: the pipeline, its configs, logs_and_outputs/, results/, tiny_models/. The
pipeline calls the installed package's entry points (`python -m sapt...`), never a file of a checkout,
so it works the same from a clone, an editable install of another clone, or a plain `pip install .`.
Its `python` is the interpreter that wrote it (an absolute path), not whichever is first on PATH: a
virtual environment works without being activated.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..methods.registry import METHOD_NAMES, get_method
from ..run_files import COMPLETE_FILE, run_lock_path, task_dir_name
from ..training.data import DataError
from ..training.preflight import check_split_file, locate_backbone, pseudo_files, split_files
from ..training.release_exact import ReleaseArgumentError, generator_switches, release_task_arguments
from ..training.task_args import SaptArguments, check_task_overrides, plan
from ..utils.cli import OneLineArgumentParser, UsageError, report_error
from ..utils.fileio import write_json_atomic, write_text_atomic

# Presets, task orders and DeepSpeed configs are package data (the checkout's top-level configs/ links here).
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
# Absolute: the pipeline runs in its --workdir, wherever the package is installed.
DEEPSPEED_CONFIGS = {stage: str(PACKAGE_CONFIGS / "ds_configs" / f"{stage}.json") for stage in ("zero2", "zero3")}
# Every step runs the interpreter that wrote the pipeline; its header sets $PYTHON to it.
PYTHON = '"$PYTHON"'
# What a pipeline runs besides the task steps: entry points of the installed package.
SCORE_COMMAND = f"{PYTHON} -m sapt score"
PSEUDO_DATA_COMMAND = f"{PYTHON} -m sapt pseudo_data"
TINY_COMMAND = f"{PYTHON} -m sapt tiny"
LOCK_COMMAND = f"{PYTHON} -m sapt run_lock"
LOCKED_FLAG = "--locked"  # the pipeline's argument when it runs again holding its runs' locks
# Where a pipeline is written when --output is not given, under the workdir.
GENERATED_PIPELINES = "scripts/generated"
DEFAULT_SEED = 42


def seed_run_name(run_name: str, seed: int) -> str:
    """The run of one seed of a --seeds experiment."""
    return f"{run_name}_seed{seed}"


def regenerated_pseudo_dir(run_name: str, settings: dict) -> str:
    """Where a pipeline that regenerates ARM's pseudo samples writes them: inside its run."""
    return f"logs_and_outputs/{run_name}/generated_data/{settings['gen_data']}"


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


@dataclass
class Experiment:
    preset: str
    settings: dict  # the preset, with --quick and --set applied
    method: str
    order: str
    tasks: list[str]
    run_name: str
    model_name_or_path: str
    data_dir: str
    gen_data_dir: str | None
    protocol: str = "paper"
    quick: bool = False
    build_tiny: bool = False  # quick mode without a given model: the pipeline builds a tiny one first
    seed: int = DEFAULT_SEED
    seeds: list[int] = field(default_factory=list)  # --seeds: the whole experiment once per seed
    gpus: int = 1
    deepspeed: str | None = None
    pseudo_data: str = "shipped"
    single_run: str | None = None
    workdir: str = field(default_factory=os.getcwd)  # absolute; the pipeline cds there
    extra: dict = field(default_factory=dict)
    release_exact: bool = False  # --release_exact: train as the release's code did (sapt.training.release_exact)
    release_behaviours: str | None = None  # --release_behaviours: some of its behaviours

    @property
    def family(self) -> str:
        return self.settings["family"]

    @property
    def method_record(self):
        """What the method is (sapt.methods.registry)."""
        return get_method(self.method)

    def output_dir(self, position: int) -> str:
        return f"logs_and_outputs/{self.run_name}/outputs/{task_dir_name(position, self.tasks[position - 1])}"

    def seed_runs(self) -> list[Experiment]:
        """One experiment per --seeds entry, each its own run `<run>_seed<N>` with its own pseudo data."""
        runs = []
        for seed in self.seeds:
            name = seed_run_name(self.run_name, seed)
            gen_data_dir = regenerated_pseudo_dir(name, self.settings) if self.pseudo_data == "regenerate" else self.gen_data_dir
            runs.append(replace(self, run_name=name, seed=seed, seeds=[], gen_data_dir=gen_data_dir))
        return runs

    def positions(self) -> list[int]:
        """1-based positions this method trains: all, or only the last for joint training."""
        return [len(self.tasks)] if self.method_record.joint else list(range(1, len(self.tasks) + 1))

    def task_arguments(self, position: int) -> dict:
        """The `sapt.train_task` arguments (and Seq2SeqTrainingArguments) of one task."""
        s = self.settings
        args = {
            "model_name_or_path": self.model_name_or_path,
            "data_dir": self.data_dir,
            "task_order": ",".join(self.tasks),
            "task": self.tasks[position - 1],
            "method": self.method,
            "output_dir": self.output_dir(position),
            "protocol": self.protocol,
            "lora_r": s["lora_r"],
            "lora_alpha": s["lora_alpha"],
            "lora_dropout": s["lora_dropout"],
            "max_source_length": s["max_source_length"],
            "max_target_length": s["max_target_length"],
            "generation_max_length": s.get("generation_max_length", 50),
            "learning_rate": s["learning_rate"],
            "num_train_epochs": s["num_train_epochs"],
            "per_device_train_batch_size": s["per_device_train_batch_size"],
            "gradient_accumulation_steps": s["gradient_accumulation_steps"],
            "eval_every_epochs": s["eval_every_epochs"],
            # A checkpoint per epoch (the last one kept) lets an interrupted task continue mid-way.
            "save_strategy": "epoch",
            "save_total_limit": 1,
            "seed": self.seed,
            "bf16": not self.quick,
            "logging_steps": 10,
            "disable_tqdm": True,
        }
        if self.method_record.reflection:
            args["kl_ratio"] = s["kl_ratio"]
            if self.gen_data_dir:
                args["gen_data_dir"] = self.gen_data_dir
            else:
                args["no_reflection"] = True
        if self.method_record.continues and position > 1:
            args["previous_task_dir"] = self.output_dir(position - 1)
        for key in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            if key in s:
                args[key] = s[key]
        if self.deepspeed:
            args["deepspeed"] = DEEPSPEED_CONFIGS[self.deepspeed]
            # DeepSpeed's own checkpoints are pickled and hold the frozen backbone: tasks restart whole.
            args["save_strategy"] = "no"
        if self.release_exact or self.release_behaviours:
            task = self.tasks[position - 1]
            for key, value in release_task_arguments(
                self.settings, task, position, self.release_exact, self.release_behaviours
            ).items():
                if value is None:
                    args.pop(key, None)
                else:
                    args[key] = value
        args.update(self.extra)
        # After --set: evaluation batches follow the training batch the run really uses.
        args.setdefault("per_device_eval_batch_size", args["per_device_train_batch_size"] * 2)
        return args


def parse_set(values: list[str]) -> dict:
    """`--set key=value` pairs, values parsed as JSON when they can be (numbers, true/false)."""
    parsed = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def parse_seeds(value: str, parser: argparse.ArgumentParser) -> list[int]:
    """--seeds 1,2,3: distinct non-negative integers, in the order they are to run."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items or not all(item.isdigit() for item in items):
        parser.error(f"--seeds expects non-negative integers separated by commas, got {value!r}")
    seeds = [int(item) for item in items]
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        parser.error(f"--seeds repeats {', '.join(map(str, repeated))}")
    return seeds


def own_tasks(value: str, parser: argparse.ArgumentParser) -> list[str]:
    """The task folders named by --tasks, in that order (check_inputs looks for them)."""
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    if not tasks:
        parser.error("--tasks is empty")
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        parser.error(f"--tasks repeats {', '.join(repeated)}")
    return tasks


def build_parser(preset: str, settings: dict, orders: dict) -> argparse.ArgumentParser:
    family = settings["family"]
    available = sorted(orders[settings["benchmark"]], key=int)
    parser = OneLineArgumentParser(
        prog=f"gen_script_{preset}.py",
        description=f"Write the {settings['benchmark']} / {family} experiment as a shell pipeline.",
    )
    parser.add_argument("--model_name_or_path", default=None,
                        help="Backbone: a folder with config.json and a tokenizer, or a model in the local Hugging Face "
                             f"cache (default: {settings['model_name_or_path']}; with --quick, a tiny random model the "
                             "pipeline builds).")
    parser.add_argument("--run_name", default=None, help="Folder name under logs_and_outputs/ (default from method, order).")
    parser.add_argument("--order", default=settings["default_order"], choices=available,
                        help="Task order (docs/reproducing.md)" + ("; 1-3 are the standard 4-task benchmark" if settings["benchmark"] == "Long_Sequence" else ""))
    parser.add_argument("--tasks", default=None, metavar="A,B,C",
                        help="Your own task order: task folders of --data_dir, comma-separated (instead of --order).")
    parser.add_argument("--method", default="sapt", choices=METHOD_NAMES,
                        help="; ".join(f"{m.name}: {m.summary}" for m in map(get_method, METHOD_NAMES))
                        + " (docs/methods.md).")
    parser.add_argument("--protocol", default="paper", choices=["paper", "clean"],
                        help="paper: the released dev files (= test); clean: dev carved from train.")
    parser.add_argument("--quick", action="store_true",
                        help="First three tasks, a few steps, CPU; a tiny local model unless --model_name_or_path is given.")
    parser.add_argument("--data_dir", default="CL_Benchmark",
                        help="Benchmark root holding SuperNI/ and Long_Sequence/ task folders (written by `make data`).")
    parser.add_argument("--gen_data_root", default="generated_data", help="Folder holding lora_gen_* pseudo data.")
    parser.add_argument("--pseudo_data", default="shipped", choices=["shipped", "regenerate", "none"],
                        help="ARM's pseudo samples: the released ones, regenerated by this pipeline, or no ARM.")
    parser.add_argument("--seed", type=int, default=None, help=f"Seed of every task step (default {DEFAULT_SEED}).")
    parser.add_argument("--seeds", default=None, metavar="1,2,3",
                        help="Run the whole experiment once per seed, one after another, as runs <run>_seed<N>; "
                             "the pipeline ends with score.py --aggregate over them.")
    parser.add_argument("--gpus", type=int, default=None,
                        help=f"Processes (GPUs) per task; more than 1 runs torch.distributed.run (torchrun) "
                             f"(default {settings['gpus']}; 0 with --quick).")
    if family == "llama":
        parser.add_argument("--deepspeed", default=None, choices=sorted(DEEPSPEED_CONFIGS), help="DeepSpeed ZeRO stage config.")
    parser.add_argument("--single_run", default=None, help="Single-task run name passed to score.py for FWT.")
    parser.add_argument("--release_exact", action="store_true",
                        help="Train as the official release's code did (docs/release_exact.md); LLaMA tasks then run "
                             "in one process standing for the release's GPUs.")
    parser.add_argument("--release_behaviours", default=None, metavar="A,B,-C",
                        help="Some of the release's behaviours (names in sapt.training.release_exact; '-name' removes one "
                             "from --release_exact).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override any train_task argument.")
    parser.add_argument("--output", default=None,
                        help=f"Pipeline path, relative to --workdir (default {GENERATED_PIPELINES}/<run>.sh).")
    parser.add_argument("--workdir", default=None,
                        help="Where the pipeline runs (default: the current directory): relative paths are read "
                             "there, and the pipeline, logs_and_outputs/, results/, tiny_models/ are written there.")
    return parser


def make_experiment(preset: str, argv: list[str] | None = None, configs: Path = PACKAGE_CONFIGS) -> tuple[Experiment, Path]:
    presets, orders = load_json(configs / "presets.json"), load_json(configs / "orders.json")
    settings = dict(presets[preset])
    parser = build_parser(preset, settings, orders)
    ns = parser.parse_args(argv)
    workdir = Path(os.path.abspath(ns.workdir or os.curdir))
    try:
        extra = parse_set(ns.set)
        check_task_overrides(extra)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    if ns.gpus is not None and ns.gpus < 0:
        parser.error("--gpus must be 0 or more")
    seeds = [] if ns.seeds is None else parse_seeds(ns.seeds, parser)
    if seeds and (ns.seed is not None or "seed" in extra):
        parser.error("give --seeds or a single seed (--seed, --set seed=...), not both")
    tasks = list(orders[settings["benchmark"]][ns.order])
    if ns.tasks is not None:
        tasks = own_tasks(ns.tasks, parser)
    model = ns.model_name_or_path or settings["model_name_or_path"]
    if ns.quick:
        settings.update({k: v for k, v in presets["quick"].items() if not k.startswith("_")})
        if ns.tasks is None:  # an own task list is taken as given
            synthetic = workdir / ns.data_dir / "SYNTHETIC.json"
            if synthetic.is_file():  # `make data` found no release and wrote the synthetic benchmark
                tasks = load_json(synthetic)["orders"][settings["benchmark"]]
            tasks = tasks[: settings["tasks"]]
        model = ns.model_name_or_path or f"tiny_models/{settings['family']}"
    gpus = settings["gpus"] if ns.gpus is None else ns.gpus
    release = bool(ns.release_exact or ns.release_behaviours)
    if release:
        try:
            switches = generator_switches(settings, ns.release_exact, ns.release_behaviours)
        except ReleaseArgumentError as err:
            parser.error(str(err))
        if switches.one_process and ((ns.gpus or 0) > 1 or getattr(ns, "deepspeed", None)):
            parser.error("release-exact stepping and schedule run each task in one process that stands for the "
                         "release's GPUs; drop --gpus and --deepspeed")
        if switches.one_process:
            gpus = min(gpus, 1)
    which = "tasks" if ns.tasks is not None else f"order{ns.order}"
    run_name = ns.run_name or (
        f"{ns.method}_{preset}_{which}" + ("_release" if release else "") + ("_quick" if ns.quick else "")
    )
    if not run_name.replace("-", "_").replace(".", "_").isidentifier():
        parser.error(f"--run_name {run_name!r} must be letters, digits, '-', '_' or '.'")
    gen_data_dir = None
    reflects = get_method(ns.method).needs_pseudo_data
    if reflects and ns.pseudo_data == "shipped":
        gen_data_dir = f"{ns.gen_data_root}/{settings['gen_data']}"
    elif reflects and ns.pseudo_data == "regenerate":
        gen_data_dir = regenerated_pseudo_dir(run_name, settings)
    experiment = Experiment(
        preset=preset, settings=settings, method=ns.method, order=ns.order if ns.tasks is None else "custom",
        tasks=tasks, run_name=run_name, model_name_or_path=model, data_dir=ns.data_dir, gen_data_dir=gen_data_dir,
        protocol=ns.protocol, quick=ns.quick, build_tiny=ns.quick and ns.model_name_or_path is None,
        seed=DEFAULT_SEED if ns.seed is None else ns.seed, seeds=seeds,
        gpus=gpus, deepspeed=getattr(ns, "deepspeed", None),
        pseudo_data=ns.pseudo_data if reflects else "none", single_run=ns.single_run, workdir=str(workdir), extra=extra,
        release_exact=ns.release_exact, release_behaviours=ns.release_behaviours,
    )
    output = Path(ns.output or f"{GENERATED_PIPELINES}/{run_name}" + ("_seeds" if seeds else "") + ".sh")
    return experiment, workdir / output  # an absolute --output stays as given


# ---- pre-flight: what the pipeline's steps will read, checked before anything is written -----------
def step_arguments(exp: Experiment, position: int) -> SaptArguments:
    """The sapt.train_task arguments of one step, its paths read under the workdir (as the pipeline runs)."""
    names = {f.name for f in fields(SaptArguments)}
    args = SaptArguments(**{k: v for k, v in exp.task_arguments(position).items() if k in names})
    args.data_dir = str(Path(exp.workdir) / args.data_dir)
    if args.gen_data_dir:
        args.gen_data_dir = str(Path(exp.workdir) / args.gen_data_dir)
    return args


def check_inputs(exp: Experiment) -> str:
    """For every step of the pipeline, the split files its plan reads (sapt.training.task_args.plan) are there
    and parse, and so are ARM's pseudo samples unless the pipeline writes them first; the model is on this
    machine unless quick mode builds it. Returns what was found for the model; DataError or UsageError."""
    workdir = Path(exp.workdir)
    checked: set[Path] = set()
    for position in exp.positions():
        args = step_arguments(exp, position)
        if not Path(args.data_dir).is_dir():
            raise DataError(f"{args.data_dir}: data folder does not exist; run `make data` in {workdir} or pass --data_dir")
        task_plan = plan(args)
        step = task_dir_name(position, args.task)
        files = [(path, f"step {step} reads it: restore it (`make data`) or leave its task out (--tasks)")
                 for path in split_files(args.data_dir, task_plan)]
        if task_plan.pseudo_tasks and exp.pseudo_data == "shipped":
            hint = ("ARM reads every earlier task's pseudo samples: pass --gen_data_root, or --pseudo_data regenerate "
                    "(the pipeline writes them) or none (no ARM)")
            try:
                files += [(path, hint) for path in pseudo_files(args.gen_data_dir, task_plan)]
            except DataError as err:
                raise DataError(f"{err}; {hint}") from None
        for path, hint in files:
            if path not in checked:
                try:
                    check_split_file(path)
                except DataError as err:
                    raise DataError(f"{err}; {hint}") from None
                checked.add(path)
    if exp.build_tiny:
        return f"a tiny random {exp.family} model, which the pipeline builds first in {exp.model_name_or_path}"
    return locate_backbone(exp.model_name_or_path, workdir)


def _launch(exp: Experiment) -> str:
    """The command of a task step (before its config): $SAPT_LAUNCH when set, else this interpreter, as one
    process or as `--gpus` processes under torch's launcher (what `torchrun` runs)."""
    several = f" -m torch.distributed.run --nproc_per_node {exp.gpus}" if exp.gpus > 1 else ""
    return f"${{SAPT_LAUNCH:-{PYTHON}{several} -m sapt train_task}}"


def _header(exp: Experiment, also: str = "") -> list[str]:
    return [
        "#!/usr/bin/env bash",
        f"# {exp.method} on {exp.settings['benchmark']} / {exp.family}, order {exp.order} ({len(exp.tasks)} tasks)"
        + (", quick mode" if exp.quick else "") + also,
        f"# Written by gen_script_{exp.preset}.py. Run it again to continue where it stopped:",
        "# tasks whose folder holds task_complete.json are skipped.",
        "# Every step runs $PYTHON, the interpreter that wrote this file ($SAPT_LAUNCH, when set, runs the tasks).",
        "set -euo pipefail",
        f"cd {shlex.quote(exp.workdir)}",
        f"PYTHON={shlex.quote(sys.executable)}",
    ]


def _lock_lines(runs: list[Experiment], script: Path) -> list[str]:
    """The pipeline runs itself again holding its runs' locks (sapt.run_lock): a second pipeline on one
    of them stops at once, naming the first."""
    q = shlex.quote
    locks = " ".join(q(str(run_lock_path(run.output_dir(1)))) for run in runs)
    return [
        "# One pipeline per run: the rest runs holding the run's lock, or stops here naming its holder.",
        f'if [ "${{1:-}}" != {LOCKED_FLAG} ]; then exec {LOCK_COMMAND} {locks} -- bash {q(str(script))} {LOCKED_FLAG}; fi',
        "",
    ]


def _tiny_model_lines(exp: Experiment) -> list[str]:
    if not exp.build_tiny:
        return []
    q = shlex.quote
    return [f"{TINY_COMMAND} --family {exp.family} --out {q(exp.model_name_or_path)} "
            f"--data_dir {q(exp.data_dir)} --d_model {exp.settings['tiny_d_model']}", ""]


def _run_lines(exp: Experiment) -> list[str]:
    """Pseudo data (when regenerated), every task step, then the run's score: one run of the experiment."""
    q = shlex.quote
    lines = []
    if exp.pseudo_data == "regenerate":
        steps = "--steps 100 --max_train_samples 32" if exp.quick else ""
        lines += [
            f"{PSEUDO_DATA_COMMAND} --model_name_or_path {q(exp.model_name_or_path)} "
            f"--data_dir {q(exp.data_dir)} --tasks {q(','.join(exp.tasks[:-1]))} --out {q(exp.gen_data_dir)} "
            f"--seed {exp.seed} {steps}".rstrip(),
            "",
        ]
    names = [task_dir_name(p, exp.tasks[p - 1]) for p in exp.positions()]
    lines += [
        f"STEPS=({' '.join(q(n) for n in names)})",
        'for STEP in "${STEPS[@]}"; do',
        '  OUT="logs_and_outputs/$RUN/outputs/$STEP"',
        f'  if [ -f "$OUT/{COMPLETE_FILE}" ]; then echo "[pipeline] $STEP: complete, skipped"; continue; fi',
        '  echo "[pipeline] $STEP: training"',
        f'  {_launch(exp)} "$CONFIGS/$STEP.json"',
        "done",
        "",
    ]
    if exp.method_record.alone:  # each task alone: the reference for another run's FWT, no matrix of its own
        lines.append(f'echo "[pipeline] single-task scores for FWT: $PYTHON -m sapt score RUN {exp.run_name}"')
    else:
        lines.append(f"{SCORE_COMMAND} \"$RUN\"" + (f" {q(exp.single_run)}" if exp.single_run else ""))
    return lines


def _quick_note(exp: Experiment) -> list[str]:
    """What quick mode's scores mean, said after them."""
    if not exp.quick:
        return []
    if exp.build_tiny:
        note = ("quick mode: a tiny RANDOM model trained for a few steps, so scores near 0 are expected: they show "
                "that the harness runs end to end, not what the method does (give --model_name_or_path a real model for that)")
    else:
        note = "quick mode: a few steps on a few examples per task: the scores show the harness at work, not numbers comparable to the paper"
    return ["", f"echo {shlex.quote('[pipeline] ' + note)}"]


def render_pipeline(exp: Experiment, config_dir: str, script: Path) -> str:
    q = shlex.quote
    lines = _header(exp) + [f"RUN={q(exp.run_name)}", f"CONFIGS={q(config_dir)}", ""]
    lines += _lock_lines([exp], script) + _tiny_model_lines(exp) + _run_lines(exp) + _quick_note(exp)
    return "\n".join(lines) + "\n"


def seed_config_dir(config_dir: Path, seed: int) -> Path:
    return config_dir / f"seed{seed}"


def render_seeds_pipeline(exp: Experiment, config_dir: Path, script: Path) -> str:
    """The experiment once per seed, one seed after another, then mean, std and CI over the seeds' runs."""
    q = shlex.quote
    runs = exp.seed_runs()
    lines = _header(exp, f", seeds {', '.join(map(str, exp.seeds))} one after another")
    lines += [""] + _lock_lines(runs, script) + _tiny_model_lines(exp)
    for run in runs:
        lines += [f"# seed {run.seed}", f"RUN={q(run.run_name)}", f"CONFIGS={q(str(seed_config_dir(config_dir, run.seed)))}"]
        lines += _run_lines(run) + [""]
    if not exp.method_record.alone:
        single = f" --single {q(exp.single_run)}" if exp.single_run else ""
        lines.append(f"{SCORE_COMMAND} --aggregate {' '.join(q(r.run_name) for r in runs)}{single}")
    return "\n".join(lines + _quick_note(exp)) + "\n"


def write_configs(exp: Experiment, config_dir: Path) -> None:
    for position in exp.positions():
        write_json_atomic(config_dir / f"{task_dir_name(position, exp.tasks[position - 1])}.json", exp.task_arguments(position))


def write_experiment(exp: Experiment, output: Path) -> Path:
    """Write every task's config next to the pipeline (per seed with --seeds) and the pipeline itself."""
    output = output if output.is_absolute() else Path(exp.workdir) / output
    config_dir = output.with_suffix("")
    if exp.seeds:
        for run in exp.seed_runs():
            write_configs(run, seed_config_dir(config_dir, run.seed))
        text = render_seeds_pipeline(exp, config_dir, output)
    else:
        write_configs(exp, config_dir)
        text = render_pipeline(exp, str(config_dir), output)
    write_text_atomic(output, text)
    output.chmod(0o755)
    return output


def main(preset: str, argv: list[str] | None = None) -> int:
    experiment, output = make_experiment(preset, argv)
    try:
        model = check_inputs(experiment)
    except (DataError, UsageError) as err:
        return report_error(f"gen_script_{preset}.py", err)
    path = write_experiment(experiment, output)
    runs = ", ".join(r.run_name for r in experiment.seed_runs()) if experiment.seeds else experiment.run_name
    print(f"model: {model}")
    print(f"{experiment.method}: {len(experiment.positions())} task step(s) of {runs}; run with: bash {path}")
    print(path)
    return 0


# The presets a pipeline can be generated from (`python -m sapt generate PRESET`, gen_script_<preset>.py).
GENERATOR_PRESETS = ("superni_t5", "long_t5", "superni_llama", "long_llama")


def generate(argv: list[str] | None = None) -> int:
    """`python -m sapt generate PRESET [ARGS]`: the command of the top-level gen_script_<preset>.py, for an
    install without a checkout."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: sapt generate {{{','.join(GENERATOR_PRESETS)}}} [--help | ARGS]"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in GENERATOR_PRESETS:
        print(f"{usage}\nsapt generate: error: name a preset first, one of {', '.join(GENERATOR_PRESETS)}", file=sys.stderr)
        return 2
    return main(argv[0], argv[1:])
