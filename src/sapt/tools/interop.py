"""Import a run of the official SAPT release into this project's task folders (docs/interop.md).

    python -m sapt interop import-official --family t5 --backbone /models/t5-large \
        --saved-weights run/1-taskA/saved_weights run/2-taskB/saved_weights --out imported/

Every official `saved_weights/` folder i becomes `OUT/<i>-<task>/` (block i, the keys and query network
of folder i, ā_i), written by the checkpoint module so that there is one artifact format. The release's
files are read without running code from them: `.pt` with `torch.load(weights_only=True)`, the routing
mean through `sapt.tools.safe_pickle`. All files are checked before the backbone is loaded, everything is
written into a temporary folder, and OUT appears only when every task folder is complete.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backbone import load_backbone
from ..checkpoint import CheckpointError, save_routing_mean, save_task_artifacts
from ..config import SaptConfig
from ..model import SaptModel
from ..run_files import TASK_DIR_PATTERN, TASK_ORDER_FILE, task_dir_name
from ..utils.cli import OneLineArgumentParser, report_error
from ..utils.fileio import staged_folder, write_text_atomic
from ..utils.logs import setup_cli_logging, stdout_kept_for_results
from .safe_pickle import UnsafePickleError, load_numpy_pickle

logger = logging.getLogger(__name__)

# The release names a block `<attention module>.lora_{q,v}`; this project wraps the projection itself.
FAMILY_PROJECTIONS = {
    "t5": {"q": "q", "v": "v"},
    "llama": {"q": "q_proj", "v": "v_proj"},
}
OFFICIAL_KEY = re.compile(r"^(?P<parent>.+)\.lora_(?P<proj>[qv])\.lora_(?P<part>[AB])$")
PREVIOUS_MARKER = "previous_lora_weights"  # copies of older blocks inside a later task's files
QUERY_NET_KEYS = ("0.weight", "1.weight", "3.weight", "3.bias")  # down, up, (SiLU), LayerNorm

LORA_A_FILE = "lora_weights_A.pt"
LORA_B_FILE = "lora_weights_B.pt"
QUERY_NET_FILE = "trans_input.pt"
KEYS_FILE = "prompts_keys_till_now.pt"
ROUTING_MEAN_PICKLE = "attention_weights.pkl"


@dataclass
class OfficialTask:
    """One official `saved_weights/` folder, read and checked on its own (before the backbone is known)."""

    source: Path
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]]  # project module name -> A (r, d_in), B (d_out, r)
    rank: int
    query_net: dict[str, torch.Tensor]  # this project's Router.query_net state dict
    keys_newest_first: torch.Tensor  # (i, d)
    routing_mean_newest_first: list[float]  # ā_i, length i

    @property
    def hidden_size(self) -> int:
        return self.keys_newest_first.shape[1]

    @property
    def query_dim(self) -> int:
        return self.query_net["0.weight"].shape[0]


# ---- reading the release's files ------------------------------------------------------------------
def _load_pt(path: Path):
    """torch.load restricted to tensors and plain containers; any failure is a one-line CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # weights_only refusals are UnpicklingError; corrupt archives RuntimeError, ...
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        refusal = [line for line in lines if "Unsupported global" in line or "Unsupported operand" in line]
        detail = (refusal or lines or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not a plain tensor file ({detail})") from None


def _dense(path: Path, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A plain dense CPU tensor (sparse, quantized, nested or meta tensors are refused), detached."""
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested or tensor.device.type != "cpu":
        raise CheckpointError(
            f"{path}: {key} is a {tensor.layout} tensor on {tensor.device.type}, expected a dense CPU tensor"
        )
    return tensor.detach()


def _finite_float(path: Path, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as float32, refusing NaN and infinite values (they would poison every output)."""
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"{path}: {key} holds NaN or infinite values")
    return tensor


def _load_tensor_dict(path: Path) -> dict[str, torch.Tensor]:
    data = _load_pt(path)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a dict of name -> tensor, found {type(data).__name__}")
    for name, value in data.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, expected a tensor")
    return {name: _dense(path, name, value) for name, value in data.items()}


def _floating_matrix(path: Path, key: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() != 2 or not tensor.is_floating_point():
        raise CheckpointError(
            f"{path}: {key} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, expected a float matrix"
        )
    return _finite_float(path, key, tensor)


def _map_block(path: Path, tensors: dict[str, torch.Tensor], part: str, family: str) -> dict[str, torch.Tensor]:
    """Official `...lora_{q,v}.lora_<part>` keys -> this project's wrapped-module names."""
    projections = FAMILY_PROJECTIONS[family]
    mapped = {}
    for key, tensor in tensors.items():
        if PREVIOUS_MARKER in key:
            continue
        match = OFFICIAL_KEY.match(key)
        if match is None or match["part"] != part:
            raise CheckpointError(f"{path}: unexpected key {key!r} (expected '<attention>.lora_{{q,v}}.lora_{part}')")
        mapped[f"{match['parent']}.{projections[match['proj']]}"] = _floating_matrix(path, key, tensor)
    if not mapped:
        raise CheckpointError(f"{path}: no lora_{part} tensors of the task's own block")
    return mapped


def _official_name(module: str, family: str) -> str:
    """This project's module name back in the release's naming, for error messages."""
    parent, _, proj = module.rpartition(".")
    letter = {name: letter for letter, name in FAMILY_PROJECTIONS[family].items()}.get(proj, proj)
    return f"{parent}.lora_{letter}"


def _read_block(source: Path, family: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    path_a, path_b = source / LORA_A_FILE, source / LORA_B_FILE
    lora_A = _map_block(path_a, _load_tensor_dict(path_a), "A", family)
    lora_B = _map_block(path_b, _load_tensor_dict(path_b), "B", family)
    if set(lora_A) != set(lora_B):
        missing = [_official_name(m, family) for m in sorted(set(lora_A) - set(lora_B))[:3]]
        extra = [_official_name(m, family) for m in sorted(set(lora_B) - set(lora_A))[:3]]
        raise CheckpointError(f"{path_b}: modules differ from {LORA_A_FILE} (missing {missing}, unexpected {extra})")
    rank = Counter(a.shape[0] for a in lora_A.values()).most_common(1)[0][0]  # report the odd one out
    for module, a in lora_A.items():
        if a.shape[0] != rank:
            raise CheckpointError(
                f"{path_a}: {_official_name(module, family)}.lora_A has rank {a.shape[0]}, the other blocks rank {rank}"
            )
    for module in lora_A:
        if lora_B[module].shape[1] != rank:
            raise CheckpointError(
                f"{path_b}: {_official_name(module, family)}.lora_B has shape {tuple(lora_B[module].shape)}, "
                f"expected (d_out, {rank})"
            )
    return {module: (lora_A[module], lora_B[module]) for module in lora_A}, rank


def _read_query_net(path: Path) -> dict[str, torch.Tensor]:
    tensors = _load_tensor_dict(path)
    if set(tensors) != set(QUERY_NET_KEYS):
        raise CheckpointError(f"{path}: expected keys {list(QUERY_NET_KEYS)}, found {sorted(tensors)}")
    down, up, ln_weight, ln_bias = (tensors[k] for k in QUERY_NET_KEYS)
    if down.dim() != 2:
        raise CheckpointError(f"{path}: 0.weight has shape {tuple(down.shape)}, expected (query_dim, d)")
    query_dim, hidden = down.shape
    expected = {"1.weight": (hidden, query_dim), "3.weight": (hidden,), "3.bias": (hidden,)}
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    if not all(t.is_floating_point() for t in (down, up, ln_weight, ln_bias)):
        raise CheckpointError(f"{path}: query network tensors must be floating point")
    if 0 in down.shape:
        raise CheckpointError(f"{path}: 0.weight has shape {tuple(down.shape)}, expected (query_dim, d) with both > 0")
    return {key: _finite_float(path, key, tensors[key]) for key in QUERY_NET_KEYS}


def _read_keys(path: Path, index: int, hidden: int) -> torch.Tensor:
    keys = _load_pt(path)
    if not isinstance(keys, torch.Tensor) or not keys.is_floating_point():
        raise CheckpointError(f"{path}: expected a float tensor of task keys, found {type(keys).__name__}")
    keys = _dense(path, "the keys", keys)
    if tuple(keys.shape) != (index, hidden):
        raise CheckpointError(
            f"{path}: keys have shape {tuple(keys.shape)}, expected ({index}, {hidden}) for task {index}"
        )
    return _finite_float(path, "the keys", keys)


def _read_routing_mean(path: Path, index: int) -> list[float]:
    try:
        mean = load_numpy_pickle(path)
    except UnsafePickleError as err:
        raise CheckpointError(str(err)) from None
    if mean.shape != (index,):
        raise CheckpointError(f"{path}: routing mean has shape {mean.shape}, expected ({index},) for task {index}")
    mean = mean.astype(np.float64)
    if not np.isfinite(mean).all() or mean.min() < 0 or abs(mean.sum() - 1.0) > 1e-3:
        raise CheckpointError(f"{path}: routing mean {mean.tolist()} is not a probability distribution")
    return mean.tolist()


def read_official_task(source: str | Path, index: int, family: str) -> OfficialTask:
    """Read folder `source` of task `index` (1-based) and check it on its own."""
    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"{source}: saved_weights folder is missing")
    blocks, rank = _read_block(source, family)
    query_net = _read_query_net(source / QUERY_NET_FILE)
    hidden = query_net["0.weight"].shape[1]
    keys = _read_keys(source / KEYS_FILE, index, hidden)
    routing_mean = _read_routing_mean(source / ROUTING_MEAN_PICKLE, index)
    return OfficialTask(source, blocks, rank, query_net, keys, routing_mean)


# ---- checking against the backbone ----------------------------------------------------------------
def _check_consistent(tasks: list[OfficialTask]) -> None:
    """Rank, width and query-network size are shared by every task of one run."""
    first = tasks[0]
    for task in tasks[1:]:
        if task.rank != first.rank:
            raise CheckpointError(
                f"{task.source / LORA_A_FILE}: rank {task.rank} differs from rank {first.rank} of task 1"
            )
        if task.query_dim != first.query_dim or task.hidden_size != first.hidden_size:
            raise CheckpointError(
                f"{task.source / QUERY_NET_FILE}: query network {task.hidden_size}->{task.query_dim} differs "
                f"from {first.hidden_size}->{first.query_dim} of task 1"
            )


def _check_fits(task: OfficialTask, model: SaptModel, family: str) -> None:
    layers = dict(model.sapt_layers())
    if set(task.blocks) != set(layers):
        missing = [_official_name(m, family) for m in sorted(set(layers) - set(task.blocks))[:3]]
        extra = [_official_name(m, family) for m in sorted(set(task.blocks) - set(layers))[:3]]
        raise CheckpointError(
            f"{task.source / LORA_A_FILE}: block does not fit the backbone's q/v projections "
            f"(missing {missing}, unexpected {extra})"
        )
    for module, (lora_A, lora_B) in task.blocks.items():
        layer = layers[module]
        if lora_A.shape[1] != layer.in_features:
            raise CheckpointError(
                f"{task.source / LORA_A_FILE}: {_official_name(module, family)}.lora_A has shape "
                f"{tuple(lora_A.shape)}, expected ({task.rank}, {layer.in_features})"
            )
        if lora_B.shape[0] != layer.out_features:
            raise CheckpointError(
                f"{task.source / LORA_B_FILE}: {_official_name(module, family)}.lora_B has shape "
                f"{tuple(lora_B.shape)}, expected ({layer.out_features}, {task.rank})"
            )
    if task.hidden_size != model.sapt_config.hidden_size:
        raise CheckpointError(
            f"{task.source / QUERY_NET_FILE}: query network width {task.hidden_size} does not match the "
            f"backbone's embedding width {model.sapt_config.hidden_size}"
        )


# ---- naming and writing ---------------------------------------------------------------------------
def _task_names(saved_weights_dirs: Sequence[Path], task_names: Sequence[str] | None) -> list[str]:
    """Given names, else `<task>` of a parent folder named `<i>-<task>`, else `task<i>`."""
    if task_names is not None:
        names = [str(name).strip() for name in task_names]
        if len(names) != len(saved_weights_dirs):
            raise CheckpointError(
                f"--task-names: {len(names)} names for {len(saved_weights_dirs)} saved_weights folders"
            )
    else:
        names = []
        for index, source in enumerate(saved_weights_dirs, start=1):
            match = TASK_DIR_PATTERN.match(Path(os.path.abspath(source)).parent.name)
            if match is None:
                names.append(f"task{index}")
                continue
            if int(match.group(1)) != index:
                logger.warning("%s: folder number %s but given as task %d", source, match.group(1), index)
            names.append(match.group(2))
    for name in names:
        if not name or name.startswith(".") or any(c in ",/\\" or c.isspace() for c in name):
            raise CheckpointError(f"task name {name!r}: not usable as a folder name (no commas, slashes or spaces)")
    if len(set(names)) != len(names):
        raise CheckpointError(f"task names {names} are not unique; pass --task-names")
    return names


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: output exists and is not an empty folder")


def _load_backbone(backbone_dir: str, family: str):
    if not Path(backbone_dir).is_dir():
        raise CheckpointError(f"{backbone_dir}: backbone folder is missing")
    try:
        backbone = load_backbone(backbone_dir)
    except (OSError, ValueError, KeyError) as err:
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{backbone_dir}: cannot load the backbone ({detail})") from None
    if bool(backbone.config.is_encoder_decoder) != (family == "t5"):
        raise CheckpointError(
            f"{backbone_dir}: a {backbone.config.model_type} backbone does not match --family {family}"
        )
    return backbone


def import_official(
    family: str,
    backbone_dir: str | Path,
    saved_weights_dirs: Sequence[str | Path],
    out_dir: str | Path,
    lora_alpha: float = 32.0,
    task_names: Sequence[str] | None = None,
    temperature: str | float = "sqrt_d",
) -> Path:
    """Convert official `saved_weights/` folders (task 1 first) into `out_dir/<i>-<task>/` task folders
    plus `out_dir/task_order.txt`; return `out_dir`. Raises CheckpointError (one line) on bad input."""
    if family not in FAMILY_PROJECTIONS:
        raise CheckpointError(f"family {family!r}: expected one of {sorted(FAMILY_PROJECTIONS)}")
    if not saved_weights_dirs:
        raise CheckpointError("no saved_weights folders given")
    if not (isinstance(lora_alpha, (int, float)) and math.isfinite(lora_alpha) and lora_alpha > 0):
        raise CheckpointError(f"lora_alpha {lora_alpha!r}: expected a positive number")
    out_dir = Path(out_dir)
    sources = [Path(d) for d in saved_weights_dirs]
    _check_out_dir(out_dir)
    names = _task_names(sources, task_names)

    # Everything the release wrote is checked before the (possibly large) backbone is loaded.
    tasks = [read_official_task(source, index, family) for index, source in enumerate(sources, start=1)]
    _check_consistent(tasks)
    backbone_path = os.path.abspath(backbone_dir)
    backbone = _load_backbone(backbone_path, family)
    try:
        config = SaptConfig.for_backbone(
            backbone,
            backbone_path,
            method="sapt",
            target_modules=list(FAMILY_PROJECTIONS[family].values()),
            r=tasks[0].rank,
            alpha=float(lora_alpha),
            query_dim=tasks[0].query_dim,
            temperature=temperature,
        )
    except ValueError as err:
        raise CheckpointError(f"invalid SAPT configuration: {err}") from None
    model = SaptModel(backbone, config)
    for task in tasks:
        _check_fits(task, model, family)

    with staged_folder(out_dir, _check_out_dir) as staging:
        _write_tasks(model, tasks, names, staging)
        write_text_atomic(staging / TASK_ORDER_FILE, ",".join(names))
    logger.info("imported %d task(s) into %s", len(tasks), out_dir)
    return out_dir


def _write_tasks(model: SaptModel, tasks: list[OfficialTask], names: list[str], root: Path) -> None:
    """Grow one model task by task and save each state with the checkpoint module's writers."""
    layers = dict(model.sapt_layers())
    router = model.router
    for index, (task, name) in enumerate(zip(tasks, names), start=1):
        for module, (lora_A, lora_B) in task.blocks.items():
            layers[module].append_frozen_block(lora_A, lora_B)
        router.past_keys = router.past_keys[:0]  # folder i holds every key up to task i
        router.append_frozen_keys(task.keys_newest_first.flip(0))  # stored oldest first
        router.query_net.load_state_dict(task.query_net)
        model.sapt_config.tasks = names[:index]
        task_dir = root / task_dir_name(index, name)
        task_dir.mkdir()
        earlier_block_dirs = [f"../{task_dir_name(j, old)}" for j, old in enumerate(names[: index - 1], start=1)]
        save_task_artifacts(model, task_dir, earlier_block_dirs)
        save_routing_mean(task_dir, names[:index], task.routing_mean_newest_first[::-1])
        logger.info("%s -> %s", task.source, task_dir.name)


# ---- command line ---------------------------------------------------------------------------------
def _temperature(text: str) -> str | float:
    try:
        return float(text)
    except ValueError:
        return text


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="sapt interop", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("import-official", help="convert the release's saved_weights folders into task folders")
    cmd.add_argument("--family", required=True, choices=sorted(FAMILY_PROJECTIONS), help="backbone family")
    cmd.add_argument("--backbone", required=True, help="local folder of the backbone the run was trained on")
    cmd.add_argument(
        "--saved-weights", required=True, nargs="+", metavar="DIR",
        help="each task's saved_weights/ folder, task 1 first",
    )
    cmd.add_argument("--out", required=True, help="new (or empty) output folder")
    cmd.add_argument("--lora-alpha", type=float, default=32.0, help="the run's lora_alpha (default 32)")
    cmd.add_argument("--task-names", help="comma-separated names (default: from the <i>-<task> parent folders)")
    cmd.add_argument(
        "--temperature", type=_temperature, default="sqrt_d", help="router temperature: sqrt_d (default), sqrt_2d, ..."
    )
    cmd.add_argument("-v", "--verbose", action="store_true", help="log each converted task")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli_logging(logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:  # keep stderr to the one error line
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    names = args.task_names.split(",") if args.task_names is not None else None
    try:
        with stdout_kept_for_results():
            out = import_official(
                args.family, args.backbone, args.saved_weights, args.out, args.lora_alpha, names, args.temperature
            )
    except (CheckpointError, OSError) as err:  # user errors: one line, no traceback
        return report_error("sapt interop", err)
    print(out)
    return 0
