"""Router pretraining, a remedy that is off by default (docs/router.md): before task t trains, train the
router alone for a number of optimizer steps on SAPT's routing terms, without the language model.

The routing terms (ARM's KL on earlier tasks' pseudo inputs, the own-block loss on the task's training
prompts) read only embeddings -> router, so a step costs milliseconds. On SmolLM2 the router needs a
few hundred steps to separate tasks whose pooled embeddings share most of their direction, while the
blocks learn a task in a few dozen; pretraining gives the router its steps before the block trains,
so the block learns under the routing it will be used with (its up-projection starts at zero: the
router can send the task's inputs to it without changing any output yet).

Deterministic: batches follow a seeded shuffle of the training prompts and ARM's windows follow the
step number, so a task restarted from scratch pretrains to the same router. A resumed task skips it:
its checkpoint already holds the pretrained router.
"""

from __future__ import annotations

import logging

import torch

from .trainer import LossTerm, StepPosition

logger = logging.getLogger(__name__)


def prompt_batches(dataset, collator, batch_size: int, steps: int, seed: int):
    """`steps` batches of prompts in epochs of a seeded shuffle."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(dataset), generator=generator).tolist()
        rows, order = order[:batch_size], order[batch_size:]
        yield collator([dataset[i] for i in rows])


def pretrain_router(
    model, terms: list[LossTerm], dataset, collator, *, steps: int, batch_size: int, learning_rate: float,
    weight_decay: float, seed: int,
) -> list[float]:
    """Train the router's trainable parameters (query network, new key) for `steps` AdamW steps on the
    weighted sum of `terms`, each called as fn(model, StepPosition(step, ...), prompts). Returns the
    loss of every step. The blocks are not touched (the terms give them no gradient)."""
    params = [p for name, p in model.trainable_parameters() if name.startswith("router.")]
    if not params or not terms:
        return []
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    losses = []
    for step, batch in enumerate(prompt_batches(dataset, collator, batch_size, steps, seed)):
        batch = {k: v.to(model.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        position = StepPosition(step, 0, 1, 0, 1)
        loss = sum(term.weight * value for term in terms if (value := term.fn(model, position, batch)) is not None)
        if not isinstance(loss, torch.Tensor):
            continue  # every term inactive at this step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for param in params:
        param.grad = None
    if losses:
        logger.info("router pretrained for %d steps: loss %.4f -> %.4f", len(losses), losses[0], losses[-1])
    return losses
