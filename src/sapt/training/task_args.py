"""The arguments of one task step (`python -m sapt train_task`) and its plan: every input it reads.

`plan(args)` is the one place that says what a step reads: which splits of which tasks (by method and
protocol), whether it builds on the preceding task's folder, and which pseudo sets ARM takes. The
pre-flight checks (sapt.training.validation) check that list; the run (sapt.train_task) loads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..methods.registry import METHOD_NAMES, get_method
from ..utils import rules
from ..utils.cli import UsageError, first_line

# The release's training settings that differ from the Trainer's defaults (docs/reproducing.md, hyper-parameters).
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
    method: str = field(
        default="sapt", metadata={"help": f"{', '.join(METHOD_NAMES)} (sapt.methods.registry).", "choices": list(METHOD_NAMES)}
    )
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
    # Remedies for a router that stops selecting (docs/router.md); all off by default and under --release_exact.
    arm_warmup_steps: int = field(
        default=0, metadata={"help": "SAPT remedy: no ARM term before this optimizer step (the new block learns first)."}
    )
    arm_target_floor: float = field(
        default=0.0, metadata={"help": "SAPT remedy: ARM's targets become (1 - ε)·target + ε/T, ε this value in [0, 1)."}
    )
    own_block_weight: float = field(
        default=0.0,
        metadata={"help": "SAPT remedy: weight μ of -log a_t(x), which sends the current task's training inputs to its own block."},
    )
    router_pretrain_steps: int = field(
        default=0,
        metadata={"help": "SAPT remedy: before each task after the first, this many steps train the router alone on the "
                          "own-block loss and ARM (no LM forward); needs --own_block_weight > 0."},
    )
    freeze_router_while_training: bool = field(
        default=False,
        metadata={"help": "SAPT remedy: with --router_pretrain_steps, the router (query network and key) takes no step while "
                          "the task's block trains: routing is what the pretraining learned."},
    )
    routing_trace_every: int = field(
        default=10, metadata={"help": "SAPT: record the routing trace every N optimizer steps and at each evaluation (0: off)."}
    )
    routing_trace_inputs: int = field(
        default=8, metadata={"help": "SAPT: dev inputs per learned task that the routing trace routes."}
    )
    orthogonal_weight: float = field(default=0.5, metadata={"help": "o_lora: λ1 of Σ|A_new A_oldᵀ|."})
    l2_weight: float = field(default=0.0, metadata={"help": "o_lora: λ2 of ‖new block‖²."})
    replay_ratio: float = field(default=0.02, metadata={"help": "replay: share of each earlier task's training set kept."})
    inflora_batches: int | None = field(
        default=None,
        metadata={"help": "inflora: how many batches of the task's training data (the Trainer's batches, in order) "
                          "give the input statistics that design the block and grow the subspace (default: all)."},
    )
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
    # Release-exact mode: the switches and what each does are in sapt.training.release_exact.ReleaseSwitches.
    release_exact: bool = field(
        default=False,
        metadata={"help": "Train as the official release's code did: every release behaviour of this backbone's "
                          "family (docs/release_exact.md). Default: the method as the paper describes it."},
    )
    release_behaviours: str | None = field(
        default=None,
        metadata={"help": "Release behaviours one by one, comma-separated (names in sapt.training.release_exact); "
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


# The range of every numeric argument (types come from the annotations above). Read by the pre-flight
# checks (sapt.training.validation) and by the generators' --set and a task's JSON config (_override_problem).
ARGUMENT_RULES = {
    **dict.fromkeys(["lora_r", "query_dim", "max_source_length", "max_target_length", "routing_trace_inputs",
                     "release_processes"], rules.integer(at_least=1)),
    **dict.fromkeys(["max_train_samples", "max_eval_samples", "max_predict_samples", "eval_every_epochs",
                     "inflora_batches"], rules.optional(rules.integer(at_least=1))),
    **dict.fromkeys(["arm_warmup_steps", "routing_trace_every", "router_pretrain_steps"], rules.integer(at_least=0)),
    **dict.fromkeys(["lora_alpha", "kl_ratio", "orthogonal_weight", "l2_weight", "own_block_weight"],
                    rules.number(at_least=0)),
    "arm_target_floor": rules.interval(0, 1, "[)"),
    "lora_dropout": rules.interval(0, 1, "[)"),
    "replay_ratio": rules.interval(0, 1, "(]"),
}


# ---- the plan: what one step reads --------------------------------------------------------------
@dataclass(frozen=True)
class SplitRead:
    """One benchmark split file a task step reads, with the cap on its instances."""

    task: str
    split: str  # train, dev or test
    max_samples: int | None = None


@dataclass
class TaskPlan:
    order: list[str]
    position: int  # 0-based place of the current task in the order
    learned: list[str]  # tasks the model knows after this step (what it is tested on)
    continues: bool  # builds on the preceding task's folder
    training_tasks: list[str] = field(default_factory=list)  # their train (and dev) splits train this step
    memory_tasks: list[str] = field(default_factory=list)  # replay: earlier tasks whose training sets give the memory
    dev_carved: bool = False  # clean protocol: dev is held out from train, the dev file is not read
    pseudo_tasks: list[str] = field(default_factory=list)  # ARM: earlier tasks whose pseudo inputs are read
    probe_tasks: list[str] = field(default_factory=list)  # routing trace: tasks whose dev inputs it routes
    previous_task_dir: str | None = None  # as given; read only when the step continues
    max_train_samples: int | None = None
    max_predict_samples: int | None = None

    @property
    def splits(self) -> list[SplitRead]:
        """Every benchmark split file this step reads, in the order the run reads them."""
        reads = []
        for task in self.training_tasks + self.memory_tasks:
            reads.append(SplitRead(task, "train", self.max_train_samples))
            if not self.dev_carved:
                reads.append(SplitRead(task, "dev"))
        for task in self.probe_tasks:  # dev inputs of the tasks learned before: their dev file, or their carve
            read = SplitRead(task, "train", self.max_train_samples) if self.dev_carved else SplitRead(task, "dev")
            if read not in reads:
                reads.append(read)
        return reads + [SplitRead(task, "test", self.max_predict_samples) for task in self.learned]

    def previous_folder(self) -> Path | None:
        """The preceding task's folder this step builds on; None when it starts afresh."""
        if not self.continues:
            return None
        if not self.previous_task_dir:
            raise UsageError(f"--previous_task_dir is required for task {self.position + 1} of the order")
        return Path(self.previous_task_dir)


def reflects(args: SaptArguments, earlier: list[str]) -> bool:
    """Whether ARM runs in this step: a method with reflection (SAPT) after the first task, unless turned off."""
    return get_method(args.method).reflection and bool(earlier) and not args.no_reflection and args.kl_ratio > 0


def traces_routing(args: SaptArguments) -> bool:
    """Whether this step records the routing trace: a routed method, unless turned off."""
    return get_method(args.method).routed and args.routing_trace_every > 0


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
    try:
        method = get_method(args.method)
    except ValueError as err:
        raise UsageError(f"--method: {err}") from None
    learned = [args.task] if method.alone else order[: position + 1]
    earlier = learned[:-1]
    return TaskPlan(
        order, position, learned, method.continues and position > 0,
        training_tasks=list(learned) if method.joint else [args.task],
        memory_tasks=list(earlier) if method.replays else [],
        dev_carved=args.protocol == "clean",
        pseudo_tasks=list(earlier) if reflects(args, earlier) else [],
        probe_tasks=list(learned) if traces_routing(args) else [],
        previous_task_dir=args.previous_task_dir,
        max_train_samples=args.max_train_samples,
        max_predict_samples=args.max_predict_samples,
    )


# ---- the command line ---------------------------------------------------------------------------
def launch_defaults() -> dict:
    """The release's settings; without CUDA, the CPU path (so --bf16 autocasts on the CPU), and gloo
    when launched as several processes (torchrun, accelerate launch)."""
    import torch

    defaults = dict(RELEASE_DEFAULTS)
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            defaults["ddp_backend"] = "gloo"
    return defaults


def _raise_usage(message: str):
    raise UsageError(message)


def parse_task_arguments(parser, argv: list[str], defaults: dict):
    """(SaptArguments, Seq2SeqTrainingArguments) from a command line or from one task's JSON config
    (`[CONFIG.json]`). Every mistake is a UsageError naming the argument or the file."""
    parser.error = _raise_usage  # argparse's own errors (unknown choice, bad number, ...) become one line
    if len(argv) == 1 and argv[0].endswith(".json"):  # one task's config, as the pipelines write them
        path = argv[0]
        try:
            config = json.loads(Path(path).read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise UsageError(f"{path}: cannot read config ({first_line(err)})") from None
        if not isinstance(config, dict):
            raise UsageError(f"{path}: expected a JSON object of train_task arguments, found {type(config).__name__}")
        problem = _override_problem(config, parser.dataclass_types)
        if problem:
            raise UsageError(f"{path}: {problem}")
        try:
            parsed = parser.parse_dict({**defaults, **config})
        except (ValueError, TypeError) as err:
            raise UsageError(f"{path}: {first_line(err)}") from None
    else:
        try:
            parsed = parser.parse_args_into_dataclasses(args=argv)
        except (ValueError, TypeError) as err:  # unused arguments, TrainingArguments' own checks
            raise UsageError(first_line(err)) from None
    return parsed[0], parsed[1]


def _fits(value, hint) -> bool:
    """Whether a JSON value suits a dataclass field's type (only plain types are checked)."""
    if hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    return True  # enums, dicts, lists, literals: left to the parser


def _field_hints(dataclass_types) -> dict:
    hints = {}
    for cls in dataclass_types:
        try:
            resolved = typing.get_type_hints(cls)
        except Exception:  # an annotation that does not evaluate: check names only
            resolved = {}
        for f in fields(cls):
            if f.init:
                hints.setdefault(f.name, resolved.get(f.name, typing.Any))
    return hints


def _kind(hint) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    parts = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return " or ".join(names.get(part, getattr(part, "__name__", str(part))) for part in parts)


def _override_problem(values: dict, dataclass_types) -> str | None:
    """What is wrong with a dict of train_task arguments (unknown name, value of the wrong type), or None."""
    hints = _field_hints(dataclass_types)
    for key, value in values.items():
        shown = f"{key}={json.dumps(value)}"
        if key not in hints:
            return f"{shown}: unknown train_task argument"
        if not _fits(value, hints[key]):
            return f"{shown}: expected {_kind(hints[key])}"
        if key in ARGUMENT_RULES and not ARGUMENT_RULES[key].accepts(value):
            return f"{shown}: expected {ARGUMENT_RULES[key].kind}"
    return None


def check_task_overrides(values: dict) -> None:
    """`--set KEY=VALUE` of the generators: every key a train_task argument, every value of its type.
    Raises argparse.ArgumentTypeError (the generators report it as a one-line error)."""
    if not values:
        return
    from transformers import Seq2SeqTrainingArguments

    problem = _override_problem(values, (SaptArguments, Seq2SeqTrainingArguments))
    if problem:
        raise argparse.ArgumentTypeError(f"--set {problem}")


# Arguments added after task_args.json's keys were fixed: recorded only when set, so the records of the runs
# that do not use them stay as they were (a reader takes the default for a missing key).
RECORDED_WHEN_SET = {"inflora_batches": None}


def task_args_record(args: SaptArguments, training_args) -> dict:
    """The arguments a task step ran with (task_args.json): what a re-evaluation and a report need."""
    record = dataclasses.asdict(args)
    for name, default in RECORDED_WHEN_SET.items():
        if record[name] == default:
            del record[name]
    for name in (
        "seed", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
        "learning_rate", "num_train_epochs", "max_steps", "bf16", "generation_max_length", "generation_num_beams",
    ):
        record[name] = getattr(training_args, name)
    record["world_size"] = training_args.world_size
    return record
