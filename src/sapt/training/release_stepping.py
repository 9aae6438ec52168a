"""The release's LLaMA optimizer stepping: one optimizer application per backward, not per step.

The release backpropagates CE, then separately the KL of each earlier task, every micro-batch (from
its second optimizer step on). Under accelerate 0.24.1 with DeepSpeed every `accelerator.backward`
also calls the engine's `step()`; DeepSpeed counts each call as a micro-step, scales each backward by
1/GA, and applies the optimizer (clipping first, zeroing after) when (micro_steps + 1) % GA == 0. So
at task t the optimizer steps t times per nominal step, each time on 1/GA of the sum of the last GA
backward terms. This module replays that counting in one process, inside the stock Trainer: the
Trainer's own once-per-step `optimizer.step()` does nothing (NominalStepOptimizer), and
PerBackwardStepping applies the real optimizer as DeepSpeed would.

The Trainer still steps its learning-rate schedule once per nominal step (the release's DeepSpeed
engine stepped it per application); with the release's constant schedule the two are the same. Each
nominal step holds GA micro-batches of the same number of terms, so applications end exactly at its
end; only a short last step of an epoch (the project's own schedule, not the release's) leaves terms
over, and the Trainer's zero_grad drops them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..utils.fileio import write_json_atomic

STEPPING_FILE = "release_stepping.json"


class NominalStepOptimizer(torch.optim.Optimizer):
    """What the Trainer steps once per nominal step: nothing. It shares the real optimizer's parameter
    groups and state (the scheduler sets their learning rates, checkpoints save and load them);
    PerBackwardStepping applies the real one."""

    def __init__(self, inner: torch.optim.Optimizer):
        super().__init__([{"params": group["params"]} for group in inner.param_groups], inner.defaults)
        self.inner = inner
        self.param_groups = inner.param_groups
        self.state = inner.state

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)


class PerBackwardStepping:
    """Backward calls counted as DeepSpeed micro-steps, the optimizer applied at each boundary.

    `training_step` replaces SaptTrainer's for one micro-batch: CE (as the trainer computes it), then
    each weighted extra term (one per earlier task for ARM) as its own backward; a term that returns
    None is not active at this position (no backward, no micro-step)."""

    def __init__(self, accumulation_steps: int, max_grad_norm: float):
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.micro_steps = 0  # backward calls so far in this task (DeepSpeed's counter)
        self.applications = 0  # optimizer applications so far
        self.optimizer: torch.optim.Optimizer | None = None

    def take_over(self, optimizer: torch.optim.Optimizer) -> NominalStepOptimizer:
        """Keep the real optimizer; give the Trainer one whose step does nothing."""
        if isinstance(optimizer, NominalStepOptimizer):
            return optimizer
        self.optimizer = optimizer
        return NominalStepOptimizer(optimizer)

    def training_step(self, trainer, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = trainer._prepare_inputs(inputs)
        with trainer.compute_loss_context_manager():
            cross_entropy = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        self._backward(trainer, model, cross_entropy)
        total = cross_entropy.detach()
        sapt_model = trainer.accelerator.unwrap_model(model)
        position = trainer._next_position()
        for term in trainer.regularizers:
            with trainer.compute_loss_context_manager():
                value = term.fn(sapt_model, position, inputs)
            if value is None:
                continue
            trainer.term_log.add(term.name, value)
            scaled = term.weight * value / self.accumulation_steps  # DeepSpeed scales every backward by 1/GA
            self._backward(trainer, model, scaled)
            total = total + scaled.detach()
        return total

    def _backward(self, trainer, model, loss: torch.Tensor) -> None:
        trainer.accelerator.backward(loss)
        if (self.micro_steps + 1) % self.accumulation_steps == 0:
            self._apply(model)
        self.micro_steps += 1

    def _apply(self, model) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if self.max_grad_norm and self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.applications += 1

    # A checkpoint part (SaptTrainer.checkpoint_parts): the counter survives a resume.
    def save(self, directory) -> None:
        write_json_atomic(
            Path(directory) / STEPPING_FILE, {"micro_steps": self.micro_steps, "applications": self.applications}
        )

    def load(self, directory) -> None:
        path = Path(directory) / STEPPING_FILE
        if path.is_file():
            state = json.loads(path.read_text())
            self.micro_steps, self.applications = int(state["micro_steps"]), int(state["applications"])
