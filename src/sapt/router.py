"""Shared Attentive Learning & Selection: one routing distribution per input (docs/methods.md).

    e(x) = max over the prompt's positions of E(x)
    q(x) = LayerNorm(SiLU(W_up W_down e(x)))
    s(x) = <k_j, q(x)> / tau
    a(x) = softmax_j s(x),   log a(x) = log_softmax_j s(x)

This module computes all of it: which positions are pooled, the pooling, the scores, the weights and
the log-weights. Weights and log-weights both derive from `routing_logits`, so the distribution ARM's
KL and the own-block loss compare is the one the forward mixes the blocks with (sapt.model).
"""

from __future__ import annotations

import torch
from torch import nn

from .utils.zero3 import gathered

IGNORE_INDEX = -100  # the label of a position that is not predicted (prompt, padding): HF's convention


def pooled_positions(
    attention_mask: torch.Tensor | None, labels: torch.Tensor | None, *, pool_padding: bool, decoder_only: bool
) -> torch.Tensor | None:
    """Positions that enter the max-pool: real prompt tokens (never padding or, for decoder-only
    models, the label tokens appended to the prompt during training). None: every position."""
    mask = None if pool_padding else attention_mask
    if labels is not None and decoder_only:
        prompt = labels.eq(IGNORE_INDEX)
        prompt = prompt if mask is None else mask.bool() & prompt
        # A row trained on its whole sequence (labels == input_ids) has no prompt: pool all of it.
        has_prompt = prompt.any(dim=1, keepdim=True)
        fallback = torch.ones_like(prompt) if mask is None else mask.bool()
        mask = torch.where(has_prompt, prompt, fallback)
    return mask


def max_pool(embeddings: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, d) -> (B, d), ignoring positions where mask is 0 (pass None to pool over everything)."""
    if mask is None:
        return embeddings.amax(dim=1)
    keep = mask.bool().unsqueeze(-1)
    lowest = torch.finfo(embeddings.dtype).min
    return embeddings.masked_fill(~keep, lowest).amax(dim=1)


def routing_logits(router: Router, embeddings: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) scores s(x) of the embeddings (B, L, d) max-pooled over `mask` (pooled_positions), blocks
    oldest first: what both the weights and the log-weights are taken from."""
    return router(max_pool(embeddings, mask))


def to_weights(logits: torch.Tensor) -> torch.Tensor:
    """a(x): the routing distribution over blocks of routing_logits' scores."""
    return logits.softmax(dim=-1)


def to_log_weights(logits: torch.Tensor) -> torch.Tensor:
    """log a(x), computed stably from the same scores (what ARM's KL and the own-block loss read)."""
    return logits.log_softmax(dim=-1)


class Router(nn.Module):
    """Query network shared across tasks plus one key per task (frozen keys oldest first, then the current)."""

    def __init__(self, hidden_size: int, query_dim: int = 100, temperature: float = 1.0):
        super().__init__()
        # Index layout (0 down, 1 up, 2 SiLU, 3 LayerNorm) matches the release's `trans_input` state dict.
        self.query_net = nn.Sequential(
            nn.Linear(hidden_size, query_dim, bias=False),
            nn.Linear(query_dim, hidden_size, bias=False),
            nn.SiLU(),
            nn.LayerNorm(hidden_size),
        )
        self.temperature = temperature
        self.register_buffer("past_keys", torch.zeros(0, hidden_size))  # (T_old, d)
        self.key: nn.Parameter | None = None  # (d,), the current task's

    @property
    def num_keys(self) -> int:
        return self.past_keys.shape[0] + (self.key is not None)

    def add_key(self, generator: torch.Generator | None = None) -> None:
        """A new key, U(-1, 1), drawn on the CPU from `generator` (default: the global stream)."""
        if self.key is not None:
            raise RuntimeError("freeze the current key before adding a new one")
        key = torch.empty(self.past_keys.shape[1]).uniform_(-1, 1, generator=generator)
        self.key = nn.Parameter(key.to(self.past_keys.device))

    def freeze_key(self) -> None:
        if self.key is not None:
            with gathered([self.key]):
                self.append_frozen_keys(self.key.data[None].clone())
            self.key = None

    def append_frozen_keys(self, keys: torch.Tensor) -> None:
        self.past_keys = torch.cat([self.past_keys, keys.to(self.past_keys)])

    def keys(self) -> torch.Tensor:
        """(T, d), oldest first."""
        if self.key is None:
            return self.past_keys
        return torch.cat([self.past_keys, self.key[None]])

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, d) pooled embeddings -> (B, T) attention scores <k_j, q(x)> / tau. Called as a module
        (not through a helper method) so that DeepSpeed ZeRO-3 gathers the current key first."""
        query = self.query_net(pooled.to(self.query_net[0].weight.dtype))
        return query @ self.keys().T / self.temperature
