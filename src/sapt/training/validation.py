"""Checks of a task's inputs before anything is loaded, trained or written.

A user mistake (a missing file, a malformed split, an earlier task made with other settings, missing
pseudo data, a bad argument) must end in one line that names the file or the argument, exit status 2,
and no partial output, and it must cost seconds, not a training run. `validate_task_inputs` runs at the
start of `sapt.train_task.run`: it loads every input the step's plan lists (sapt.training.task_args.TaskPlan),
with the loaders the run uses (sapt.training.task_data), checks the earlier task's folder, and looks at the
backbone's config (not its weights).
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from ..checkpoint import BLOCK_FILE, ROUTER_FILE, CheckpointError, block_folders, load_config
from ..config import default_target_modules
from ..methods.registry import get_method, resolve
from ..run_files import COMPLETE_FILE
from ..utils import rules
from ..utils.cli import UsageError, first_line
from .data import BENCHMARKS, DataError, find_task
from .preflight import TOKENIZER_FILES
from .release_exact import check_release_arguments
from .task_args import ARGUMENT_RULES, TaskPlan
from .task_data import load_arm_targets, load_pseudo_sets, load_training_data


# ---- a task's inputs ----------------------------------------------------------------------------
def _check_arguments(args) -> None:
    """Every range of ARGUMENT_RULES, then the rules that tie arguments together."""
    problem = rules.first_problem({name: getattr(args, name) for name in ARGUMENT_RULES}, ARGUMENT_RULES, prefix="--")
    if problem:
        raise UsageError(problem)
    if args.router_pretrain_steps and not args.own_block_weight:
        raise UsageError(
            f"--router_pretrain_steps {args.router_pretrain_steps}: needs --own_block_weight > 0 (ARM alone sends "
            "every input to the oldest block; docs/router.md)"
        )
    if args.freeze_router_while_training and not args.router_pretrain_steps:
        raise UsageError("--freeze_router_while_training: needs --router_pretrain_steps > 0 (else the router never trains)")
    if args.target_modules is not None and not all(m.strip() for m in args.target_modules.split(",")):
        raise UsageError(f"--target_modules {args.target_modules!r}: expected comma-separated projection names")


def _check_data(args, task_plan: TaskPlan, seed: int) -> None:
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
    load_training_data(args, task_plan, seed)


def _backbone_config(name_or_path: str):
    """The backbone's config alone (no weights are loaded)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"--model_name_or_path {name_or_path}: cannot load the backbone's config ({first_line(err)})") from None


def _backbone_signature(config) -> tuple[str, int | None]:
    """(model_type, width) of a backbone config."""
    try:
        text = config.get_text_config()
    except Exception:
        text = config
    hidden = getattr(text, "hidden_size", None)
    return config.model_type, hidden if isinstance(hidden, int) else None


def _check_backbone_fits(name_or_path: str, config, target_modules: str | None) -> None:
    """The folder has a tokenizer, and the family has the projections SAPT wraps. The model is built
    on the meta device from its config: nothing is allocated and no weight is read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.models.auto.auto_factory import _get_model_class

    from ..model import target_linears

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
        raise UsageError(f"--model_name_or_path {name_or_path}: no usable tokenizer there ({first_line(err)})") from None
    model_type = config.model_type
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    try:
        # The class itself, not `auto.from_config`: under a ZeRO-3 config, from_config would start
        # DeepSpeed's partitioning (and its process group) before the entry point sets it up.
        model_class = _get_model_class(config, auto._model_mapping)
        with torch.device("meta"):
            skeleton = model_class(config)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--model_name_or_path {name_or_path}: cannot build a {model_type} model ({first_line(err)})") from None
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
        raise CheckpointError(f"{path}: unreadable safetensors file ({first_line(err)})") from None


def _check_previous(args, task_plan: TaskPlan, model_type: str, hidden: int | None, output_dir: str | None) -> list[Path]:
    """The earlier task's folder: there, finished, made for this backbone and these settings. Returns
    the folders of the earlier blocks (oldest first)."""
    folder = task_plan.previous_folder()
    if folder is None:
        return []
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
    block_dirs = block_folders(folder, found)
    for block_dir in block_dirs:
        _check_tensor_file(block_dir / BLOCK_FILE)
    for reference in get_method(found.method).task_tensor_files:  # the method's own files (InfLoRA's subspace)
        _check_tensor_file(folder / resolve(reference))
    if found.routed:
        _check_tensor_file(folder / ROUTER_FILE)
    if output_dir and Path(output_dir).resolve() in {folder.resolve(), *block_dirs}:
        raise UsageError(f"--output_dir {output_dir}: is an earlier task's folder (it would be overwritten)")
    return block_dirs if found.block_per_task else []


def _check_reflection(args, task_plan: TaskPlan, earlier_dirs: list[Path], seed: int) -> None:
    """ARM needs pseudo inputs of every earlier task and ā of every earlier task."""
    load_pseudo_sets(args, task_plan, seed)
    load_arm_targets(task_plan, earlier_dirs)


def _check_deepspeed(args, training_args) -> None:
    """A method's loss terms (O-LoRA's) read the blocks outside any module's forward, where ZeRO-3 leaves them
    partitioned."""
    ds_config = getattr(training_args, "hf_deepspeed_config", None)
    uses_blocks = any(getattr(args, spec.weight_argument) for spec in get_method(args.method).loss_terms)
    if ds_config is not None and ds_config.is_zero3() and uses_blocks:
        raise UsageError(
            f"--deepspeed {training_args.deepspeed}: {args.method}'s regularizers need whole blocks; use ZeRO-2 (zero2.json)"
        )
    # Router pretraining steps a plain optimizer before the Trainer starts, on the router's whole tensors.
    if ds_config is not None and ds_config.is_zero3() and args.router_pretrain_steps:
        raise UsageError(
            f"--deepspeed {training_args.deepspeed}: --router_pretrain_steps needs the router whole; use ZeRO-2 (zero2.json)"
        )


def validate_task_inputs(args, training_args, task_plan: TaskPlan) -> None:
    """Check everything this step reads, cheapest first; raise UsageError, DataError or CheckpointError."""
    _check_arguments(args)
    _check_deepspeed(args, training_args)
    _check_data(args, task_plan, training_args.seed)
    config = _backbone_config(args.model_name_or_path)
    model_type, hidden = _backbone_signature(config)
    _check_backbone_fits(args.model_name_or_path, config, args.target_modules)
    check_release_arguments(args, training_args, bool(config.is_encoder_decoder))
    earlier_dirs = _check_previous(args, task_plan, model_type, hidden, training_args.output_dir)
    _check_reflection(args, task_plan, earlier_dirs, training_args.seed)
