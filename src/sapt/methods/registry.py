"""What each continual-learning method is: one record per method, read by everything that depends on it.

The records are plain data (no import of the model or of torch), so `sapt.config` reads them below the model.
What a method adds in code (loss terms, hooks around a task's training) is named by its import path
("module:attribute") and imported when a task step needs it (`resolve`). Adding a method: docs/methods.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import Enum


class TrainsOn(Enum):
    """Which tasks' training data a step of the method trains on."""

    OWN = "its own task"  # builds on the earlier tasks' folder, trains on the step's task
    OWN_AND_MEMORY = "its own task + a replay memory of the earlier tasks"  # a seeded 2% of each (--replay_ratio)
    LEARNED = "every task learned so far, jointly"  # one step, at the last task: the union of all
    ALONE = "its own task alone, starting afresh"  # each task its own model, tested on that task only


@dataclass(frozen=True)
class LossTermSpec:
    """An extra term of the training loss: `loss(model)` of the parameters alone, weighted by an argument."""

    name: str  # as the term log records it
    weight_argument: str  # the SaptArguments field holding its weight
    loss: str  # "module:function", called as function(model) -> scalar tensor


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    block_per_task: bool  # one LoRA block per task; False: one block, shared by every task
    routed: bool  # blocks mixed by the learned router (SALS); False: summed with weight 1
    trains_on: TrainsOn
    continues: bool  # after the first task, a step builds on the preceding task's folder
    reflection: bool = False  # ARM: the routing of earlier tasks' pseudo inputs is kept (needs pseudo data)
    loss_terms: tuple[LossTermSpec, ...] = ()  # added to CE while a task trains
    exportable: bool = False  # sapt.tools.export writes its blocks (routed blocks, one per task)
    hooks: str | None = None  # "module:Class" built with no arguments; before_training/after_training of a step
    task_tensor_files: tuple[str, ...] = ()  # "module:NAME" of the safetensors files its task folders hold

    @property
    def needs_pseudo_data(self) -> bool:
        """ARM reads pseudo inputs of every earlier task."""
        return self.reflection

    @property
    def replays(self) -> bool:
        return self.trains_on is TrainsOn.OWN_AND_MEMORY

    @property
    def joint(self) -> bool:
        """One step on the union of the tasks: only the last position of an order is trained."""
        return self.trains_on is TrainsOn.LEARNED

    @property
    def alone(self) -> bool:
        """Each task trained and tested alone: the reference of another run's FWT, no score matrix."""
        return self.trains_on is TrainsOn.ALONE

    def make_hooks(self):
        """The method's hooks around a task's training, or None."""
        return resolve(self.hooks)() if self.hooks else None


O_LORA_TERMS = (
    LossTermSpec("orthogonality", "orthogonal_weight", "sapt.o_lora:orthogonality_loss"),
    LossTermSpec("l2", "l2_weight", "sapt.o_lora:l2_loss"),
)

# The order is the order of every listing (--method choices, help, errors).
REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("sapt", "one block per task, mixed by the router's weights (SALS) + ARM", block_per_task=True,
           routed=True, trains_on=TrainsOn.OWN, continues=True, reflection=True, exportable=True),
    Method("o_lora", "one block per task, summed with weight 1 (+ orthogonality loss during training)",
           block_per_task=True, routed=False, trains_on=TrainsOn.OWN, continues=True, loss_terms=O_LORA_TERMS),
    Method("single", "one block trained on one task alone (the reference for FWT)", block_per_task=False,
           routed=False, trains_on=TrainsOn.ALONE, continues=False),
    Method("seq_lora", "one block, trained on the tasks in sequence", block_per_task=False, routed=False,
           trains_on=TrainsOn.OWN, continues=True),
    Method("replay", "seq_lora plus a small memory of earlier tasks' real examples", block_per_task=False,
           routed=False, trains_on=TrainsOn.OWN_AND_MEMORY, continues=True),
    Method("mtl", "one block on the union of all tasks (upper bound)", block_per_task=False, routed=False,
           trains_on=TrainsOn.LEARNED, continues=False),
    Method("inflora", "one block per task, summed with weight 1; its A designed outside the earlier tasks' input "
           "subspace and frozen (InfLoRA)", block_per_task=True, routed=False, trains_on=TrainsOn.OWN, continues=True,
           hooks="sapt.inflora:InfLoRAHooks", task_tensor_files=("sapt.inflora:SUBSPACE_FILE",)),
)}
METHOD_NAMES = tuple(REGISTRY)


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; use one of {', '.join(METHOD_NAMES)}") from None


def resolve(reference: str):
    """The object a "module:attribute" reference names."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)
