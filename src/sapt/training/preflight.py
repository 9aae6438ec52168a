"""Light checks of a task step's inputs, for the generators (sapt.experiments.pipeline) to make before they
write a pipeline: the files each step's plan reads (sapt.training.task_args.TaskPlan) are there and parse,
and the backbone is on this machine. No model is built and no Dataset is made, so a whole order is
checked in seconds; the run's own checks (sapt.training.validation) load everything again.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..utils.cli import UsageError
from ..utils.fileio import read_json
from .data import PSEUDO_SPLIT, DataError, find_task, read_split_file
from .task_args import TaskPlan

# A backbone folder holds its config, and any of these files holds a tokenizer's vocabulary (fast,
# SentencePiece, BPE, WordPiece).
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def split_files(data_dir: str | Path, task_plan: TaskPlan) -> list[Path]:
    """The benchmark split files the step reads, in its plan's order (DataError for a missing task folder)."""
    return [find_task(data_dir, read.task)[1] / f"{read.split}.json" for read in task_plan.splits]


def pseudo_files(gen_data_dir: str | Path, task_plan: TaskPlan) -> list[Path]:
    """The pseudo-sample files ARM reads in the step (none when it has no ARM)."""
    return [find_task(gen_data_dir, task)[1] / f"{PSEUDO_SPLIT}.json" for task in task_plan.pseudo_tasks]


def check_split_file(path: Path) -> None:
    """The file is there and is a well-formed split (DataError naming it otherwise)."""
    read_split_file(path)


def _is_hub_name(name: str) -> bool:
    """Whether `name` can be a model's name on the Hugging Face hub (`org/name` or `name`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cached(name: str, filenames) -> str | None:
    """The local cache's copy of the first of `filenames` the model `name` has there; None if none.
    Only the cache is read: nothing goes to the network."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(name, filename)
        if isinstance(found, str):
            return found
    return None


def locate_backbone(name_or_path: str, base: Path) -> str:
    """Where the backbone is: a folder (relative to `base`) with a config and a tokenizer, or a hub model
    already in the local Hugging Face cache. Returns what was found, in words; UsageError otherwise."""
    folder = base / name_or_path
    if folder.is_dir():
        if not (folder / CONFIG_FILE).is_file():
            raise UsageError(f"{folder}: no {CONFIG_FILE} there; pass a model folder (as save_pretrained writes it)")
        config = read_json(folder / CONFIG_FILE, UsageError, "model config")
        if not isinstance(config, dict) or "model_type" not in config:
            raise UsageError(f"{folder / CONFIG_FILE}: not a model config (no 'model_type'); pass a model folder")
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise UsageError(f"{folder}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer into the folder")
        return f"the folder {folder}"
    if _is_hub_name(name_or_path):
        config = _cached(name_or_path, [CONFIG_FILE])
        if config and _cached(name_or_path, TOKENIZER_FILES):
            return f"{name_or_path} in the local Hugging Face cache ({Path(config).parent})"
        from huggingface_hub import constants

        raise UsageError(
            f"{name_or_path}: no such folder under {base}{_similar_folder(folder)}, and no model of that name in the "
            f"local Hugging Face cache ({constants.HF_HUB_CACHE}); pass a folder with {CONFIG_FILE} and a tokenizer, "
            f"or download the model first (hf download {name_or_path})"
        )
    raise UsageError(f"{folder}: no such folder{_similar_folder(folder)}; pass a folder with {CONFIG_FILE} and a tokenizer")


def _similar_folder(folder: Path) -> str:
    """' (did you mean X?)' when a folder beside the missing one has a close name (another case, a typo)."""
    if not folder.parent.is_dir():
        return ""
    names = {entry.name.lower(): entry.name for entry in folder.parent.iterdir() if entry.is_dir()}
    close = difflib.get_close_matches(folder.name.lower(), list(names), n=1)
    return f" (did you mean {folder.parent / names[close[0]]}?)" if close else ""
