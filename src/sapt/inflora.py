"""InfLoRA (Liang & Li, CVPR 2024): interference-free low-rank adaptation, as two hooks around a task's training.

Task t's block adds B_t A_t x to a wrapped projection. A_t (r, d_in) is designed before training and frozen; only
B_t trains. A_t's rows lie in the orthogonal complement of span(M), where M (d_in, k) is an orthonormal basis of
the subspace the earlier tasks' inputs of that layer occupy, so B_t A_t x = 0 for every x in span(M): training
task t leaves the layer's output on those inputs as it was. Within the complement, A_t's rows are the r leading
left singular vectors of (I - M Mᵀ) C_t, C_t the mean of x xᵀ over task t's inputs (docs/inflora.md).

    before_training   C_t from the model as it stands (earlier blocks summed, the new block's B = 0), then
                      A_t = row_norm · top-r left singular vectors of (I - M Mᵀ) C_t, frozen
    after_training    C_t again, from the trained model; M grows with the directions of (I - M Mᵀ) C_t that
                      bring the energy of C_t inside span(M) to the task's threshold (DualGPM's rule);
                      M is written to the task folder

All decompositions run in float64 on the CPU, so the same inputs give the same tensors on every machine.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file

from .layer import SaptLinear
from .utils.fileio import save_tensors_atomic
from .utils.zero3 import gathered

if TYPE_CHECKING:
    from .model import SaptModel

logger = logging.getLogger(__name__)

SUBSPACE_FILE = "inflora_subspace.safetensors"  # per-layer bases of earlier tasks' input subspace, in a task folder

# The threshold of task t (0-based, of T) is start + (end - start) * t / T: InfLoRA's code (lamb, lame; its ViT
# configs use lamb 0.95 or 0.98, lame 1.0) with GainLoRA's values for T5 on SuperNI and Long Sequence
# (--threshold 0.995, rising to 1.0), the benchmarks this toolkit runs.
THRESHOLD_START = 0.995
THRESHOLD_END = 1.0
METADATA_KEY = "inflora"  # the file's metadata: {"position", "num_tasks", "threshold"} as JSON
ROW_NORM = 1 / math.sqrt(3)  # InfLoRA's code scales the designed rows of A to norm 1/sqrt(3); GainLoRA keeps it


class InfLoRAError(ValueError):
    """A subspace file is missing or does not fit the model, or the hooks are called out of order."""


# ---- the linear algebra -----------------------------------------------------------------------------
def threshold_at(position: int, num_tasks: int, start: float = THRESHOLD_START, end: float = THRESHOLD_END) -> float:
    """Energy threshold for the subspace update after the task at `position` (0-based) of `num_tasks`."""
    if not 0 <= position < num_tasks:
        raise ValueError(f"task position {position} is outside a run of {num_tasks} tasks")
    return start + (end - start) * position / num_tasks


def canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Columns of `vectors` flipped so that each one's largest-magnitude entry is positive (the first such
    entry on a tie): a singular vector's sign is arbitrary, this makes it a function of the input."""
    if vectors.numel() == 0:
        return vectors
    largest = vectors.abs().argmax(dim=0)  # (n,)
    signs = torch.sign(vectors.gather(0, largest[None, :]))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def complement_basis(basis: torch.Tensor) -> torch.Tensor:
    """(d, d - k) orthonormal basis of the orthogonal complement of span(basis), basis (d, k) orthonormal."""
    dim, k = basis.shape
    if k == 0:
        return torch.eye(dim, dtype=basis.dtype)
    complete, _ = torch.linalg.qr(basis, mode="complete")  # first k columns span `basis`, the rest its complement
    return complete[:, k:]


def projected_directions(statistics: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (d, d - k) and singular values (d - k,) of (I - M Mᵀ) C, largest first.

    Computed as Q U with U, S the SVD of Qᵀ C, Q a basis of span(M)'s complement (same values, same vectors up
    to sign), so that every direction is orthogonal to M, also those of a zero singular value, which the
    SVD of the d x d product would draw from span(M)."""
    complement = complement_basis(basis)
    left, values, _ = torch.linalg.svd(complement.T @ statistics, full_matrices=False)
    return canonical_signs(complement @ left), values


def design_down_projection(
    statistics: torch.Tensor, basis: torch.Tensor, r: int, row_norm: float = ROW_NORM
) -> torch.Tensor:
    """A (r, d): the r leading directions of (I - M Mᵀ) C as rows of norm `row_norm`. Rows beyond the
    complement's dimension (a subspace that fills nearly the whole input space) are zero: no capacity, and
    no interference."""
    directions, _ = projected_directions(statistics, basis)
    down = torch.zeros(r, statistics.shape[0], dtype=statistics.dtype)
    rows = min(r, directions.shape[1])
    down[:rows] = directions[:, :rows].T * row_norm
    return down


def grown_basis(statistics: torch.Tensor, basis: torch.Tensor, threshold: float) -> torch.Tensor:
    """M after a task whose inputs have second moment C (InfLoRA's DualGPM update).

    Energies are squared singular values of C (not of the inputs), as in InfLoRA's code. First task (M
    empty): keep the leading directions whose cumulative energy share stays below `threshold`, at least
    one. Later tasks: start from the share of ||C||² already inside span(M) and add directions of
    (I - M Mᵀ) C, largest first, until the share reaches `threshold`. Directions of (numerically) zero
    energy are never added."""
    total = statistics.square().sum()  # ||C||_F² = the sum of C's squared singular values
    if total == 0 or basis.shape[1] == basis.shape[0]:  # no input, or no direction left to add
        return basis
    directions, values = projected_directions(statistics, basis)
    shares = values.square() / total
    if basis.shape[1] == 0:
        keep = max(int((shares.cumsum(0) < threshold).sum()), 1)
    else:
        covered, keep = 1 - shares.sum().item(), 0
        for share in shares.tolist():
            if covered >= threshold:
                break
            covered += share
            keep += 1
    nonzero = int((values > values.max() * max(values.shape[0], 1) * torch.finfo(values.dtype).eps).sum())
    return torch.cat([basis, directions[:, : min(keep, nonzero)]], dim=1)


# ---- statistics of the wrapped layers' inputs ---------------------------------------------------------
def position_masks(batch: dict, is_encoder_decoder: bool) -> dict[str, torch.Tensor | None]:
    """Which positions of each side of the model hold real tokens: bool (B, L) per side, None for all.

    Decoder-only: the attention mask (padding is excluded; prompt and answer both count, as both reach the
    layers when the model answers). T5: the encoder side reads the prompt (attention mask); the decoder side
    reads the start token and the labels shifted right, so decoder position i is real where labels[i] is a
    token (label padding is IGNORE_INDEX, negative), unless the batch gives a decoder attention mask."""
    attention = batch.get("attention_mask")
    source = None if attention is None else attention.bool()
    if not is_encoder_decoder:
        return {"decoder": source}
    target = batch.get("decoder_attention_mask")
    if target is not None:
        target = target.bool()
    elif batch.get("labels") is not None:
        target = batch["labels"].ge(0)
    return {"encoder": source, "decoder": target}


def input_side(name: str, is_encoder_decoder: bool) -> str:
    """Which side's positions a wrapped projection reads. HF's T5 layout: every projection under `encoder.`,
    and the cross-attention's key and value (`EncDecAttention.k/v`, fed the encoder's output), read encoder
    positions; every other one (decoder self-attention, the cross-attention's query) reads decoder positions."""
    if not is_encoder_decoder:
        return "decoder"
    parts = name.split(".")
    if parts[0] == "encoder" or (len(parts) > 1 and parts[-2] == "EncDecAttention" and parts[-1] in ("k", "v")):
        return "encoder"
    return "decoder"


@torch.no_grad()
def input_statistics(model: SaptModel, batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """C per wrapped layer, keyed by module name: the mean of x xᵀ over the real positions of every batch,
    (d_in, d_in) float64 on the CPU. The model runs in eval mode (no dropout); its mode is restored after.
    Under torch.distributed the sums and counts of every process are added."""
    is_encoder_decoder = model.sapt_config.is_encoder_decoder
    layers = list(model.sapt_layers())
    sums = {name: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=layer.past_down.device)
            for name, layer in layers}
    counts = {name: torch.zeros((), dtype=torch.float64, device=layer.past_down.device) for name, layer in layers}
    masks: dict[str, torch.Tensor | None] = {}

    def accumulate(name: str, side: str):
        def hook(module: SaptLinear, args: tuple) -> None:
            x, mask = args[0], masks[side]
            if mask is None:
                rows = x.reshape(-1, x.shape[-1])
            elif mask.shape != x.shape[:-1]:
                raise RuntimeError(
                    f"{name}: input of shape {tuple(x.shape)} does not fit the {side} positions {tuple(mask.shape)}"
                )
            else:
                rows = x[mask]  # (positions, d_in)
            rows = rows.to(torch.float64)
            sums[name].addmm_(rows.T, rows)
            counts[name] += rows.shape[0]

        return hook

    handles = [layer.register_forward_pre_hook(accumulate(name, input_side(name, is_encoder_decoder)))
               for name, layer in layers]
    was_training = model.training
    model.eval()
    try:
        device = model.device
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            masks.clear()
            masks.update(position_masks(batch, is_encoder_decoder))
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        for name, _ in layers:
            dist.all_reduce(sums[name])
            dist.all_reduce(counts[name])
    empty = [name for name, _ in layers if counts[name].item() == 0]
    if empty:
        raise InfLoRAError(
            f"no input position reached {empty[0]} (and {len(empty) - 1} more layers): no batches, or all padding"
        )
    return {name: (sums[name] / counts[name]).cpu() for name, _ in layers}


# ---- the subspace file --------------------------------------------------------------------------------
def empty_subspace(model: SaptModel) -> dict[str, torch.Tensor]:
    """The first task's subspace: no direction in any layer."""
    return {name: torch.zeros(layer.in_features, 0, dtype=torch.float64) for name, layer in model.sapt_layers()}


def load_subspace(path: Path, model: SaptModel) -> dict[str, torch.Tensor]:
    """Per-layer bases (d_in, k) float64 from `path`; any problem is one line naming the file."""
    if not path.is_file():
        raise InfLoRAError(f"{path}: InfLoRA subspace file is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise InfLoRAError(f"{path}: unreadable safetensors file ({err})") from None
    layers = dict(model.sapt_layers())
    if set(tensors) != set(layers):
        missing, extra = sorted(set(layers) - set(tensors)), sorted(set(tensors) - set(layers))
        raise InfLoRAError(f"{path}: layers do not match the model (missing {missing[:3]}, unknown {extra[:3]})")
    for name, basis in tensors.items():
        d_in = layers[name].in_features
        if basis.dtype != torch.float64 or basis.dim() != 2 or basis.shape[0] != d_in or basis.shape[1] > d_in:
            raise InfLoRAError(
                f"{path}: {name} holds a {basis.dtype} tensor of shape {tuple(basis.shape)}, "
                f"expected float64 ({d_in}, k <= {d_in})"
            )
        if not torch.isfinite(basis).all():
            raise InfLoRAError(f"{path}: {name} holds non-finite values")
    return tensors


def save_subspace(path: Path, bases: dict[str, torch.Tensor], position: int, num_tasks: int, threshold: float) -> None:
    """The bases, and under one metadata key (safetensors writes several keys in no fixed order) the task
    they were grown after."""
    record = json.dumps({"position": position, "num_tasks": num_tasks, "threshold": threshold})
    save_tensors_atomic(path, bases, metadata={METADATA_KEY: record})


# ---- the hooks ------------------------------------------------------------------------------------------
class InfLoRAHooks:
    """What InfLoRA adds to a task's training: design and freeze A before, grow and save the subspace after."""

    def __init__(self, threshold_start: float = THRESHOLD_START, threshold_end: float = THRESHOLD_END,
                 row_norm: float = ROW_NORM):
        if not 0 < threshold_start <= threshold_end <= 1:
            raise ValueError(
                f"InfLoRA thresholds must satisfy 0 < start <= end <= 1, got {threshold_start}, {threshold_end}"
            )
        if not row_norm > 0:
            raise ValueError(f"InfLoRA row norm must be positive, got {row_norm}")
        self.threshold_start, self.threshold_end, self.row_norm = threshold_start, threshold_end, row_norm
        self.previous: dict[str, torch.Tensor] | None = None  # earlier tasks' bases, set by before_training

    def before_training(self, model: SaptModel, batches: Iterable[dict], previous_dir: Path | None,
                        position: int, num_tasks: int) -> None:
        threshold_at(position, num_tasks)  # validates the position
        if (previous_dir is None) != (position == 0):
            raise InfLoRAError(f"InfLoRA task at position {position} given previous folder {previous_dir}: "
                               "the first task has none, every later one needs its predecessor's")
        if previous_dir is None:
            self.previous = empty_subspace(model)
        else:
            self.previous = load_subspace(Path(previous_dir) / SUBSPACE_FILE, model)
        statistics = input_statistics(model, batches)
        for name, layer in model.sapt_layers():
            if layer.lora_A is None:
                raise InfLoRAError(f"{name} has no current block: add the task's block before InfLoRA designs it")
            down = design_down_projection(statistics[name], self.previous[name], layer.r, self.row_norm)
            with gathered([layer.lora_A], modify=True):
                layer.lora_A.data.copy_(down.to(layer.lora_A.dtype))
            layer.lora_A.requires_grad_(False)
        sizes = [basis.shape[1] for basis in self.previous.values()]
        logger.info("InfLoRA: designed A in %d layers, outside earlier subspaces of %d to %d dimensions",
                    len(sizes), min(sizes), max(sizes))

    def after_training(self, model: SaptModel, batches: Iterable[dict], task_dir: Path,
                       position: int, num_tasks: int) -> None:
        if self.previous is None:
            raise InfLoRAError("InfLoRA's after_training needs before_training's subspace: call before_training first")
        threshold = threshold_at(position, num_tasks, self.threshold_start, self.threshold_end)
        statistics = input_statistics(model, batches)
        bases = {name: grown_basis(statistics[name], self.previous[name], threshold) for name in self.previous}
        sizes = [basis.shape[1] for basis in bases.values()]
        logger.info("InfLoRA: subspaces of %d to %d dimensions after task %d (threshold %.6g)",
                    min(sizes), max(sizes), position + 1, threshold)
        if not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:
            save_subspace(Path(task_dir) / SUBSPACE_FILE, bases, position, num_tasks, threshold)
