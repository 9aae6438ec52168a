"""Train and evaluate one task of a continual-learning sequence (SPEC 2.3).

First task of an order, then the next one on top of it:

    python -m sapt.train_task --model_name_or_path tiny_models/t5 --data_dir ../shared/CL_Benchmark \\
        --task_order task363_sst2_polarity_classification,task875_emotion_classification \\
        --task task363_sst2_polarity_classification --output_dir logs_and_outputs/demo/outputs/1-task363_sst2_polarity_classification
    python -m sapt.train_task ... --task task875_emotion_classification \\
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
import shutil
import signal
import sys
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import concatenate_datasets
from transformers import AutoConfig, HfArgumentParser, Seq2SeqTrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .backbone import load_backbone, load_tokenizer
from .baselines import l2_loss, orthogonality_loss, replay_memory, union
from .cl_metrics import COMPLETE_FILE, ROUTING_FILE, TASK_ORDER_FILE
from .checkpoint import (
    TASK_ARGS_FILE,
    CheckpointError,
    load_config,
    load_routing_mean,
    read_lineage,
    restore_model,
    save_routing_mean,
    save_task_artifacts,
)
from .collators import Collator
from .config import INIT_SCHEME, METHODS, SaptConfig, release_temperature
from .data import METRIC_OF_BENCHMARK, DataError, benchmark_of, carve_dev, load_pseudo_split, load_split
from .io import write_json_atomic, write_text_atomic
from .logs import setup_cli_logging
from .metrics import compute_metrics
from .model import SaptModel
from .prediction import decode, generation_settings, load_test_sets, predict_tests, write_predictions
from .reflection import AttentiveReflection
from .release_exact import ReleaseMode
from .trainer import EveryNEpochs, KeepBestTrainable, SaptTrainer, StopOnSignal
from .validation import UsageError, parse_task_arguments, validate_task_inputs
from .zero3 import init_deepspeed_comm, is_split

logger = logging.getLogger("sapt")


# The release's training settings that differ from the Trainer's defaults (SPEC 4).
RELEASE_DEFAULTS = {
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "remove_unused_columns": False,
    "report_to": "none",
    "save_strategy": "no",
    "generation_max_length": 50,
    "logging_steps": 10,
}


@dataclass
class SaptArguments:
    model_name_or_path: str = field(metadata={"help": "Backbone: a local folder or a hub name."})
    task_order: str = field(metadata={"help": "All tasks of the sequence, comma-separated."})
    task: str = field(metadata={"help": "The task this process trains (one of --task_order)."})
    method: str = field(default="sapt", metadata={"help": "sapt, o_lora, single, seq_lora, replay or mtl.", "choices": list(METHODS)})
    data_dir: str = field(default="CL_Benchmark", metadata={"help": "Root holding SuperNI/ and Long_Sequence/."})
    previous_task_dir: str | None = field(
        default=None, metadata={"help": "Output folder of the preceding task (required after the first task)."}
    )
    gen_data_dir: str | None = field(
        default=None, metadata={"help": "Pseudo-sample root for ARM, e.g. generated_data/lora_gen_superni_t5."}
    )
    lora_r: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated projection names; default per family (q,v / q_proj,v_proj)."}
    )
    kl_ratio: float = field(default=0.5, metadata={"help": "SAPT: λ, the weight of the ARM (KL) loss."})
    no_reflection: bool = field(default=False, metadata={"help": "SAPT: train without ARM (no pseudo data needed)."})
    attn_temperature: float = field(default=1, metadata={"help": "SAPT: the release's temperature flag (1 -> sqrt(d))."})
    pool_padding: bool = field(
        default=False, metadata={"help": "SAPT: max-pool over padding too, as the release (batch-dependent routing)."}
    )
    query_dim: int = field(default=100, metadata={"help": "SAPT: bottleneck width of the query network."})
    router_learning_rate: float | None = field(default=None, metadata={"help": "SAPT: own learning rate for the query network."})
    orthogonal_weight: float = field(default=0.5, metadata={"help": "o_lora: λ1 of Σ|A_new A_oldᵀ|."})
    l2_weight: float = field(default=0.0, metadata={"help": "o_lora: λ2 of ‖new block‖²."})
    replay_ratio: float = field(default=0.02, metadata={"help": "replay: share of each earlier task's training set kept."})
    single_task: bool = field(default=False, metadata={"help": "The release's flag: same as --method single."})
    protocol: str = field(
        default="paper", metadata={"help": "paper: released dev files; clean: dev carved from train.", "choices": ["paper", "clean"]}
    )
    max_source_length: int = field(default=512, metadata={"help": "Prompt tokens kept."})
    max_target_length: int = field(default=50, metadata={"help": "Label tokens kept."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training examples per task."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on dev examples per task."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Cap on test examples per task."})
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "Keep the Trainer checkpoints once the task is complete (default: remove)."}
    )
    eval_every_epochs: int | None = field(
        default=None, metadata={"help": "Evaluate on dev (and save, if saving is on) every N epochs, as the release."}
    )
    # Release-exact mode: the switches and what each does are in sapt.release_exact.ReleaseSwitches.
    release_exact: bool = field(
        default=False,
        metadata={"help": "Train as the official release's code did: every release behaviour of this backbone's "
                          "family (docs/release_exact.md). Default: the method as the paper describes it."},
    )
    release_behaviours: str | None = field(
        default=None,
        metadata={"help": "Release behaviours one by one, comma-separated (names in sapt.release_exact); "
                          "'-name' removes one from --release_exact."},
    )
    release_processes: int = field(
        default=1,
        metadata={"help": "Release-exact: how many of the release's processes this one stands for (its LLaMA "
                          "scripts ran 4): CE is the mean of their micro-batch means, ARM's batch one's share."},
    )

    def __post_init__(self):
        if self.single_task:
            self.method = "single"


@dataclass
class TaskPlan:
    order: list[str]
    position: int  # 0-based place of the current task in the order
    learned: list[str]  # tasks the model knows after this step (what it is tested on)
    continues: bool  # builds on the preceding task's folder


def plan(args: SaptArguments) -> TaskPlan:
    order = [t.strip() for t in args.task_order.split(",") if t.strip()]
    if not order:
        raise UsageError("--task_order is empty")
    repeated = sorted({t for t in order if order.count(t) > 1})
    if repeated:
        raise UsageError(f"--task_order repeats {', '.join(repeated)}")
    if args.task not in order:
        raise UsageError(f"--task {args.task!r} is not in --task_order")
    position = order.index(args.task)
    if args.method == "single":
        return TaskPlan(order, position, [args.task], continues=False)
    return TaskPlan(order, position, order[: position + 1], continues=args.method != "mtl" and position > 0)


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
    earlier_dirs: list[Path] = []
    if not task_plan.continues:
        model = SaptModel(backbone, wanted)
        model.add_task(*(task_plan.learned if args.method == "mtl" else [args.task]), seed=seed)
        return model, earlier_dirs
    if not args.previous_task_dir:
        raise UsageError(f"--previous_task_dir is required for task {task_plan.position + 1} of the order")
    previous = Path(args.previous_task_dir)
    found = load_config(previous)  # checked against this run by validate_task_inputs
    model = restore_model(backbone, previous, found)
    if found.block_per_task:
        earlier_dirs = [(previous / d).resolve() for d in read_lineage(previous, found)]
    if found.init_scheme < INIT_SCHEME:
        logger.warning(
            "%s: its blocks and keys were initialised with scheme %d (every task drew the same values); "
            "this task draws its own, but the folder keeps saying %d", previous, found.init_scheme, found.init_scheme,
        )
    model.add_task(args.task, seed=seed)
    return model, earlier_dirs


@torch.no_grad()
def mean_routing(model: SaptModel, dataset, collator: Collator, batch_size: int) -> list[float]:
    """Mean routing distribution over the examples of `dataset`, oldest block first.

    Under several processes each takes every world_size-th example and the sums are added up, so
    every process gets the mean over all of them. Shards are padded to one length (the padding
    counts zero) because under ZeRO-3 every process must run the same number of forwards."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = list(range(rank, len(dataset), world))
    length = -(-len(dataset) // world)
    counted = [1.0] * len(shard) + [0.0] * (length - len(shard))
    shard += [0] * (length - len(shard))
    total = torch.zeros(model.num_blocks, dtype=torch.float64, device=model.device)
    for start in range(0, length, batch_size):
        batch = collator([dataset[i] for i in shard[start : start + batch_size]])
        weights = model.routing_weights(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
        keep = torch.tensor(counted[start : start + batch_size], dtype=torch.float64, device=model.device)
        total += (weights.double() * keep[:, None]).sum(0)
    if world > 1:
        dist.all_reduce(total)
    return (total / len(dataset)).float().tolist()


def load_training_data(args: SaptArguments, task_plan: TaskPlan, seed: int):
    """(train, dev, tests) for this step, following the method and the protocol."""

    def train_and_dev(task):
        train = load_split(args.data_dir, task, "train", seed, args.max_train_samples)
        if args.protocol == "clean":
            train, dev = carve_dev(train, seed=seed)
        else:
            dev = load_split(args.data_dir, task, "dev", seed)
        if args.max_eval_samples is not None:
            dev = dev.select(range(min(args.max_eval_samples, len(dev))))
        return train, dev

    if args.method == "mtl":
        pairs = [train_and_dev(task) for task in task_plan.learned]
        train, dev = union([p[0] for p in pairs]), union([p[1] for p in pairs])
    else:
        train, dev = train_and_dev(args.task)
    if args.method == "replay" and task_plan.position > 0:
        earlier = [train_and_dev(task)[0] for task in task_plan.learned[:-1]]
        train = concatenate_datasets([train, replay_memory(earlier, args.replay_ratio, seed)])
    tests = load_test_sets(args.data_dir, task_plan.learned, seed, args.max_predict_samples)
    return train, dev, tests


def training_terms(args, model, task_plan, earlier_dirs, collator, batch_size, seed, release=None, bf16=False):
    """The weighted loss terms added to CE for this method, each called as term(model, StepPosition)."""
    if args.method == "o_lora":  # terms of the parameters alone: the step position does not matter
        return [
            (args.orthogonal_weight, lambda model, _: orthogonality_loss(model)),
            (args.l2_weight, lambda model, _: l2_loss(model)),
        ]
    earlier = task_plan.learned[:-1]
    if args.method != "sapt" or not earlier or args.no_reflection or args.kl_ratio <= 0:
        return []
    if not args.gen_data_dir:
        raise UsageError("--gen_data_dir is required for ARM after the first task (or pass --no_reflection)")
    pseudo = [load_pseudo_split(args.gen_data_dir, t, seed) for t in earlier]
    means = [load_routing_mean(d) for d in earlier_dirs]
    if release is None:
        reflection = AttentiveReflection(pseudo, means, collator, batch_size, model.num_blocks)
        return [(args.kl_ratio, reflection.loss)]
    batch_size = release.arm_batch_size(batch_size)
    options = release.reflection_options([len(rows) for rows in pseudo], batch_size, seed, bf16)
    reflection = AttentiveReflection(pseudo, means, collator, batch_size, model.num_blocks, **options)
    if release.switches.per_backward_steps:  # the release backpropagates each earlier task's KL alone
        return [(args.kl_ratio, term) for term in reflection.task_terms()]
    return [(args.kl_ratio, reflection.loss)]


def log_zero3_split(model: SaptModel, world_size: int) -> None:
    """Which tensors ZeRO-3 really splits (the rest it keeps whole on every process)."""
    split = [name for name, p in model.named_parameters() if is_split(p)]
    if not split:
        return
    kinds = {"lora_A": ".lora_A", "lora_B": ".lora_B", "router key": "router.key", "query network": "router.query_net."}
    counts = ", ".join(f"{kind} {sum(pattern in n for n in split)}" for kind, pattern in kinds.items())
    logger.info("ZeRO-3 splits %d parameter tensors across %d processes; SAPT's: %s", len(split), world_size, counts)


def task_args_record(args: SaptArguments, training_args: Seq2SeqTrainingArguments) -> dict:
    """The arguments a task step ran with: what a re-evaluation and a report need to know."""
    record = dataclasses.asdict(args)
    for name in (
        "seed", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
        "learning_rate", "num_train_epochs", "max_steps", "bf16", "generation_max_length", "generation_num_beams",
    ):
        record[name] = getattr(training_args, name)
    record["world_size"] = training_args.world_size
    return record


def run(args: SaptArguments, training_args: Seq2SeqTrainingArguments) -> dict:
    task_plan = plan(args)
    validate_task_inputs(args, training_args, task_plan)  # user mistakes end here, before anything is loaded
    output_dir = Path(training_args.output_dir)
    if (output_dir / COMPLETE_FILE).is_file():  # finished work is never redone
        logger.info("%s is complete; nothing to do", output_dir)
        return json.loads((output_dir / "all_results.json").read_text())
    metric = METRIC_OF_BENCHMARK[benchmark_of(args.data_dir, args.task)]
    set_seed(training_args.seed)

    hf_config = AutoConfig.from_pretrained(args.model_name_or_path)
    tokenizer = load_tokenizer(args.model_name_or_path, bool(hf_config.is_encoder_decoder))
    release = ReleaseMode.from_arguments(args, bool(hf_config.is_encoder_decoder))  # all off by default
    release.apply_to_arguments(args)
    init_deepspeed_comm(training_args)  # before loading: ZeRO-3 partitions the backbone as it loads
    backbone = load_backbone(args.model_name_or_path)
    model, earlier_dirs = build_model(args, backbone, task_plan, training_args.seed)
    if not task_plan.continues:  # a new router (later tasks carry the query network over)
        release.init_query_net(model, hf_config, training_args.seed)
    is_encoder_decoder = model.sapt_config.is_encoder_decoder
    logger.info(
        "%s, task %d/%d %s: %d blocks, %d trainable parameters", args.method, task_plan.position + 1,
        len(task_plan.order), args.task, model.num_blocks, sum(p.numel() for _, p in model.trainable_parameters()),
    )

    train, dev, tests = load_training_data(args, task_plan, training_args.seed)
    lengths = {"max_source_length": args.max_source_length, "max_target_length": args.max_target_length}
    tokenization = release.collator_options(tokenizer)
    train_collator = Collator(tokenizer, is_encoder_decoder, **lengths, **tokenization)
    generation_collator = Collator(tokenizer, is_encoder_decoder, **lengths, for_generation=True, **tokenization)
    terms = training_terms(
        args, model, task_plan, earlier_dirs, train_collator if release.switches.pseudo_rows else generation_collator,
        training_args.per_device_train_batch_size, training_args.seed, release if release.switches.any else None,
        training_args.bf16,
    )
    release_training, release_evaluation = release.training(training_args, len(train))

    # ---- training with model selection on dev ---------------------------------------------------
    dev_references = list(dev["target"])

    def dev_metrics(prediction) -> dict:
        texts = decode(tokenizer, prediction.predictions)
        references = [dev_references[i] for i in prediction.label_ids.reshape(-1)]
        return compute_metrics(texts, references)

    trainer = SaptTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=train_collator,
        generation_collator=generation_collator,
        compute_metrics=dev_metrics,
        regularizers=terms,
        router_learning_rate=args.router_learning_rate,
        generation_kwargs=generation_settings(training_args.generation_max_length, training_args.generation_num_beams),
        release=release_training,
    )
    selection = KeepBestTrainable(model, metric)
    trainer.add_callback(selection)
    trainer.checkpoint_parts.append(selection)  # the best-on-dev snapshot survives a resume
    if release_evaluation is not None:  # the release's points only, and no final evaluation
        trainer.add_callback(release_evaluation)
    elif args.eval_every_epochs:
        # save_strategy as the trainer left it (it turns checkpoints off under DeepSpeed)
        trainer.add_callback(EveryNEpochs(args.eval_every_epochs, save=training_args.save_strategy != "no"))
    evaluates = release_evaluation is None and (training_args.eval_strategy != "no" or bool(args.eval_every_epochs))
    resume = training_args.resume_from_checkpoint
    if resume is None:
        resume = latest_complete_checkpoint(output_dir)  # an interrupted run of this task continues
    if resume:
        logger.info("resuming %s from %s", args.task, resume)
    stop = StopOnSignal(save=trainer.writes_checkpoints)
    trainer.add_callback(stop)
    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
    finally:
        stop.uninstall()
    if stop.received is not None:
        raise Interrupted(
            f"{output_dir}: interrupted by {signal.Signals(stop.received).name} at step {trainer.state.global_step}; "
            + ("a checkpoint was saved: run the same command again to continue" if stop.save
               else "no checkpoint is kept in this set-up: the same command restarts this task"),
            128 + stop.received,
        )
    log_zero3_split(model, trainer.args.world_size)
    if evaluates and selection.last_eval_step != trainer.state.global_step:
        trainer.evaluate()
    selection.restore()
    model.freeze_current_task()

    # ---- artifacts, ā, predictions --------------------------------------------------------------
    # all_results.json holds only what a seed determines, however often the run was interrupted;
    # the Trainer's own statistics (times, the loss averaged since the last resume) go beside it.
    results = {}
    if selection.best_score is not None:
        results[f"best_eval_{metric}"] = selection.best_score
        results["best_step"] = selection.best_step
    eval_batch = training_args.per_device_eval_batch_size
    # Every process takes part (ZeRO-3 gathers the router, ā is summed over all processes' examples);
    # rank 0 writes.
    writer = trainer.is_world_process_zero()
    earlier = [os.path.relpath(d, output_dir.resolve()) for d in earlier_dirs]
    save_task_artifacts(model, output_dir, earlier, write=writer)
    if model.router is not None:
        dev_mean = mean_routing(model, dev, generation_collator, eval_batch)
        if writer:
            save_routing_mean(output_dir, model.tasks, dev_mean)

    trainer.compute_metrics = None  # dev scoring only; test predictions are scored below
    predictions = predict_tests(trainer, model, tokenizer, tests)
    results.update(predictions.results)

    if trainer.is_world_process_zero():
        write_predictions(output_dir, predictions.records)
        if model.router is not None:
            write_json_atomic(
                output_dir / ROUTING_FILE, {"tasks": model.tasks, "mean_weights": predictions.mean_routing}
            )
        write_json_atomic(output_dir / "all_results.json", results)
        write_json_atomic(output_dir / "train_results.json", train_result.metrics)
        write_json_atomic(output_dir / TASK_ARGS_FILE, task_args_record(args, training_args))
        # The release's byte format: no trailing newline (its score.py splits on commas without stripping).
        write_text_atomic(output_dir.parent / TASK_ORDER_FILE, ",".join(task_plan.order))
        # Written last: later tasks accept this folder only when it is there.
        write_json_atomic(
            output_dir / COMPLETE_FILE,
            {"task": args.task, "position": task_plan.position + 1, "method": args.method, "tasks": model.tasks},
        )
        if not args.keep_checkpoints:
            for checkpoint in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
                shutil.rmtree(checkpoint, ignore_errors=True)
    return results


def latest_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest Trainer checkpoint whose trainer_state.json (written last) exists; a folder a kill
    cut short is removed rather than resumed from."""
    if not output_dir.is_dir():
        return None
    numbered = []
    for folder in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = folder.name.rsplit("-", 1)[-1]
        if not step.isdigit():
            continue
        if (folder / TRAINER_STATE_NAME).is_file():
            numbered.append((int(step), folder))
        else:
            logger.warning("removing %s: its writing was interrupted", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return str(max(numbered)[1]) if numbered else None


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def launch_defaults() -> dict:
    """The release's settings; without CUDA, the CPU path (so --bf16 autocasts on the CPU), and gloo
    when launched as several processes (torchrun, accelerate launch)."""
    defaults = dict(RELEASE_DEFAULTS)
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            defaults["ddp_backend"] = "gloo"
    return defaults


def main(argv: list[str] | None = None) -> int:
    defaults = launch_defaults()
    parser = HfArgumentParser((SaptArguments, Seq2SeqTrainingArguments))
    parser.set_defaults(**defaults)
    argv = sys.argv[1:] if argv is None else argv
    try:  # a command line or one task's JSON config, as the pipelines write them
        sapt_args, training_args = parse_task_arguments(parser, argv, defaults)
    except UsageError as err:
        print(f"sapt.train_task: error: {err}", file=sys.stderr)
        return 2
    try:
        results = run(sapt_args, training_args)
    except (UsageError, DataError, CheckpointError) as err:
        print(f"sapt.train_task: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"sapt.train_task: {stop.args[0]}", file=sys.stderr)
        return stop.exit_code
    logger.info("done: %s", {k: v for k, v in results.items() if k.startswith("predict_")})
    return 0


def cli() -> None:
    """Command-line entry: progress logging on, then `main`. (Tests call `main` without touching
    the process's logging set-up.)"""
    setup_cli_logging()
    sys.exit(main())


if __name__ == "__main__":
    cli()
