"""Attentive Reflection Module (SPEC 2.2): keep old tasks' pseudo inputs routed as they were.

For every earlier task i, a batch of its pseudo inputs goes through embeddings -> router only, and
    L_KL^i = KL(target_i || softmax(s(x)))
pulls its routing towards ā_i, the mean routing over task i's dev inputs when task i ended, with
zeros for the blocks of tasks newer than i.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .io import write_json_atomic

STATE_FILE = "reflection_state.json"


def arm_target(routing_mean: list[float], num_blocks: int) -> torch.Tensor:
    """ā_i (oldest block first, length i) padded with zeros for the num_blocks - i newer blocks."""
    if len(routing_mean) > num_blocks:
        raise ValueError(f"ā over {len(routing_mean)} blocks cannot target a model of {num_blocks}")
    return torch.tensor(list(routing_mean) + [0.0] * (num_blocks - len(routing_mean)))


class AttentiveReflection:
    """Draws one pseudo batch per earlier task per call, cycling through each pseudo set.

    The position in the cycle is a plain counter saved with Trainer checkpoints, so a resumed run
    sees the same pseudo batches as an uninterrupted one.
    """

    def __init__(self, pseudo_sets, routing_means: list[list[float]], collator, batch_size: int, num_blocks: int):
        if len(pseudo_sets) != len(routing_means):
            raise ValueError("one pseudo set per routing mean")
        self.targets = [arm_target(mean, num_blocks) for mean in routing_means]
        # Pseudo sets are small (2% of a task): collate every batch once.
        self._batches = [
            list(DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)) for dataset in pseudo_sets
        ]
        self.calls = 0

    def save(self, directory: str | Path) -> None:
        write_json_atomic(Path(directory) / STATE_FILE, {"calls": self.calls})

    def load(self, directory: str | Path) -> None:
        path = Path(directory) / STATE_FILE
        if path.is_file():
            self.calls = int(json.loads(path.read_text())["calls"])

    def loss(self, model) -> torch.Tensor:
        """Σ_i KL(target_i || a(x̃_i)), each averaged over its batch."""
        total = 0.0
        for batches, target in zip(self._batches, self.targets):
            batch = batches[self.calls % len(batches)]
            logits = model.routing_logits(
                batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
            )  # (B, T)
            log_probs = logits.log_softmax(dim=-1)
            expanded = target.to(log_probs).expand_as(log_probs)
            total = total + F.kl_div(log_probs, expanded, reduction="batchmean")
        self.calls += 1
        return total
