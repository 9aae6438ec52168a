"""Training terms and data of the baseline methods that share SAPT's harness (docs/methods.md)."""

from __future__ import annotations

import torch
from datasets import Dataset, concatenate_datasets

from .model import SaptModel


def orthogonality_loss(model: SaptModel) -> torch.Tensor:
    """O-LoRA: Σ over wrapped projections of Σ |A_new A_oldᵀ|, pushing the new block's input
    subspace away from every earlier block's."""
    total = torch.zeros((), device=model.device)
    for _, layer in model.sapt_layers():
        if layer.lora_A is None or not len(layer.past_A):
            continue
        old = layer.past_down  # (T_old * r, d_in)
        total = total + (layer.lora_A @ old.T).abs().sum()
    return total


def l2_loss(model: SaptModel) -> torch.Tensor:
    """‖new block‖²: squared Frobenius norms of the trainable A and B of every projection."""
    total = torch.zeros((), device=model.device)
    for _, layer in model.sapt_layers():
        if layer.lora_A is not None:
            total = total + layer.lora_A.pow(2).sum() + layer.lora_B.pow(2).sum()
    return total


def replay_memory(train_sets: list[Dataset], ratio: float, seed: int) -> Dataset:
    """A seeded sample of `ratio` of each earlier task's real training set (at least one example each)."""
    samples = []
    for number, train in enumerate(train_sets):
        size = max(1, round(ratio * len(train)))
        samples.append(train.shuffle(seed=seed + number).select(range(min(size, len(train)))))
    return concatenate_datasets(samples)


def union(datasets: list[Dataset]) -> Dataset:
    """Concatenate splits of several tasks, renumbering `index` so it addresses the union."""
    joined = concatenate_datasets(datasets)
    return joined.map(lambda _, i: {"index": i}, with_indices=True)
