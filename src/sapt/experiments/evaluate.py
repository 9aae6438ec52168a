"""Re-evaluate a finished run with its routing replaced: the routing analysis and oracle bounds.

    python -m sapt evaluate logs_and_outputs/RUN --routing oracle
    python -m sapt evaluate bench_runs/cl_real/logs_and_outputs/cl_real_sapt --routing mean \\
        --config bench_runs/cl_real/pipelines/cl_real_sapt      # folders written before task_args.json

--routing learned   the router's own weights: reproduces the run's stored results
          oracle    each input one-hot on its own task's block: an upper bound that reads the task id
          uniform   equal weights on every block
          mean | ā  every input of task j gets task j's stored mean routing ā_j, zero on newer blocks
                    (reads the task id too)

Every row i (the model after task i) is evaluated as train_task evaluated it (same test inputs, batch
size, lengths, decoding; sapt.training.prediction), from the settings in `<i>-<task>/task_args.json`, or for
older folders from the pipeline's step config `--config DIR/<i>-<task>.json`; --model_name_or_path,
--data_dir, --max_predict_samples and --batch_size override them. The results go to
RUN/routing/<routing>/outputs/ in a run's layout (task_order.txt, <i>-<task>/all_results.json,
predictions/), so `score.py` scores it and `score.py --compare` sets it beside the run. A row already
written is not redone. Methods without a router (o_lora, seq_lora, ...) take only --routing learned.
Mistakes end in one line `sapt.evaluate: error: ...`, exit 2, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, HfArgumentParser, Seq2SeqTrainingArguments, set_seed

from ..backbone import load_backbone, load_tokenizer
from ..checkpoint import CheckpointError, load_config, load_routing_mean, restore_model
from ..run_files import COMPLETE_FILE, RESULTS_FILE, ROUTING_FILE, TASK_ARGS_FILE, TASK_ORDER_FILE, task_dir_name
from ..training.collators import Collator
from ..training.data import DataError
from ..training.prediction import generation_settings, load_test_sets, predict_tests, write_predictions
from ..training.release_training import ReleaseMode
from ..training.task_args import SaptArguments, launch_defaults, parse_task_arguments, plan, task_args_record
from ..training.trainer import SaptTrainer
from ..utils.cli import OneLineArgumentParser, UsageError, first_line, report_error
from ..utils.fileio import read_json, write_json_atomic, write_text_atomic
from ..utils.logs import setup_cli_logging, stdout_kept_for_results
from .cl_metrics import ScoreError, read_task_order
from .routing_analysis import EVALUATION_FILE, ROUTINGS, SHORT_LABELS, canonical_routing

logger = logging.getLogger("sapt")

PROG = "sapt evaluate"
EVALUATIONS_DIR = "routing"  # RUN/routing/<routing>/outputs
# Settings a command line may override, by their name in task_args.json.
OVERRIDABLE = ("model_name_or_path", "data_dir", "max_predict_samples", "per_device_eval_batch_size")
# Settings a row cannot be evaluated without (the rest have train_task's defaults).
REQUIRED_SETTINGS = ("model_name_or_path", "task_order", "task", "seed", "per_device_eval_batch_size")


class EvaluateError(ValueError):
    """A run, a routing or a setting that cannot be evaluated (one line naming the file or the flag)."""


@dataclass
class Row:
    """One task folder of the run and what its re-evaluation needs."""

    position: int  # 1-based
    task: str
    folder: Path
    settings: dict  # task_args.json's content, overrides applied
    tests: dict  # task -> its test set, for the tasks its model is tested on
    replaced: dict | None  # {task: routing weights, oldest block first}; None for learned routing


# ---- locating the run and its settings -----------------------------------------------------------
def locate_run(run: str | Path) -> tuple[Path, Path]:
    """(run folder, its outputs folder) for a run folder or its outputs folder."""
    path = Path(run)
    if (path / "outputs" / TASK_ORDER_FILE).is_file():
        return path, path / "outputs"
    if (path / TASK_ORDER_FILE).is_file() and path.name == "outputs":
        return path.parent, path
    raise EvaluateError(f"{path}: no run here (no outputs/{TASK_ORDER_FILE})")


def finished_rows(outputs: Path, order: list[str]) -> list[tuple[int, str, Path]]:
    rows = [
        (position, task, outputs / task_dir_name(position, task))
        for position, task in enumerate(order, start=1)
        if (outputs / task_dir_name(position, task) / COMPLETE_FILE).is_file()
    ]
    if not rows:
        raise EvaluateError(f"{outputs}: no finished task folder (none holds {COMPLETE_FILE})")
    return rows


def settings_from_step_config(path: Path) -> dict:
    """task_args.json's content rebuilt from a pipeline step config, with train_task's defaults."""
    if not path.is_file():
        raise EvaluateError(f"{path}: step config is missing")
    defaults = launch_defaults()
    parser = HfArgumentParser((SaptArguments, Seq2SeqTrainingArguments))
    parser.set_defaults(**defaults)
    args, training_args = parse_task_arguments(parser, [str(path)], defaults)
    return task_args_record(args, training_args)


def row_settings(folder: Path, position: int, task: str, config_dir: Path | None, overrides: dict) -> dict:
    recorded = folder / TASK_ARGS_FILE
    if recorded.is_file():
        settings, source = read_json(recorded, EvaluateError, "task arguments file"), recorded
        if not isinstance(settings, dict):
            raise EvaluateError(f"{recorded}: expected a JSON object of train_task arguments")
    elif config_dir is not None:
        source = config_dir / f"{task_dir_name(position, task)}.json"
        settings = settings_from_step_config(source)
    else:
        raise EvaluateError(
            f"{folder}: no {TASK_ARGS_FILE} (written before it was recorded): pass --config DIR, "
            "the folder of the pipeline's step configs <i>-<task>.json"
        )
    if settings.get("task") != task:
        raise EvaluateError(f"{source}: trains task {settings.get('task')!r}, but the folder is {folder.name}")
    missing = [name for name in REQUIRED_SETTINGS if name not in settings]
    if missing:
        raise EvaluateError(f"{source}: lacks {', '.join(missing)}")
    return {**settings, **{k: v for k, v in overrides.items() if v is not None}}


def sapt_arguments(settings: dict) -> SaptArguments:
    names = {f.name for f in dataclasses.fields(SaptArguments)}
    return SaptArguments(**{k: v for k, v in settings.items() if k in names})


# ---- the routing of each test set ----------------------------------------------------------------
def replaced_routing(routing: str, tasks: list[str], tests: list[str], outputs: Path, order: list[str]):
    """{test task: weights over the blocks of `tasks` (oldest first)}; None keeps the router's."""
    size = len(tasks)
    if routing == "learned":
        return None
    if routing == "uniform":
        return {test: [1.0 / size] * size for test in tests}
    if routing == "oracle":
        return {test: [float(block == tasks.index(test)) for block in range(size)] for test in tests}
    weights = {}
    for test in tests:  # mean: ā of the test's own task, stored in that task's folder
        mean = load_routing_mean(outputs / task_dir_name(order.index(test) + 1, test))
        if len(mean) > size:
            raise EvaluateError(f"{outputs}: ā of {test} has {len(mean)} weights for {size} blocks")
        weights[test] = mean + [0.0] * (size - len(mean))
    return weights


def plan_rows(run_dir: Path, outputs: Path, routing: str, config_dir: Path | None, overrides: dict) -> list[Row]:
    """Every finished row and what it needs, checked before anything is loaded or written."""
    order = read_task_order(outputs)
    rows = []
    for position, task, folder in finished_rows(outputs, order):
        config = load_config(folder)
        if routing != "learned" and not config.routed:
            raise EvaluateError(
                f"{run_dir}: method {config.method!r} has no router; only --routing learned applies to it"
            )
        settings = row_settings(folder, position, task, config_dir, overrides)
        args = sapt_arguments(settings)
        check_model(args.model_name_or_path, folder)
        tested = plan(args).learned
        if [t for t in tested if t not in order]:
            raise EvaluateError(f"{folder}: tested on tasks outside {outputs / TASK_ORDER_FILE}")
        tests = load_test_sets(args.data_dir, tested, settings["seed"], args.max_predict_samples)
        replaced = replaced_routing(routing, list(config.tasks), tested, outputs, order)
        rows.append(Row(position, task, folder, settings, tests, replaced))
    return rows


def check_model(model_path: str, folder: Path) -> None:
    try:
        AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise EvaluateError(
            f"{folder}: its backbone {model_path!r} cannot be loaded ({first_line(err)}); pass --model_name_or_path"
        ) from None


# ---- evaluating one row --------------------------------------------------------------------------
def prediction_trainer(model, tokenizer, settings: dict, output_dir: Path) -> SaptTrainer:
    """A SaptTrainer that only predicts, set up as the task step's trainer was for its test sets."""
    args = sapt_arguments(settings)
    values = {
        **launch_defaults(),
        "output_dir": str(output_dir),
        "per_device_eval_batch_size": settings["per_device_eval_batch_size"],
        "bf16": bool(settings.get("bf16", False)),
        "seed": settings["seed"],
    }
    is_encoder_decoder = model.sapt_config.is_encoder_decoder
    tokenization = ReleaseMode.from_arguments(args, is_encoder_decoder).collator_options(tokenizer)  # as trained
    collator = Collator(
        tokenizer, is_encoder_decoder, max_source_length=args.max_source_length,
        max_target_length=args.max_target_length, for_generation=True, **tokenization,
    )
    decoding = generation_settings(settings.get("generation_max_length"), settings.get("generation_num_beams"))
    return SaptTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(**values),
        data_collator=collator,
        generation_collator=collator,
        generation_kwargs=decoding,
    )


def evaluate_row(row: Row, target: Path) -> None:
    settings = row.settings
    set_seed(settings["seed"])
    model_path = settings["model_name_or_path"]
    tokenizer = load_tokenizer(model_path, bool(AutoConfig.from_pretrained(model_path).is_encoder_decoder))
    model = restore_model(load_backbone(model_path), row.folder).eval()
    trainer = prediction_trainer(model, tokenizer, settings, target)
    if settings.get("world_size", 1) != trainer.args.world_size:  # other batches, other padding
        logger.warning(
            "%s ran under %s processes, this evaluation under %d: learned routing may differ from the stored "
            "results in the last digits", row.folder, settings.get("world_size"), trainer.args.world_size,
        )
    predictions = predict_tests(trainer, model, tokenizer, row.tests, row.replaced)
    if trainer.is_world_process_zero():
        write_predictions(target, predictions.records)
        if predictions.mean_routing:
            means = {"tasks": model.tasks, "mean_weights": predictions.mean_routing}
            write_json_atomic(target / ROUTING_FILE, means)
        write_json_atomic(target / TASK_ARGS_FILE, settings)
        write_json_atomic(target / RESULTS_FILE, predictions.results)  # last: the row is complete


def already_evaluated(row: Row, target: Path) -> bool:
    """A row written by an earlier call is kept, if it was made with the same settings."""
    if not (target / RESULTS_FILE).is_file():
        return False
    stored = read_json(target / TASK_ARGS_FILE, EvaluateError, "task arguments file")
    if stored != json.loads(json.dumps(row.settings)):
        raise EvaluateError(f"{target}: evaluated with other settings; remove that folder to evaluate it again")
    return True


# ---- the command ---------------------------------------------------------------------------------
def evaluate_run(
    run: str | Path, routing: str, *, config_dir: str | Path | None = None, overrides: dict | None = None
) -> Path:
    """Evaluate every finished row of `run` with `routing` (learned, oracle, uniform, mean or ā); return
    the outputs folder written (RUN/routing/<routing>/outputs). `overrides` maps names of OVERRIDABLE
    to values that replace the recorded settings."""
    try:
        routing = canonical_routing(routing)
    except ValueError as err:
        raise EvaluateError(str(err)) from None
    unknown = sorted(set(overrides or {}) - set(OVERRIDABLE))
    if unknown:
        raise EvaluateError(f"cannot override {', '.join(unknown)}; only {', '.join(OVERRIDABLE)}")
    run_dir, outputs = locate_run(run)
    config_dir = Path(config_dir) if config_dir is not None else None
    if config_dir is not None and not config_dir.is_dir():
        raise EvaluateError(f"{config_dir}: --config folder does not exist")
    for name in ("max_predict_samples", "per_device_eval_batch_size"):
        value = (overrides or {}).get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise EvaluateError(f"{name} {value!r}: expected an integer of at least 1")
    rows = plan_rows(run_dir, outputs, routing, config_dir, overrides or {})
    order = read_task_order(outputs)

    target_outputs = run_dir / EVALUATIONS_DIR / routing / "outputs"
    for row in rows:
        target = target_outputs / row.folder.name
        progress = f"{SHORT_LABELS[routing]}, row {row.position}/{len(order)} (after {row.task})"
        if already_evaluated(row, target):
            logger.info("%s: already evaluated", progress)
            continue
        logger.info("%s: %d test sets", progress, len(row.tests))
        evaluate_row(row, target)
        if int(os.environ.get("RANK", "0")) == 0:  # once a row is written, so a failure before leaves nothing
            write_text_atomic(target_outputs / TASK_ORDER_FILE, ",".join(order))  # the release's bytes: no newline
            record = {"routing": routing, "run_name": run_dir.name, "run_outputs": str(outputs)}
            write_json_atomic(target_outputs / EVALUATION_FILE, record)
    return target_outputs


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description="Re-evaluate a finished run with its routing replaced.")
    parser.add_argument("run", metavar="RUN", help="a run folder (holding outputs/) or its outputs folder")
    parser.add_argument("--routing", required=True, help=f"{', '.join(ROUTINGS)} (ā = mean)")
    parser.add_argument(
        "--config", metavar="DIR", help="the pipeline's step configs <i>-<task>.json (folders without task_args.json)"
    )
    parser.add_argument("--model_name_or_path", help="backbone to load instead of the recorded one")
    parser.add_argument("--data_dir", help="benchmark root instead of the recorded one")
    parser.add_argument("--max_predict_samples", type=int, help="test inputs per task instead of the recorded number")
    parser.add_argument("--batch_size", type=int, help="evaluation batch size instead of the recorded one")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        "model_name_or_path": args.model_name_or_path,
        "data_dir": args.data_dir,
        "max_predict_samples": args.max_predict_samples,
        "per_device_eval_batch_size": args.batch_size,
    }
    try:
        with stdout_kept_for_results():
            written = evaluate_run(args.run, args.routing, config_dir=args.config, overrides=overrides)
    except (EvaluateError, UsageError, CheckpointError, DataError, ScoreError) as err:
        return report_error(PROG, err)
    print(written)
    return 0


def cli() -> None:
    setup_cli_logging()
    sys.exit(main())
