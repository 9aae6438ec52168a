"""A method's hooks around a task's training (sapt.methods.registry.Method.hooks): what they are given, and
what of theirs survives a resume.

A task step calls `before_training(model, batches, previous_dir, position, num_tasks)` once the new block
exists and before the Trainer is built, and `after_training(model, batches, task_dir, position, num_tasks)`
after training, before the task folder is final (sapt.training.train_task). `batches` are the first batches
of the task's training set, in order, made by the Trainer's own collator.

Resume: a hook may design and freeze tensors of the new block (InfLoRA's lora_A). The Trainer's checkpoints
hold trainable tensors only, so `FrozenBlockTensors` keeps the frozen ones beside them: a resumed task runs
`before_training` again (the hooks need its state), then the checkpoint puts back the tensors the task
started with, copied over the new design rather than added to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import load_file

from ..utils.fileio import save_tensors_atomic
from ..utils.zero3 import gathered
from .resume import load_trainable_tensors

FROZEN_BLOCK_FILE = "frozen_block.safetensors"  # in a Trainer checkpoint folder
BLOCK_PARAMETERS = (".lora_A", ".lora_B")  # the current block's parameters in the model's names


def training_batches(dataset, collator, batch_size: int, limit: int | None = None) -> Iterator[dict]:
    """The first `limit` batches (all when None) of `dataset` in its order, each made by `collator`: what the
    Trainer's batches hold, without its shuffling. A new iterator each call."""
    count = math.ceil(len(dataset) / batch_size)
    if limit is not None:
        count = min(count, limit)
    for start in range(0, count * batch_size, batch_size):
        yield collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


class FrozenBlockTensors:
    """Checkpoint part (save(dir)/load(dir), see SaptTrainer.checkpoint_parts): the frozen parameters of the
    current block, as they were when it was made, saved with every checkpoint and put back on resume."""

    def __init__(self, model):
        self.model = model
        frozen = {name: p for name, p in model.named_parameters()
                  if name.endswith(BLOCK_PARAMETERS) and not p.requires_grad}
        with gathered(frozen.values()):  # taken now, on every process (ZeRO-3 gathers collectively)
            self.tensors = {name: p.detach().clone() for name, p in frozen.items()}

    def save(self, directory) -> None:
        if self.tensors:
            save_tensors_atomic(Path(directory) / FROZEN_BLOCK_FILE, self.tensors)

    def load(self, directory) -> None:
        path = Path(directory) / FROZEN_BLOCK_FILE
        if path.is_file():
            self.tensors = load_file(str(path))
            load_trainable_tensors(self.model, self.tensors)  # by name; copies, whatever requires_grad says
