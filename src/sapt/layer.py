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

from .utils.zero3 import gathered


class RoutingState:
    """Routing weights of the batch being processed, shared by every wrapped layer of one model.

    The model sets them once per forward (or once per `generate`); the layers only read them. Keeping
    them here rather than threading them through the backbone's forward leaves HF's modeling code
    untouched, and recomputation under gradient checkpointing reads the same tensor.
    """

    def __init__(self):
        self._weights: torch.Tensor | None = None  # (B, T), blocks oldest first
        self._per_rank: dict = {}  # (batch, r, scale, dtype) -> (B, T*r) weights, shared by all layers
        # Each layer's stacked blocks, built once per routed pass when nothing needs their gradient
        # (a `generate` call decodes token by token through the same blocks).
        self.matrix_cache: dict = {}

    @property
    def weights(self) -> torch.Tensor | None:
        return self._weights

    @weights.setter
    def weights(self, value: torch.Tensor | None) -> None:
        self._weights = value
        self._per_rank = {}
        self.matrix_cache = {}

    def for_batch(self, batch_size: int) -> torch.Tensor:
        weights = self._weights
        if weights is None:
            raise RuntimeError("SAPT routing weights are not set: call the SaptModel, not its backbone")
        if weights.shape[0] == batch_size:
            return weights
        # Beam search and sampling expand each input into consecutive copies (repeat_interleave).
        if batch_size % weights.shape[0]:
            raise RuntimeError(f"batch of {batch_size} rows does not expand routing weights of {weights.shape[0]}")
        return weights.repeat_interleave(batch_size // weights.shape[0], dim=0)

    def per_rank(self, batch_size: int, r: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
        """(B, T*r): each block's weight times `scale`, repeated over its r hidden units. Computed once
        per batch and shared by every layer, so a layer spends a single product on the mixing."""
        key = (batch_size, r, scale, dtype)
        if key not in self._per_rank:
            weights = self.for_batch(batch_size) * scale
            self._per_rank[key] = weights.to(dtype).repeat_interleave(r, dim=1)
        return self._per_rank[key]


class _PartlyFrozenLinear(torch.autograd.Function):
    """F.linear(x, cat([frozen, trainable], dim)) where only `trainable` (the current block) needs a
    gradient. Autograd through the cat would compute the weight gradient of every block and keep
    one; here backward computes the input's gradient and the trainable slice's only, so the earlier
    blocks cost no weight-gradient products. dim 0: trainable output rows (the down-projection);
    dim 1: trainable input columns (the up-projection)."""

    @staticmethod
    def forward(ctx, x, frozen, trainable, dim: int):
        weight = torch.cat([frozen, trainable], dim=dim)
        out = F.linear(x, weight)
        # Keep only what backward uses: the input for the trainable slice's gradient, the weight for the
        # input's. A slice that needs no gradient (InfLoRA's designed down-projection) keeps nothing.
        needs_x, needs_trainable = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        ctx.save_for_backward(x if needs_trainable else None, weight if needs_x else None)
        ctx.dim, ctx.split, ctx.x_dtype, ctx.weight_dtype = dim, frozen.shape[dim], x.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        # Autocast may have run forward's product in a lower precision than x and weight are kept in.
        grad_x = grad_trainable = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.to(grad_out.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_2d, x_2d = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
            if ctx.dim == 0:
                grad_trainable = grad_2d[:, ctx.split :].T @ x_2d  # (r, d_in)
            else:
                grad_trainable = grad_2d.T @ x_2d[:, ctx.split :]  # (d_out, r)
            grad_trainable = grad_trainable.to(ctx.weight_dtype)
        return grad_x, None, grad_trainable, None


class SaptLinear(nn.Module):
    """Wraps one projection. Earlier tasks' blocks are frozen buffers; the current block trains.

    Frozen blocks are stored ready for the two matrix products: `past_down` (T_old*r, d_in) stacks
    the A matrices, `past_up` (d_out, T_old*r) places B_j in columns j*r:(j+1)*r.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, routing: RoutingState):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._routing = routing  # plain attribute: not a submodule, not in the state dict
        d_in, d_out = base_layer.in_features, base_layer.out_features
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.register_buffer("past_down", torch.zeros(0, d_in, **factory))
        self.register_buffer("past_up", torch.zeros(d_out, 0, **factory))
        self.lora_A: nn.Parameter | None = None  # (r, d_in), current task
        self.lora_B: nn.Parameter | None = None  # (d_out, r)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def num_frozen(self) -> int:
        return self.past_down.shape[0] // self.r

    @property
    def num_blocks(self) -> int:
        return self.num_frozen + (self.lora_A is not None)

    @property
    def current_block_trains(self) -> bool:
        """A current block with a trainable part: both matrices, or lora_B alone (InfLoRA freezes lora_A)."""
        return self.lora_A is not None and (self.lora_A.requires_grad or self.lora_B.requires_grad)

    @property
    def past_A(self) -> torch.Tensor:
        """Frozen A matrices as (T_old, r, d_in) (a view)."""
        return self.past_down.view(self.num_frozen, self.r, self.in_features)

    @property
    def past_B(self) -> torch.Tensor:
        """Frozen B matrices as (T_old, d_out, r) (a view)."""
        return self.past_up.view(self.out_features, self.num_frozen, self.r).permute(1, 0, 2)

    def set_frozen_blocks(self, past_A: torch.Tensor, past_B: torch.Tensor) -> None:
        """Replace the frozen blocks: A (T, r, d_in), B (T, d_out, r)."""
        self.past_down = past_A.to(self.past_down).flatten(0, 1).contiguous()
        self.past_up = past_B.to(self.past_up).permute(1, 0, 2).flatten(1).contiguous()

    def add_block(self, generator: torch.Generator | None = None) -> None:
        """Start a new trainable block: A Kaiming-uniform (a=sqrt(5)), B zeros, so it starts as a no-op.
        A is drawn on the CPU from `generator` (default: the global stream), so a seed gives the same
        block on every device."""
        if self.lora_A is not None:
            raise RuntimeError("freeze the current block before adding a new one")
        device = self.past_down.device
        lora_A = torch.empty(self.r, self.in_features)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(lora_A.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device))

    def freeze_block(self) -> None:
        """Move the current block into the frozen stack (no gradient, no optimizer state)."""
        if self.lora_A is None:
            return
        with gathered([self.lora_A, self.lora_B]):
            self.append_frozen_block(self.lora_A.data.clone(), self.lora_B.data.clone())
        self.lora_A = self.lora_B = None

    def thaw_block(self) -> None:
        """Make the newest frozen block trainable again (methods that keep training one block)."""
        if self.lora_A is not None or not self.num_frozen:
            raise RuntimeError("no frozen block to thaw")
        keep = (self.num_frozen - 1) * self.r
        self.lora_A = nn.Parameter(self.past_down[keep:].clone())
        self.lora_B = nn.Parameter(self.past_up[:, keep:].clone())
        self.past_down, self.past_up = self.past_down[:keep].contiguous(), self.past_up[:, :keep].contiguous()

    def append_frozen_block(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        if lora_A.shape != (self.r, self.in_features) or lora_B.shape != (self.out_features, self.r):
            raise ValueError(
                f"block shapes {tuple(lora_A.shape)}/{tuple(lora_B.shape)} do not fit a rank-{self.r} "
                f"{self.in_features}->{self.out_features} projection"
            )
        self.past_down = torch.cat([self.past_down, lora_A.to(self.past_down)])
        self.past_up = torch.cat([self.past_up, lora_B.to(self.past_up)], dim=1)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All blocks, oldest first, in product layout: down (T*r, d_in), up (d_out, T*r)."""
        if self.lora_A is None:
            return self.past_down, self.past_up
        return torch.cat([self.past_down, self.lora_A]), torch.cat([self.past_up, self.lora_B], dim=1)

    def stacked_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All blocks, oldest first: A (T, r, d_in), B (T, d_out, r)."""
        down, up = self.matrices()
        blocks = down.shape[0] // self.r
        return down.view(blocks, self.r, -1), up.view(up.shape[0], blocks, self.r).permute(1, 0, 2)

    def block(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.stacked_blocks()
        return A[index], B[index]

    def product_matrices(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`matrices()` in `dtype`, for products that need no gradient of the blocks. They are kept for
        the rest of the routed pass, so decoding does not re-concatenate (and re-cast) every block at
        every new token."""
        # Any replaced or updated block (a new tensor, or an in-place step) invalidates the entry.
        stamp = tuple((id(t), t._version) for t in (self.past_down, self.past_up, self.lora_A, self.lora_B) if t is not None)
        key = (id(self), dtype)
        cached = self._routing.matrix_cache.get(key)
        if cached is None or cached[0] != stamp:
            with torch.no_grad():
                down, up = self.matrices()
                cached = self._routing.matrix_cache[key] = (stamp, down.to(dtype), up.to(dtype))
        return cached[1], cached[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        num_blocks = self.num_blocks
        if num_blocks == 0:
            return out
        weights = self._routing.per_rank(x.shape[0], self.r, self.scaling, x.dtype)  # (B, T*r)
        if weights.shape[1] != num_blocks * self.r:
            raise RuntimeError(f"{weights.shape[1] // self.r} routing weights for {num_blocks} blocks")
        weights = weights.view(weights.shape[0], *([1] * (x.dim() - 2)), -1)
        if torch.is_grad_enabled() and self.current_block_trains:
            # Training: the same two products, with weight gradients for the current block only.
            dtype = x.dtype
            hidden = _PartlyFrozenLinear.apply(self.dropout(x), self.past_down.to(dtype), self.lora_A.to(dtype), 0)
            hidden = hidden * weights
            return out + _PartlyFrozenLinear.apply(hidden, self.past_up.to(dtype), self.lora_B.to(dtype), 1)
        down, up = self.product_matrices(x.dtype)
        # (..., d_in) @ (d_in, T*r) -> (..., T*r): every block's down-projection at once; each block's
        # slice is scaled by its routing weight (and alpha/r); then all blocks go up in one product.
        hidden = F.linear(self.dropout(x), down) * weights
        return out + F.linear(hidden, up)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, blocks={self.num_blocks}"
