"""Nested training state (optimizer, scheduler, RNG) on disk without pickle.

`state_dict()`s of optimizers and schedulers, and the RNG states, are trees of dicts, lists and
tuples whose leaves are tensors, numpy arrays, numbers, strings, booleans and None. A tree is stored
as two files: `<stem>.safetensors` with every tensor and array, and `<stem>.json` with the tree,
where each tensor leaf names its entry. Dict keys keep their type (optimizer states are keyed by
int), tuples stay tuples (`random.setstate` needs them), arrays come back as arrays of their dtype.
Anything else in a tree is refused when saving, so nothing is stored that cannot be read back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .fileio import read_json, save_tensors_atomic, write_json_atomic


class StateFileError(ValueError):
    pass


def _flatten(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu()
        return {"tensor": name}
    if isinstance(value, np.ndarray):
        name = str(len(tensors))
        tensors[name] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "ui" else value.copy())
        return {"ndarray": name, "dtype": value.dtype.str}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
            raise StateFileError(f"dict keys must be str or int: {list(value)[:5]}")
        return {"dict": [[k, _flatten(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_flatten(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, np.generic):
        return {"value": value.item()}
    raise StateFileError(f"cannot store a {type(value).__name__} in a state file")


def _unflatten(node, tensors: dict[str, torch.Tensor]):
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "ndarray" in node:
        return tensors[node["ndarray"]].numpy().astype(np.dtype(node["dtype"]))
    if "dict" in node:
        return {k: _unflatten(v, tensors) for k, v in node["dict"]}
    if "tuple" in node:
        return tuple(_unflatten(v, tensors) for v in node["tuple"])
    if "list" in node:
        return [_unflatten(v, tensors) for v in node["list"]]
    return node["value"]


def save_state(stem: str | Path, state) -> None:
    """Write `state` as `<stem>.safetensors` + `<stem>.json` (each atomically; the JSON last)."""
    stem = Path(stem)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors)
    save_tensors_atomic(stem.with_name(stem.name + ".safetensors"), tensors)
    write_json_atomic(stem.with_name(stem.name + ".json"), tree)


def load_state(stem: str | Path):
    stem = Path(stem)
    tensor_file = stem.with_name(stem.name + ".safetensors")
    tree = read_json(stem.with_name(stem.name + ".json"), StateFileError, "state file")
    try:
        tensors = load_file(str(tensor_file))
        return _unflatten(tree, tensors)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise StateFileError(f"{tensor_file}: cannot be read back with its JSON tree ({err})") from None


def state_exists(stem: str | Path) -> bool:
    stem = Path(stem)
    return stem.with_name(stem.name + ".json").is_file() and stem.with_name(stem.name + ".safetensors").is_file()
