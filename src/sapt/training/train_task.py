"""Train and evaluate one task of a continual-learning sequence (docs/methods.md).

First task of an order, then the next one on top of it:

    python -m sapt train_task --model_name_or_path tiny_models/t5 --data_dir ../shared/CL_Benchmark \\
        --task_order task363_sst2_polarity_classification,task875_emotion_classification \\
        --task task363_sst2_polarity_classification --output_dir logs_and_outputs/demo/outputs/1-task363_sst2_polarity_classification
    python -m sapt train_task ... --task task875_emotion_classification \\
        --previous_task_dir logs_and_outputs/demo/outputs/1-task363_sst2_polarity_classification \\
        --gen_data_dir ../shared/generated_data/lora_gen_superni_t5 \\
        --output_dir logs_and_outputs/demo/outputs/2-task875_emotion_classification

Any `Seq2SeqTrainingArguments` flag works too (learning rate, epochs, batch size, bf16, ...).
Writes into --output_dir the task's artifacts (see sapt.checkpoint), `all_results.json`,
`predictions/<task>.jsonl` for every task seen so far, and `task_order.txt` beside it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, HfArgumentParser, Seq2SeqTrainingArguments, set_seed

from ..backbone import load_backbone, load_tokenizer
from ..checkpoint import (
    CheckpointError,
    block_folders,
    load_config,
    restore_model,
    save_routing_mean,
    save_task_artifacts,
)
from ..config import INIT_SCHEME, SaptConfig, release_temperature
from ..methods.registry import get_method, resolve
from ..model import SaptModel
from ..own_block import own_block_loss
from ..reflection import mean_routing
from ..run_files import (
    COMPLETE_FILE,
    RESULTS_FILE,
    ROUTING_FILE,
    TASK_ARGS_FILE,
    TASK_ORDER_FILE,
    run_lock_path,
)
from ..utils.cli import UsageError, report_error
from ..utils.fileio import EXIT_WRITE, WriteError, remove_temporaries, write_json_atomic, write_text_atomic
from ..utils.logs import setup_cli_logging
from ..utils.run_lock import EXIT_LOCKED, RunLocked, run_lock
from ..utils.zero3 import init_deepspeed_comm, is_split
from .collators import Collator
from .data import DataError, benchmark_of
from .method_hooks import FrozenBlockTensors, training_batches
from .metrics import compute_metrics
from .prediction import TestPredictions, decode, generation_settings, predict_tests, write_predictions
from .recipe import TrainingRecipe
from .release_training import training_recipe
from .resume import checkpoint_step, latest_complete_checkpoint, remove_checkpoints
from .task_args import SaptArguments, TaskPlan, launch_defaults, parse_task_arguments, plan, task_args_record
from .task_data import load_arm_targets, load_pseudo_sets, load_training_data
from .router_pretraining import pretrain_router
from .routing_trace import RoutingTrace
from .trainer import KeepBestTrainable, LossTerm, SaptTrainer, StopOnSignal
from .validation import validate_task_inputs

logger = logging.getLogger("sapt")

PROG = "sapt train_task"


@dataclass
class TaskStep:
    """One task step once set up: what training, saving and evaluating share."""

    args: SaptArguments
    training_args: Seq2SeqTrainingArguments
    plan: TaskPlan
    output_dir: Path
    metric: str  # the dev metric that selects the model (the benchmark's)
    tokenizer: object
    model: SaptModel
    earlier_dirs: list[Path]  # folders of the earlier tasks' blocks (oldest first), for the lineage
    dev: object  # the dev set: model selection, and ā over its inputs
    tests: dict  # task -> test set, for every task learned so far
    generation_collator: Collator
    trainer: SaptTrainer
    selection: KeepBestTrainable
    evaluates: bool  # the Trainer evaluates on dev (then a last evaluation closes training)
    train_set: object
    trace: RoutingTrace | None  # the routing trace, for routed methods
    hooks: object | None = None  # the method's hooks around training (sapt.training.method_hooks), if any
    hook_batches: object = None  # () -> the hooks' batches of the task's training data


# ---- the recipe -----------------------------------------------------------------------------------
def run(args: SaptArguments, training_args: Seq2SeqTrainingArguments) -> dict:
    """Check, set up, train, save, evaluate and record one task step; returns all_results.json's content."""
    output_dir = Path(training_args.output_dir)
    first = first_process()
    with run_lock(run_lock_path(output_dir)) if first else nullcontext():  # one writer per run: a second stops here
        task_plan = plan(args)
        validate_task_inputs(args, training_args, task_plan)  # user mistakes end here, before anything is loaded
        if (output_dir / COMPLETE_FILE).is_file():  # finished work is never redone
            logger.info("%s is complete; nothing to do", output_dir)
            return json.loads((output_dir / RESULTS_FILE).read_text())
        if first:  # what a killed run's writes left half-way (the run is locked: nobody else writes here)
            remove_temporaries(output_dir, recursive=True)
            remove_temporaries(output_dir.parent, TASK_ORDER_FILE)
        step = set_up(args, training_args, task_plan)
        train_metrics = train(step)
        save(step)
        results, predictions = evaluate(step)
        record(step, results, predictions, train_metrics)
        return results


def first_process() -> bool:
    """Whether this is the first process of the task step, the one that holds the run's lock (torchrun and
    DeepSpeed set RANK; the others are part of its job)."""
    return os.environ.get("RANK", "0") == "0"


# ---- set up ---------------------------------------------------------------------------------------
def set_up(args: SaptArguments, training_args: Seq2SeqTrainingArguments, task_plan: TaskPlan) -> TaskStep:
    """Seed; the model ready for this task; its data, loss terms, and a Trainer selecting on dev."""
    metric = benchmark_of(args.data_dir, args.task).metric  # the benchmark spec's (sapt.benchmark_spec)
    set_seed(training_args.seed)
    tokenizer, model, earlier_dirs, recipe = load_model(args, training_args, task_plan)
    train_set, dev, tests, probes = load_training_data(args, task_plan, training_args.seed)
    lengths = {"max_source_length": args.max_source_length, "max_target_length": args.max_target_length}
    tokenization = recipe.collator_options(tokenizer)
    is_encoder_decoder = model.sapt_config.is_encoder_decoder
    train_collator = Collator(tokenizer, is_encoder_decoder, **lengths, **tokenization)
    generation_collator = Collator(tokenizer, is_encoder_decoder, **lengths, for_generation=True, **tokenization)
    hooks, hook_batches, hook_parts = start_method_hooks(
        args, model, task_plan, train_set, train_collator, training_args.per_device_train_batch_size
    )
    logger.info(  # after the hooks: a method may freeze part of the new block (InfLoRA's A)
        "%s, task %d/%d %s: %d blocks, %d trainable parameters", args.method, task_plan.position + 1,
        len(task_plan.order), args.task, model.num_blocks, sum(p.numel() for _, p in model.trainable_parameters()),
    )
    terms = training_terms(
        args, model, task_plan, earlier_dirs, recipe.pseudo_collator(train_collator, generation_collator),
        training_args.per_device_train_batch_size, training_args.seed, recipe,
    )
    trainer = recipe.trainer(
        training_args,
        len(train_set),
        model=model,
        train_dataset=train_set,
        eval_dataset=dev,
        data_collator=train_collator,
        generation_collator=generation_collator,
        compute_metrics=dev_scorer(tokenizer, list(dev["target"])),
        regularizers=terms,
        router_learning_rate=args.router_learning_rate,
        generation_kwargs=generation_settings(training_args.generation_max_length, training_args.generation_num_beams),
        checkpoint_parts=hook_parts,
    )
    selection, evaluates = add_model_selection(trainer, args, metric, recipe)
    trace = add_routing_trace(trainer, model, probes, generation_collator, args.routing_trace_every) if probes else None
    return TaskStep(
        args, training_args, task_plan, Path(training_args.output_dir), metric, tokenizer, model, earlier_dirs,
        dev, tests, generation_collator, trainer, selection, evaluates, train_set, trace, hooks, hook_batches,
    )


def load_model(args: SaptArguments, training_args: Seq2SeqTrainingArguments, task_plan: TaskPlan):
    """(tokenizer, model ready to learn this task, earlier blocks' folders, the recipe it trains by)."""
    hf_config = AutoConfig.from_pretrained(args.model_name_or_path)
    tokenizer = load_tokenizer(args.model_name_or_path, bool(hf_config.is_encoder_decoder))
    # Chosen once: the paper's method, or release-exact mode when any of its behaviours is on.
    recipe = training_recipe(args, bool(hf_config.is_encoder_decoder), training_args.bf16)
    recipe.apply_to_arguments(args)
    init_deepspeed_comm(training_args)  # before loading: ZeRO-3 partitions the backbone as it loads
    backbone = load_backbone(args.model_name_or_path)
    model, earlier_dirs = build_model(args, backbone, task_plan, training_args.seed)
    if not task_plan.continues:  # a new router (later tasks carry the query network over)
        recipe.init_query_net(model, hf_config, training_args.seed)
    return tokenizer, model, earlier_dirs, recipe


def build_model(args: SaptArguments, backbone, task_plan: TaskPlan, seed: int) -> tuple[SaptModel, list[Path]]:
    """The model ready to learn this step's task(s), and the folders of the earlier tasks' blocks.
    The new task's block and key are drawn from a stream of (seed, position) of their own."""
    is_encoder_decoder = bool(backbone.config.is_encoder_decoder)
    wanted = SaptConfig.for_backbone(
        backbone,
        args.model_name_or_path,
        target_modules=args.target_modules.split(",") if args.target_modules else [],
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        query_dim=args.query_dim,
        temperature=release_temperature(args.attn_temperature, is_encoder_decoder),
        pool_padding=args.pool_padding,
        method=args.method,
    )
    previous = task_plan.previous_folder()
    if previous is None:
        model = SaptModel(backbone, wanted)
        model.add_task(*task_plan.training_tasks, seed=seed)  # mtl: one block for all its tasks
        return model, []
    found = load_config(previous)  # checked against this run by validate_task_inputs
    model = restore_model(backbone, previous, found)
    earlier_dirs = block_folders(previous, found) if found.block_per_task else []
    if found.init_scheme < INIT_SCHEME:
        logger.warning(
            "%s: its blocks and keys were initialised with scheme %d (every task drew the same values); "
            "this task draws its own, but the folder keeps saying %d", previous, found.init_scheme, found.init_scheme,
        )
    model.add_task(args.task, seed=seed)
    return model, earlier_dirs


def start_method_hooks(args, model, task_plan, train_set, collator, batch_size):
    """The method's hooks (sapt.training.method_hooks), once the new block exists and before the Trainer is
    built: (the hooks, already past before_training, or None; a function giving their batches, made by the
    Trainer's collator; the checkpoint parts that keep what they froze)."""
    hooks = get_method(args.method).make_hooks()

    def hook_batches():
        return training_batches(train_set, collator, batch_size, args.inflora_batches)

    if hooks is None:
        return None, hook_batches, []
    previous = task_plan.previous_folder()
    hooks.before_training(model, hook_batches(), previous, task_plan.position, len(task_plan.order))
    return hooks, hook_batches, [FrozenBlockTensors(model)]


def training_terms(
    args, model, task_plan, earlier_dirs, collator, batch_size, seed, recipe: TrainingRecipe | None = None
):
    """The weighted loss terms added to CE for this method (LossTerm, called as fn(model, position, inputs));
    ARM's as the recipe computes it (default: the paper's)."""
    method = get_method(args.method)
    terms = [method_term(spec, args) for spec in method.loss_terms]  # O-LoRA's, say
    if method.routed and task_plan.position > 0:  # a remedy (docs/router.md): off by default
        terms.append(LossTerm("own_block", args.own_block_weight, lambda model, _, inputs: own_block_loss(model, inputs)))
    pseudo = load_pseudo_sets(args, task_plan, seed)
    if not pseudo:  # no ARM in this step (see sapt.training.task_args.reflects)
        return terms
    means = load_arm_targets(task_plan, earlier_dirs)
    recipe = recipe or TrainingRecipe()
    return terms + recipe.arm_terms(
        args, pseudo, means, collator, batch_size, model.num_blocks, task_plan.pseudo_tasks, seed
    )


def method_term(spec, args) -> LossTerm:
    """A record's loss term (sapt.methods.registry.LossTermSpec): a function of the parameters alone, so the
    step position and the inputs do not matter."""
    loss = resolve(spec.loss)
    return LossTerm(spec.name, getattr(args, spec.weight_argument), lambda model, _, __: loss(model))


def dev_scorer(tokenizer, dev_references: list[str]):
    """compute_metrics for the Trainer's dev evaluation: generations decoded, matched back by index."""

    def dev_metrics(prediction) -> dict:
        texts = decode(tokenizer, prediction.predictions)
        references = [dev_references[i] for i in prediction.label_ids.reshape(-1)]
        return compute_metrics(texts, references)

    return dev_metrics


def add_model_selection(trainer: SaptTrainer, args: SaptArguments, metric: str, recipe: TrainingRecipe):
    """Keep the best-on-dev weights, at the points the recipe evaluates. Returns (the selection, whether
    the Trainer's own evaluation is on)."""
    selection = KeepBestTrainable(trainer.model, metric)
    trainer.add_callback(selection)
    trainer.checkpoint_parts.append(selection)  # the best-on-dev snapshot survives a resume
    evaluates = recipe.add_evaluation(trainer, args)
    return selection, evaluates


def add_routing_trace(trainer: SaptTrainer, model: SaptModel, probes: dict, collator, every: int) -> RoutingTrace:
    """Record the routing of every learned task's first dev inputs while this task trains
    (sapt.training.routing_trace); the probe inputs are collated once, prompts only."""
    batches = {task: collator([dataset[i] for i in range(len(dataset))]) for task, dataset in probes.items()}
    trace = RoutingTrace(
        model, batches, every, Path(trainer.args.output_dir), trainer.term_log, write=trainer.is_world_process_zero()
    )
    trainer.add_callback(trace)
    return trace


# ---- train ----------------------------------------------------------------------------------------
def train(step: TaskStep) -> dict:
    """Train (resuming an interrupted run of this task), then put the best-on-dev weights back and
    freeze them. Returns the Trainer's training statistics."""
    trainer, selection = step.trainer, step.selection
    resume = step.training_args.resume_from_checkpoint
    if resume is None:
        resume = latest_complete_checkpoint(step.output_dir)  # an interrupted run of this task continues
    if resume:
        logger.info("resuming %s from %s", step.args.task, resume)
    if step.trace is not None:
        step.trace.begin(checkpoint_step(resume) if resume else 0)
    if step.args.router_pretrain_steps and step.plan.position > 0 and step.model.router is not None:
        frozen = step.args.freeze_router_while_training
        if not resume or frozen:  # a frozen router is not in the checkpoints: pretrained again (deterministic, seconds)
            pretrain(step, record=not resume)
        if frozen:
            for name, param in step.model.trainable_parameters():
                if name.startswith("router."):
                    param.requires_grad_(False)
    stop = StopOnSignal(save=trainer.writes_checkpoints)
    trainer.add_callback(stop)
    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
    finally:
        stop.uninstall()
    if stop.received is not None:
        signal_name = signal.Signals(stop.received).name
        raise Interrupted(
            f"{step.output_dir}: interrupted by {signal_name} at step {trainer.state.global_step}; "
            + ("a checkpoint was saved: run the same command again to continue" if stop.save
               else "no checkpoint is kept in this set-up: the same command restarts this task"),
            128 + stop.received,
        )
    log_zero3_split(step.model, trainer.args.world_size)
    if step.evaluates and selection.last_eval_step != trainer.state.global_step:
        trainer.evaluate()
    selection.restore()
    step.model.freeze_current_task()
    return train_result.metrics


def pretrain(step: TaskStep, record: bool = True) -> None:
    """Router pretraining (sapt.training.router_pretraining) on this step's routing terms, before the task trains."""
    if step.trace is not None and record:
        step.trace.record(0, 0.0, "before_pretraining")
    args, training_args = step.args, step.training_args
    terms = [term for term in step.trainer.regularizers if term.name in ("own_block", "arm")]
    pretrain_router(
        step.model, terms, step.train_set, step.generation_collator, steps=args.router_pretrain_steps,
        batch_size=training_args.per_device_train_batch_size,
        learning_rate=args.router_learning_rate or training_args.learning_rate,
        weight_decay=training_args.weight_decay, seed=training_args.seed,
    )


def log_zero3_split(model: SaptModel, world_size: int) -> None:
    """Which tensors ZeRO-3 really splits (the rest it keeps whole on every process)."""
    split = [name for name, p in model.named_parameters() if is_split(p)]
    if not split:
        return
    kinds = {"lora_A": ".lora_A", "lora_B": ".lora_B", "router key": "router.key", "query network": "router.query_net."}
    counts = ", ".join(f"{kind} {sum(pattern in n for n in split)}" for kind, pattern in kinds.items())
    logger.info("ZeRO-3 splits %d parameter tensors across %d processes; SAPT's: %s", len(split), world_size, counts)


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ---- save -----------------------------------------------------------------------------------------
def save(step: TaskStep) -> None:
    """The task's artifacts (sapt.checkpoint) and ā, the mean routing over its dev inputs. Every
    process takes part (ZeRO-3 gathers the router, ā is summed over all processes' examples); rank 0
    writes."""
    writer = step.trainer.is_world_process_zero()
    if step.hooks is not None:  # on the trained model; the folder is final only with COMPLETE_FILE (record)
        step.hooks.after_training(
            step.model, step.hook_batches(), step.output_dir, step.plan.position, len(step.plan.order)
        )
    earlier = [os.path.relpath(d, step.output_dir.resolve()) for d in step.earlier_dirs]
    save_task_artifacts(step.model, step.output_dir, earlier, write=writer)
    if step.model.router is not None:
        batch_size = step.training_args.per_device_eval_batch_size
        dev_mean = mean_routing(step.model, step.dev, step.generation_collator, batch_size)
        if writer:
            save_routing_mean(step.output_dir, step.model.tasks, dev_mean)


# ---- evaluate -------------------------------------------------------------------------------------
def evaluate(step: TaskStep) -> tuple[dict, TestPredictions]:
    """Predictions on the test set of every task learned so far (sapt.training.prediction), and the results
    for all_results.json: only what a seed determines, however often the run was interrupted."""
    results = {}
    if step.selection.best_score is not None:
        results[f"best_eval_{step.metric}"] = step.selection.best_score
        results["best_step"] = step.selection.best_step
    step.trainer.compute_metrics = None  # dev scoring only; test predictions are scored below
    predictions = predict_tests(step.trainer, step.model, step.tokenizer, step.tests)
    results.update(predictions.results)
    return results, predictions


def record(step: TaskStep, results: dict, predictions: TestPredictions, train_metrics: dict) -> None:
    """Rank 0 writes the step's records, the completion marker last; the Trainer's checkpoints go."""
    if not step.trainer.is_world_process_zero():
        return
    output_dir, model, task_plan = step.output_dir, step.model, step.plan
    write_predictions(output_dir, predictions.records)
    if model.router is not None:
        write_json_atomic(output_dir / ROUTING_FILE, {"tasks": model.tasks, "mean_weights": predictions.mean_routing})
    write_json_atomic(output_dir / RESULTS_FILE, results)
    # The Trainer's own statistics (times, the loss averaged since the last resume) go beside the results.
    write_json_atomic(output_dir / "train_results.json", train_metrics)
    write_json_atomic(output_dir / TASK_ARGS_FILE, task_args_record(step.args, step.training_args))
    # The release's byte format: no trailing newline (its score.py splits on commas without stripping).
    write_text_atomic(output_dir.parent / TASK_ORDER_FILE, ",".join(task_plan.order))
    # Written last: later tasks accept this folder only when it is there.
    write_json_atomic(
        output_dir / COMPLETE_FILE,
        {"task": step.args.task, "position": task_plan.position + 1, "method": step.args.method, "tasks": model.tasks},
    )
    if not step.args.keep_checkpoints:
        remove_checkpoints(output_dir)


# ---- command line ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    defaults = launch_defaults()
    parser = HfArgumentParser((SaptArguments, Seq2SeqTrainingArguments))
    parser.set_defaults(**defaults)
    argv = sys.argv[1:] if argv is None else argv
    try:  # a command line or one task's JSON config, as the pipelines write them
        sapt_args, training_args = parse_task_arguments(parser, argv, defaults)
        results = run(sapt_args, training_args)
    except (UsageError, DataError, CheckpointError) as err:
        return report_error(PROG, err)
    except Interrupted as stop:
        print(f"{PROG}: {stop.args[0]}", file=sys.stderr)
        return stop.exit_code
    except RunLocked as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_LOCKED
    except WriteError as err:  # a full disk, say: the last complete state is intact, the same command resumes
        print(f"{PROG}: error: {err}; the same command continues once it can write", file=sys.stderr)
        return EXIT_WRITE
    logger.info("done: %s", json.dumps({k: v for k, v in results.items() if k.startswith("predict_")}))
    return 0


def cli() -> None:
    """Command-line entry: progress logging on, then `main`. (Tests call `main` without touching
    the process's logging set-up.)"""
    setup_cli_logging()
    sys.exit(main())
