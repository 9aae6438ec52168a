"""O-LoRA's training terms (Wang et al., 2023; docs/methods.md): functions of the blocks alone."""

from __future__ import annotations

import torch

from .model import SaptModel


def orthogonality_loss(model: SaptModel) -> torch.Tensor:
    """Σ over wrapped projections of Σ |A_new A_oldᵀ|, pushing the new block's input subspace away from
    every earlier block's."""
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
