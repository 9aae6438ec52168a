"""Per-task artifacts on disk, and rebuilding a SaptModel from them.

A task folder (`outputs/<i>-<task>/`) holds:
    sapt_config.json      the SaptConfig, with the tasks of blocks 1..i
    lineage.json          where each block lives, relative to this folder (block i is ".")
    block.safetensors     this task's block: "<module>.lora_A" (r, d_in), "<module>.lora_B" (d_out, r)
    router.safetensors    the query network after task i and the keys of tasks 1..i ("keys", oldest first)
    routing_mean.json     mean routing weights over task i's dev inputs, newest block first (docs/methods.md)
    predictions/<task>.jsonl  each test input's prediction (and, for SAPT, its routing weights)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .backbone import load_backbone
from .config import CONFIG_NAME, SaptConfig
from .model import SaptModel
from .run_files import TASK_DIR_PATTERN
from .utils.cli import first_line
from .utils.fileio import read_json, save_tensors_atomic, write_json_atomic
from .utils.zero3 import gathered

BLOCK_FILE = "block.safetensors"
ROUTER_FILE = "router.safetensors"
LINEAGE_FILE = "lineage.json"
ROUTING_MEAN_FILE = "routing_mean.json"


class CheckpointError(ValueError):
    """An artifact folder is missing, incomplete or does not fit the model."""


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None


# ---- saving -------------------------------------------------------------------------------------
def block_state(model: SaptModel, index: int = -1) -> dict[str, torch.Tensor]:
    """One task's block from every wrapped projection, keyed by module path (full tensors, also
    under ZeRO-3, where every process must call this)."""
    state = {}
    current = [p for _, layer in model.sapt_layers() for p in (layer.lora_A, layer.lora_B)]
    with gathered(current):
        for name, layer in model.sapt_layers():
            lora_A, lora_B = layer.block(index)
            state[f"{name}.lora_A"] = lora_A.detach().clone()
            state[f"{name}.lora_B"] = lora_B.detach().clone()
    return state


def router_state(model: SaptModel) -> dict[str, torch.Tensor]:
    """The query network and every key, oldest first (full tensors; every process calls this under ZeRO-3)."""
    with gathered(model.router.parameters()):
        state = {f"query_net.{k}": v.detach().clone() for k, v in model.router.query_net.state_dict().items()}
        state["keys"] = model.router.keys().detach().clone()
    return state


def save_task_artifacts(
    model: SaptModel, task_dir: str | Path, earlier_block_dirs: list[str], write: bool = True
) -> None:
    """Write the newest block, the router and the config. `earlier_block_dirs[j]` locates block j
    relative to `task_dir`, for every block but the newest, which is written here. Under several
    processes every one calls this (ZeRO-3 gathers the tensors) and only the one with `write` writes."""
    task_dir = Path(task_dir)
    config = model.sapt_config
    if len(earlier_block_dirs) != model.num_blocks - 1:
        raise ValueError(f"{len(earlier_block_dirs)} earlier block folders for {model.num_blocks} blocks")
    block = block_state(model)
    router = router_state(model) if model.router is not None else None
    if not write:
        return
    save_tensors_atomic(task_dir / BLOCK_FILE, block, metadata={"task": config.tasks[-1]})
    if router is not None:
        save_tensors_atomic(task_dir / ROUTER_FILE, router)
    owners = config.tasks if config.block_per_task else config.tasks[-1:]
    lineage = [{"task": task, "dir": d} for task, d in zip(owners, [*earlier_block_dirs, "."])]
    write_json_atomic(task_dir / LINEAGE_FILE, {"blocks": lineage})
    config.save(task_dir)


def save_routing_mean(task_dir: str | Path, tasks_oldest_first: list[str], mean_oldest_first: list[float]) -> None:
    write_json_atomic(
        Path(task_dir) / ROUTING_MEAN_FILE,
        {"tasks": tasks_oldest_first[::-1], "weights": [float(w) for w in mean_oldest_first[::-1]]},
    )


def load_routing_mean(task_dir: str | Path) -> list[float]:
    """ā of a task, oldest block first (the file stores it newest first, as the release did)."""
    path = Path(task_dir) / ROUTING_MEAN_FILE
    data = read_json(path, CheckpointError)
    raw = data.get("weights") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in raw):
        raise CheckpointError(f"{path}: expected {{'tasks': [...], 'weights': [numbers]}}")
    weights = [float(w) for w in raw]
    if not weights or not all(math.isfinite(w) for w in weights) or abs(sum(weights) - 1.0) > 1e-3 or min(weights) < 0:
        raise CheckpointError(f"{path}: weights are not a probability distribution")
    return weights[::-1]


# ---- loading ------------------------------------------------------------------------------------
def load_config(task_dir: str | Path) -> SaptConfig:
    try:
        return SaptConfig.load(task_dir)
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(str(err)) from None
    except OSError as err:  # a folder or an unreadable file in place of the config
        raise CheckpointError(f"{Path(task_dir) / CONFIG_NAME}: cannot read ({err.strerror or err})") from None


def read_lineage(task_dir: str | Path, config: SaptConfig) -> list[str]:
    """The folder of each block of `task_dir` (relative to it, oldest first), checked against the config."""
    path = Path(task_dir) / LINEAGE_FILE
    data = read_json(path, CheckpointError)
    blocks = data.get("blocks") if isinstance(data, dict) else None
    if not isinstance(blocks, list) or not all(
        isinstance(e, dict) and isinstance(e.get("task"), str) and isinstance(e.get("dir"), str) and e["dir"]
        for e in blocks
    ):
        raise CheckpointError(f"{path}: expected {{'blocks': [{{'task': ..., 'dir': ...}}, ...]}}")
    owners = config.tasks if config.block_per_task else config.tasks[-1:]
    if [entry["task"] for entry in blocks] != list(owners):
        raise CheckpointError(f"{path}: blocks do not match the tasks {config.tasks}")
    return [entry["dir"] for entry in blocks]


def block_folders(task_dir: str | Path, config: SaptConfig) -> list[Path]:
    """The folder of each block of `task_dir`, resolved to an absolute path, oldest first."""
    return [(Path(task_dir) / d).resolve() for d in read_lineage(task_dir, config)]


def resolve_task_dir(path: str | Path) -> Path:
    """A task folder itself, or a run's `outputs` folder (then its latest task folder)."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    if path.is_dir():
        numbered = []
        for child in path.iterdir():
            match = TASK_DIR_PATTERN.match(child.name)
            if match and (child / CONFIG_NAME).is_file():
                numbered.append((int(match.group(1)), child))
        if numbered:
            return max(numbered)[1]
    raise CheckpointError(f"{path}: no SAPT task artifacts (no {CONFIG_NAME} here or in a numbered task folder)")


def restore_model(backbone, task_dir: str | Path, config: SaptConfig | None = None) -> SaptModel:
    """Wrap `backbone` and load every block, the keys and the query network of `task_dir`, all frozen."""
    task_dir = Path(task_dir)
    config = config or load_config(task_dir)
    lineage = [{"dir": d} for d in read_lineage(task_dir, config)]
    model_type = backbone.config.model_type
    hidden = backbone.get_input_embeddings().embedding_dim
    if (model_type, hidden) != (config.model_type, config.hidden_size):
        raise CheckpointError(
            f"{task_dir}: made for a {config.model_type} backbone of width {config.hidden_size}, "
            f"not this {model_type} of width {hidden}"
        )
    finished_tasks = list(config.tasks)
    config = SaptConfig.from_dict({**config.to_dict(), "tasks": []})
    model = SaptModel(backbone, config)
    layers = dict(model.sapt_layers())
    for entry in lineage:
        block_file = (task_dir / entry["dir"] / BLOCK_FILE).resolve()
        tensors = read_tensors(block_file)
        expected = {f"{name}.lora_{m}" for name in layers for m in "AB"}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
            raise CheckpointError(
                f"{block_file}: block does not fit this backbone (missing {missing}, unexpected {extra})"
            )
        try:
            for name, layer in layers.items():
                layer.append_frozen_block(tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"])
        except ValueError as err:
            raise CheckpointError(f"{block_file}: {err}") from None
    model.sapt_config.tasks.extend(finished_tasks)
    if model.router is not None:
        _load_router(model, task_dir / ROUTER_FILE, len(lineage))
    return model


def _load_router(model: SaptModel, path: Path, num_tasks: int) -> None:
    tensors = read_tensors(path)
    keys = tensors.pop("keys", None)
    hidden = model.sapt_config.hidden_size
    if keys is None or keys.shape != (num_tasks, hidden):
        shape = None if keys is None else tuple(keys.shape)
        raise CheckpointError(f"{path}: expected keys of shape {(num_tasks, hidden)}, found {shape}")
    query_state = {k.removeprefix("query_net."): v for k, v in tensors.items()}
    try:
        model.router.query_net.load_state_dict(query_state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: query network does not fit ({first_line(err)})") from None
    model.router.append_frozen_keys(keys)
    model.router.query_net.requires_grad_(False)


def load_checkpoint(path: str | Path, backbone=None, dtype: torch.dtype | None = None) -> SaptModel:
    """The model after the task stored at `path` (a task folder or a run's outputs folder), with every
    task's block loaded, in eval mode. The backbone is loaded from the recorded path unless given
    (or unless SAPT_BASE_MODEL overrides where it lives)."""
    task_dir = resolve_task_dir(path)
    config = load_config(task_dir)
    if backbone is None:
        backbone = load_backbone(os.environ.get("SAPT_BASE_MODEL", config.base_model_name_or_path), dtype)
    model = restore_model(backbone, task_dir, config)
    return model.eval()
