"""Attentive Reflection Module (docs/methods.md): keep old tasks' pseudo inputs routed as they were.

For every earlier task i, a batch of its pseudo inputs goes through embeddings -> router only, and
    L_KL^i = KL(target_i || softmax(s(x)))
pulls its routing towards ā_i, the mean routing over task i's dev inputs when task i ended, with
zeros for the blocks of tasks newer than i.

What one optimizer step sees: for each earlier task, the step's window of `global batch` consecutive
rows of its pseudo set, read as an endless cycle (step k takes rows k·G .. k·G + G - 1, modulo the set's
size, G = per-device batch × processes × accumulation steps), and its term is the mean KL over that
window. Each micro-batch of each process takes its own slice of the window, so one process with the
whole batch, N processes with 1/N of it, and gradient accumulation all take the same step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .router import to_log_weights


def arm_target(routing_mean: list[float], num_blocks: int, floor: float = 0.0) -> torch.Tensor:
    """ā_i (oldest block first, length i) padded with zeros for the num_blocks - i newer blocks, then
    mixed with the uniform distribution: (1 - floor) · target + floor / num_blocks.

    floor 0 is the paper's target. With floor > 0 the KL is minimal at finite routing logits: a target
    with zeros has no minimum, and on inputs that share most of their pooled embedding the cheapest way
    down that endless slope moves every input's routing alike (docs/router.md)."""
    if len(routing_mean) > num_blocks:
        raise ValueError(f"ā over {len(routing_mean)} blocks cannot target a model of {num_blocks}")
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"the target floor must be in [0, 1), got {floor}")
    target = torch.tensor(list(routing_mean) + [0.0] * (num_blocks - len(routing_mean)))
    return (1.0 - floor) * target + floor / num_blocks


@torch.no_grad()
def mean_routing(model, dataset, collator, batch_size: int) -> list[float]:
    """ā: the mean routing distribution over the examples of `dataset` (a task's dev inputs when the
    task ends), oldest block first; what ARM later pulls the task's pseudo inputs towards.

    Under several processes each takes every world_size-th example and the sums are added up, so
    every process gets the mean over all of them. Shards are padded to one length (the padding
    counts zero) because under ZeRO-3 every process must run the same number of forwards."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = list(range(rank, len(dataset), world))
    length = -(-len(dataset) // world)
    counted = [1.0] * len(shard) + [0.0] * (length - len(shard))
    shard += [0] * (length - len(shard))
    total = torch.zeros(model.num_blocks, dtype=torch.float64, device=model.device)
    for start in range(0, length, batch_size):
        batch = collator([dataset[i] for i in shard[start : start + batch_size]])
        weights = model.routing_weights(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
        keep = torch.tensor(counted[start : start + batch_size], dtype=torch.float64, device=model.device)
        total += (weights.double() * keep[:, None]).sum(0)
    if world > 1:
        dist.all_reduce(total)
    return (total / len(dataset)).float().tolist()


def window_rows(num_rows: int, batch_size: int, position) -> list[int]:
    """The pseudo rows of one micro-batch of one process: its slice of the step's window.

    `position` is a trainer.StepPosition; slices follow micro-batch, then process, so the union over a
    step's slices is one window of batch_size × processes × accumulation consecutive rows."""
    global_batch = batch_size * position.world_size * position.accumulation_steps
    share = position.micro_batch * position.world_size + position.rank
    start = position.step * global_batch + share * batch_size
    return [(start + k) % num_rows for k in range(batch_size)]


class AttentiveReflection:
    """The ARM term: one pseudo batch per earlier task per micro-batch, chosen by the step position.

    Stateless: the rows depend only on where training is, so a resumed run sees the same pseudo rows
    as an uninterrupted one.
    """

    def __init__(
        self, pseudo_sets, routing_means: list[list[float]], collator, batch_size: int, num_blocks: int, *,
        first_step: int = 0, target_floor: float = 0.0,
    ):
        """No term before optimizer step `first_step` (a warm-up: the new block learns before ARM pulls the
        router); `target_floor` mixes every target with the uniform distribution (arm_target)."""
        if len(pseudo_sets) != len(routing_means):
            raise ValueError("one pseudo set per routing mean")
        empty = [i for i, rows in enumerate(pseudo_sets) if len(rows) == 0]
        if empty:
            raise ValueError(f"pseudo set {empty[0]} is empty")
        self.targets = [arm_target(mean, num_blocks, target_floor) for mean in routing_means]
        self.pseudo_sets = pseudo_sets
        self.collator = collator
        self.batch_size = batch_size
        self.first_step = first_step

    def loss(self, model, position) -> torch.Tensor | None:
        """Σ_i KL(target_i || a(x̃_i)), each averaged over this micro-batch's pseudo rows (None: no term here)."""
        if position.step < self.first_step:
            return None
        total = 0.0
        for task in range(len(self.pseudo_sets)):
            total = total + self.task_loss(task, model, position)
        return total

    def task_loss(self, task: int, model, position) -> torch.Tensor | None:
        """KL(target_task || a(x̃)) averaged over this micro-batch's pseudo rows of earlier task `task`."""
        if position.step < self.first_step:
            return None
        rows = self.pseudo_sets[task]
        batch = self.collator([rows[i] for i in self.rows(task, position)])
        return self.kl(model, batch, self.targets[task])

    def rows(self, task: int, position) -> list[int]:
        """The pseudo rows of earlier task `task` this micro-batch reads: its slice of the step's window."""
        return window_rows(len(self.pseudo_sets[task]), self.batch_size, position)

    def kl(self, model, batch: dict, target: torch.Tensor) -> torch.Tensor:
        """KL(target || a(x)) averaged over the batch's inputs, a(x) the routing of the model's forward
        (sapt.router: pooled over the inputs' real tokens)."""
        mask = batch["attention_mask"].to(model.device)
        log_weights = to_log_weights(model.routing_logits(batch["input_ids"].to(model.device), mask))  # (B, T)
        return F.kl_div(log_weights, target.to(log_weights).expand_as(log_weights), reduction="batchmean")
