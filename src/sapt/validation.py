"""Checks of a task's inputs before anything is loaded, trained or written.

A user mistake (a missing file, a malformed split, an earlier task made with other settings, missing
pseudo data, a bad argument) must end in one line that names the file or the argument, exit status 2,
and no partial output, and it must cost seconds, not a training run. `validate_task_inputs` runs at the
start of `sapt.train_task.run`: it reads every split the task will use, the earlier task's folder and
the pseudo data, and looks at the backbone's config (not its weights). The helpers at the bottom give
the command lines (train_task and the gen_script_* generators) one-line argument errors.
"""

from __future__ import annotations

import argparse
import json
import math
import types
import typing
from dataclasses import fields
from pathlib import Path

from safetensors import safe_open

from .checkpoint import (
    BLOCK_FILE,
    ROUTER_FILE,
    ROUTING_MEAN_FILE,
    CheckpointError,
    load_config,
    load_routing_mean,
    read_lineage,
)
from .cl_metrics import COMPLETE_FILE
from .config import default_target_modules
from .data import BENCHMARKS, DataError, carve_dev, find_task, load_pseudo_split, load_split



class UsageError(ValueError):
    """A mistake in the command line (reported in one line, exit status 2)."""


# ---- command lines --------------------------------------------------------------------------------
class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): `prog: error: message (see --help)`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _raise_usage(message: str):
    raise UsageError(message)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def parse_task_arguments(parser, argv: list[str], defaults: dict):
    """(SaptArguments, Seq2SeqTrainingArguments) from a command line or from one task's JSON config
    (`[CONFIG.json]`). Every mistake is a UsageError naming the argument or the file."""
    parser.error = _raise_usage  # argparse's own errors (unknown choice, bad number, ...) become one line
    if len(argv) == 1 and argv[0].endswith(".json"):  # one task's config, as the pipelines write them
        path = argv[0]
        try:
            config = json.loads(Path(path).read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise UsageError(f"{path}: cannot read config ({_first_line(err)})") from None
        if not isinstance(config, dict):
            raise UsageError(f"{path}: expected a JSON object of train_task arguments, found {type(config).__name__}")
        problem = _override_problem(config, parser.dataclass_types)
        if problem:
            raise UsageError(f"{path}: {problem}")
        try:
            parsed = parser.parse_dict({**defaults, **config})
        except (ValueError, TypeError) as err:
            raise UsageError(f"{path}: {_first_line(err)}") from None
    else:
        try:
            parsed = parser.parse_args_into_dataclasses(args=argv)
        except (ValueError, TypeError) as err:  # unused arguments, TrainingArguments' own checks
            raise UsageError(_first_line(err)) from None
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
    return None


def check_task_overrides(values: dict) -> None:
    """`--set KEY=VALUE` of the generators: every key a train_task argument, every value of its type.
    Raises argparse.ArgumentTypeError (the generators report it as a one-line error)."""
    if not values:
        return
    from transformers import Seq2SeqTrainingArguments

    from .train_task import SaptArguments

    problem = _override_problem(values, (SaptArguments, Seq2SeqTrainingArguments))
    if problem:
        raise argparse.ArgumentTypeError(f"--set {problem}")


# ---- a task's inputs ----------------------------------------------------------------------------
def _check_numbers(args) -> None:
    positive = ["lora_r", "query_dim", "max_source_length", "max_target_length"]
    optional_positive = ["max_train_samples", "max_eval_samples", "max_predict_samples", "eval_every_epochs"]
    for name in positive + optional_positive:
        value = getattr(args, name)
        if value is None and name in optional_positive:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"--{name} {value!r}: expected an integer of at least 1")
    for name in ("lora_alpha", "kl_ratio", "orthogonal_weight", "l2_weight"):
        value = getattr(args, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise UsageError(f"--{name} {value!r}: expected a finite number of at least 0")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--lora_dropout {args.lora_dropout!r}: expected a number in [0, 1)")
    if not 0 < args.replay_ratio <= 1:
        raise UsageError(f"--replay_ratio {args.replay_ratio!r}: expected a number in (0, 1]")
    if args.target_modules is not None and not all(m.strip() for m in args.target_modules.split(",")):
        raise UsageError(f"--target_modules {args.target_modules!r}: expected comma-separated projection names")


def _check_data(args, task_plan, seed: int) -> None:
    """Every task of the order exists; every split this step reads is there and well-formed."""
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data_dir {data_dir}: data folder does not exist")
    for task in task_plan.order:
        try:
            find_task(data_dir, task)
        except DataError:
            raise DataError(
                f"--task_order: unknown task {task!r} (no folder {data_dir}/{{{','.join(BENCHMARKS)}}}/{task})"
            ) from None
    learned = list(task_plan.learned)
    joint = args.method == "mtl" or (args.method == "replay" and task_plan.position > 0)
    for task in learned if joint else [args.task]:  # as train_task.load_training_data reads them
        train = load_split(data_dir, task, "train", seed, args.max_train_samples)
        if args.protocol == "clean":
            carve_dev(train, seed=seed)
        else:
            load_split(data_dir, task, "dev", seed)
    for task in learned:
        load_split(data_dir, task, "test", seed, args.max_predict_samples)


def _backbone_config(name_or_path: str):
    """The backbone's config alone (no weights are loaded)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"--model_name_or_path {name_or_path}: cannot load the backbone's config ({_first_line(err)})") from None


def _backbone_signature(config) -> tuple[str, int | None]:
    """(model_type, width) of a backbone config."""
    try:
        text = config.get_text_config()
    except Exception:
        text = config
    hidden = getattr(text, "hidden_size", None)
    return config.model_type, hidden if isinstance(hidden, int) else None


# Files any of which holds a tokenizer's vocabulary (fast, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def _check_backbone_fits(name_or_path: str, config, target_modules: str | None) -> None:
    """The folder has a tokenizer, and the family has the projections SAPT wraps. The model is built
    on the meta device from its config: nothing is allocated and no weight is read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.models.auto.auto_factory import _get_model_class

    from .model import target_linears

    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer of the family's class without complaint
        raise UsageError(
            f"--model_name_or_path {name_or_path}: no usable tokenizer there (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer into the folder"
        )
    try:
        AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--model_name_or_path {name_or_path}: no usable tokenizer there ({_first_line(err)})") from None
    model_type = config.model_type
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    try:
        # The class itself, not `auto.from_config`: under a ZeRO-3 config, from_config would start
        # DeepSpeed's partitioning (and its process group) before the entry point sets it up.
        model_class = _get_model_class(config, auto._model_mapping)
        with torch.device("meta"):
            skeleton = model_class(config)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--model_name_or_path {name_or_path}: cannot build a {model_type} model ({_first_line(err)})") from None
    targets = target_modules.split(",") if target_modules else default_target_modules(model_type)
    found = {name.rsplit(".", 1)[-1] for name, _ in target_linears(skeleton, targets)}
    missing = [t for t in targets if t not in found]
    if missing:
        raise UsageError(
            f"--model_name_or_path {name_or_path}: a {model_type} model has no nn.Linear named {', '.join(missing)} "
            f"for SAPT's blocks; pass --target_modules with its attention projections"
        )


def _check_tensor_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # noqa: BLE001 - any failure to parse the header is a damaged file
        raise CheckpointError(f"{path}: unreadable safetensors file ({_first_line(err)})") from None


def _check_previous(args, task_plan, model_type: str, hidden: int | None, output_dir: str | None) -> list[Path]:
    """The earlier task's folder: there, finished, made for this backbone and these settings. Returns
    the folders of the earlier blocks (oldest first)."""
    if not task_plan.continues:
        return []
    if not args.previous_task_dir:
        raise UsageError(f"--previous_task_dir is required for task {task_plan.position + 1} of the order")
    folder = Path(args.previous_task_dir)
    if not folder.is_dir():
        raise CheckpointError(f"--previous_task_dir {folder}: folder does not exist")
    if not (folder / COMPLETE_FILE).is_file():
        raise CheckpointError(f"{folder}: task did not finish (no {COMPLETE_FILE}); run it again first")
    found = load_config(folder)
    earlier = list(task_plan.learned[:-1])
    if found.tasks != earlier:
        raise CheckpointError(f"{folder}: holds tasks {found.tasks}, but the order needs {earlier} before this task")
    wanted = {
        "method": args.method,
        "model_type": model_type,
        "hidden_size": hidden,
        "target_modules": args.target_modules.split(",") if args.target_modules else default_target_modules(model_type),
        "r": args.lora_r,
    }
    for name, value in wanted.items():
        if value is not None and getattr(found, name) != value:
            what = "backbone" if name in ("model_type", "hidden_size") else "run"
            raise CheckpointError(
                f"{folder}: made with {name}={getattr(found, name)!r}, this {what} has {value!r} "
                f"(--previous_task_dir must come from the same backbone and settings)"
            )
    block_dirs = [(folder / d).resolve() for d in read_lineage(folder, found)]
    for block_dir in block_dirs:
        _check_tensor_file(block_dir / BLOCK_FILE)
    if found.routed:
        _check_tensor_file(folder / ROUTER_FILE)
    if output_dir and Path(output_dir).resolve() in {folder.resolve(), *block_dirs}:
        raise UsageError(f"--output_dir {output_dir}: is an earlier task's folder (it would be overwritten)")
    return block_dirs if found.block_per_task else []


def _check_reflection(args, task_plan, earlier_dirs: list[Path], seed: int) -> None:
    """ARM needs pseudo inputs of every earlier task and ā of every earlier task."""
    earlier = list(task_plan.learned[:-1])
    if args.method != "sapt" or not earlier or args.no_reflection or args.kl_ratio <= 0:
        return
    hint = f"pass --no_reflection to train {args.task} without ARM (no pseudo data needed)"
    if not args.gen_data_dir:
        raise UsageError(f"--gen_data_dir is required for ARM after the first task (or {hint})")
    gen_dir = Path(args.gen_data_dir)
    if not gen_dir.is_dir():
        raise DataError(f"--gen_data_dir {gen_dir}: pseudo data folder does not exist; {hint}")
    for task in earlier:
        try:
            find_task(gen_dir, task)
        except DataError:
            raise DataError(
                f"{gen_dir}: no pseudo data for earlier task {task!r} "
                f"(expected {gen_dir}/{{{','.join(BENCHMARKS)}}}/{task}/train.json); {hint}"
            ) from None
        try:
            load_pseudo_split(gen_dir, task, seed)
        except DataError as err:
            raise DataError(f"{err}; fix the pseudo data or {hint}") from None
    for position, task_dir in enumerate(earlier_dirs, start=1):
        weights = load_routing_mean(task_dir)
        if len(weights) != position:
            raise CheckpointError(
                f"{task_dir / ROUTING_MEAN_FILE}: {len(weights)} routing weights, expected {position} for task {position}"
            )


def _check_deepspeed(args, training_args) -> None:
    """O-LoRA's terms read the blocks outside any module's forward, where ZeRO-3 leaves them partitioned."""
    ds_config = getattr(training_args, "hf_deepspeed_config", None)
    uses_blocks = args.method == "o_lora" and (args.orthogonal_weight or args.l2_weight)
    if ds_config is not None and ds_config.is_zero3() and uses_blocks:
        raise UsageError(
            f"--deepspeed {training_args.deepspeed}: o_lora's regularizers need whole blocks; use ZeRO-2 (zero2.json)"
        )


def validate_task_inputs(args, training_args, task_plan) -> None:
    """Check everything this step reads, cheapest first; raise UsageError, DataError or CheckpointError."""
    _check_numbers(args)
    _check_deepspeed(args, training_args)
    _check_data(args, task_plan, training_args.seed)
    config = _backbone_config(args.model_name_or_path)
    model_type, hidden = _backbone_signature(config)
    _check_backbone_fits(args.model_name_or_path, config, args.target_modules)
    from .release_exact import check_release_arguments  # it imports UsageError from here

    check_release_arguments(args, training_args, bool(config.is_encoder_decoder))
    earlier_dirs = _check_previous(args, task_plan, model_type, hidden, training_args.output_dir)
    _check_reflection(args, task_plan, earlier_dirs, training_args.seed)
