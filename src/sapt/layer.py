"""The shared attentive LoRA layer: a stock nn.Linear plus every task's block, mixed by routing weights.

    y = W x + (alpha / r) * sum_j a_j(x) * B_j A_j drop(x)

All blocks are applied in one pass: the A matrices of the T blocks are stacked into one (T*r, d_in)
projection, each rank-r slice of the result is scaled by its task's routing weight, and the stacked
B matrices (d_out, T*r) map back. The cost is that of a single LoRA of rank T*r, with no Python loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RoutingState:
    """Routing weights of the batch being processed, shared by every wrapped layer of one model.

    The model sets them once per forward (or once per `generate`); the layers only read them. Keeping
    them here rather than threading them through the backbone's forward leaves HF's modeling code
    untouched, and recomputation under gradient checkpointing reads the same tensor.
    """

    def __init__(self):
        self.weights: torch.Tensor | None = None  # (B, T), blocks oldest first

    def for_batch(self, batch_size: int) -> torch.Tensor:
        weights = self.weights
        if weights is None:
            raise RuntimeError("SAPT routing weights are not set: call the SaptModel, not its backbone")
        if weights.shape[0] == batch_size:
            return weights
        # Beam search and sampling expand each input into consecutive copies (repeat_interleave).
        if batch_size % weights.shape[0]:
            raise RuntimeError(f"batch of {batch_size} rows does not expand routing weights of {weights.shape[0]}")
        return weights.repeat_interleave(batch_size // weights.shape[0], dim=0)


class SaptLinear(nn.Module):
    """Wraps one projection. Earlier tasks' blocks are frozen buffers; the current block trains."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, routing: RoutingState):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._routing = routing  # plain attribute: not a submodule, not in the state dict
        d_in, d_out = base_layer.in_features, base_layer.out_features
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.register_buffer("past_A", torch.zeros(0, r, d_in, **factory))  # (T_old, r, d_in)
        self.register_buffer("past_B", torch.zeros(0, d_out, r, **factory))  # (T_old, d_out, r)
        self.lora_A: nn.Parameter | None = None  # (r, d_in), current task
        self.lora_B: nn.Parameter | None = None  # (d_out, r)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def num_blocks(self) -> int:
        return self.past_A.shape[0] + (self.lora_A is not None)

    def add_block(self) -> None:
        """Start a new trainable block: A Kaiming-uniform (a=sqrt(5)), B zeros, so it starts as a no-op."""
        if self.lora_A is not None:
            raise RuntimeError("freeze the current block before adding a new one")
        device = self.past_A.device
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def freeze_block(self) -> None:
        """Move the current block into the frozen stack (no gradient, no optimizer state)."""
        if self.lora_A is None:
            return
        self.append_frozen_block(self.lora_A.data, self.lora_B.data)
        self.lora_A = self.lora_B = None

    def thaw_block(self) -> None:
        """Make the newest frozen block trainable again (methods that keep training one block)."""
        if self.lora_A is not None or not len(self.past_A):
            raise RuntimeError("no frozen block to thaw")
        self.lora_A = nn.Parameter(self.past_A[-1].clone())
        self.lora_B = nn.Parameter(self.past_B[-1].clone())
        self.past_A, self.past_B = self.past_A[:-1], self.past_B[:-1]

    def append_frozen_block(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        if lora_A.shape != (self.r, self.in_features) or lora_B.shape != (self.out_features, self.r):
            raise ValueError(
                f"block shapes {tuple(lora_A.shape)}/{tuple(lora_B.shape)} do not fit a rank-{self.r} "
                f"{self.in_features}->{self.out_features} projection"
            )
        self.past_A = torch.cat([self.past_A, lora_A.to(self.past_A)[None]])
        self.past_B = torch.cat([self.past_B, lora_B.to(self.past_B)[None]])

    def stacked_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All blocks, oldest first: A (T, r, d_in), B (T, d_out, r)."""
        if self.lora_A is None:
            return self.past_A, self.past_B
        return torch.cat([self.past_A, self.lora_A[None]]), torch.cat([self.past_B, self.lora_B[None]])

    def block(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.stacked_blocks()
        return A[index], B[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        A, B = self.stacked_blocks()
        num_blocks = A.shape[0]
        if num_blocks == 0:
            return out
        weights = self._routing.for_batch(x.shape[0]).to(x.dtype)  # (B, T)
        if weights.shape[1] != num_blocks:
            raise RuntimeError(f"{weights.shape[1]} routing weights for {num_blocks} blocks")
        # (..., d_in) @ (d_in, T*r) -> (..., T*r): every block's down-projection at once.
        hidden = F.linear(self.dropout(x), A.flatten(0, 1).to(x.dtype))
        hidden = hidden.unflatten(-1, (num_blocks, self.r))  # (B, ..., T, r)
        weights = weights.view(weights.shape[0], *([1] * (x.dim() - 2)), num_blocks, 1)
        hidden = (hidden * weights).flatten(-2)  # (B, ..., T*r)
        # B stacked as (d_out, T*r) so that slice t*r:(t+1)*r of the hidden state meets block t.
        up = B.permute(1, 0, 2).flatten(1).to(x.dtype)
        return out + self.scaling * F.linear(hidden, up)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, blocks={self.num_blocks}"
