"""Mid-task Trainer checkpoints without pickle, and finding the one to resume from.

The stock Trainer writes its checkpoints with torch.save (pickle) and holds the whole model in them.
`PickleFreeCheckpoints` overrides the Trainer's private save/load hooks so that a checkpoint holds
only the trainable tensors (safetensors), the optimizer, scheduler, loss scaler and random-generator
states (sapt.utils.state_files: safetensors + JSON), and the state of the parts that must survive a resume
(model selection, the release's stepping). These hooks are transformers' internals (`_save`,
`_load_from_checkpoint`, `_save_optimizer_and_scheduler`, ...): this file is where an upgrade of
transformers must look.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..utils.fileio import WriteError, save_tensors_atomic
from ..utils.state_files import load_state, save_state, state_exists
from ..utils.zero3 import gathered

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_STATE, SCHEDULER_STATE, SCALER_STATE, RNG_STATE = "optimizer", "scheduler", "scaler", "rng_state"

logger = logging.getLogger(__name__)


def trainable_tensors(model) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters, whole even when ZeRO-3 partitions them (every process calls)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with gathered(params.values()):
        return {name: p.detach().clone() for name, p in params.items()}


def load_trainable_tensors(model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with gathered([params[name] for name in tensors], modify=True), torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


class PickleFreeCheckpoints:
    """Trainer mixin (listed before `Trainer`): light, pickle-free checkpoints. The subclass sets
    `checkpoint_parts` (objects with save(dir)/load(dir)) and `writes_checkpoints`."""

    checkpoint_parts: list
    writes_checkpoints: bool

    def _save(self, output_dir=None, state_dict=None):
        output_dir = Path(output_dir or self.args.output_dir)
        tensors = trainable_tensors(self.accelerator.unwrap_model(self.model))  # every process (ZeRO-3)
        if self.args.should_save:
            save_tensors_atomic(output_dir / TRAINABLE_FILE, tensors)
            for part in self.checkpoint_parts:
                part.save(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.accelerator.unwrap_model(model or self.model)
        load_trainable_tensors(model, load_file(str(Path(resume_from_checkpoint) / TRAINABLE_FILE)))
        for part in self.checkpoint_parts:
            part.load(resume_from_checkpoint)

    def _save_checkpoint(self, model, trial):
        """Also when a callback (a signal, an epoch) asks for one. A checkpoint that cannot be written
        whole (a full disk) is removed, the previous one stays, and a WriteError names what failed."""
        if not self.writes_checkpoints:
            return
        before = set(checkpoint_folders(Path(self.args.output_dir)))
        try:
            super()._save_checkpoint(model, trial)
        except OSError as err:
            new = sorted(set(checkpoint_folders(Path(self.args.output_dir))) - before)
            if self.args.should_save:
                for folder in new:
                    shutil.rmtree(folder, ignore_errors=True)
            if isinstance(err, WriteError):
                raise
            where = new[0] if new else Path(self.args.output_dir)  # the Trainer's own files: trainer_state.json
            raise WriteError(where, err.strerror or str(err), err.errno) from err

    # The Trainer would torch.save (pickle) these; here they are safetensors + JSON (sapt.utils.state_files).
    def _save_optimizer_and_scheduler(self, output_dir):
        if self.args.should_save:
            save_state(Path(output_dir) / OPTIMIZER_STATE, self.optimizer.state_dict())
            save_state(Path(output_dir) / SCHEDULER_STATE, self.lr_scheduler.state_dict())

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or self.is_deepspeed_enabled:
            return
        self.optimizer.load_state_dict(load_state(Path(checkpoint) / OPTIMIZER_STATE))
        self.lr_scheduler.load_state_dict(load_state(Path(checkpoint) / SCHEDULER_STATE))

    def _save_scaler(self, output_dir):
        scaler = getattr(self.accelerator, "scaler", None)  # fp16 loss scaling only
        if scaler is not None and self.args.should_save:
            save_state(Path(output_dir) / SCALER_STATE, scaler.state_dict())

    def _load_scaler(self, checkpoint):
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and state_exists(Path(checkpoint) / SCALER_STATE):
            scaler.load_state_dict(load_state(Path(checkpoint) / SCALER_STATE))

    def _save_rng_state(self, output_dir):
        """Every process keeps its own generators' states (data order, dropout)."""
        states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.random.get_rng_state_all()
        Path(output_dir).mkdir(parents=True, exist_ok=True)  # another process may not have made it yet
        save_state(Path(output_dir) / f"{RNG_STATE}_{self.args.process_index}", states)

    def _load_rng_state(self, checkpoint):
        if checkpoint is None:
            return
        stem = Path(checkpoint) / f"{RNG_STATE}_{self.args.process_index}"
        if not state_exists(stem):
            logger.warning("%s: no random-generator state for process %d; the resumed run's randomness differs",
                           checkpoint, self.args.process_index)
            return
        states = load_state(stem)
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if torch.cuda.is_available() and "cuda" in states:
            torch.cuda.random.set_rng_state_all(states["cuda"])


# ---- the checkpoint folders of a task's output folder -------------------------------------------
def checkpoint_folders(output_dir: Path) -> list[Path]:
    """The Trainer's numbered checkpoint folders in `output_dir`."""
    return [f for f in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if f.name.rsplit("-", 1)[-1].isdigit()]


def latest_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest Trainer checkpoint whose trainer_state.json (written last, and not atomically by the
    Trainer) is whole; a folder a kill cut short is removed rather than resumed from."""
    if not output_dir.is_dir():
        return None
    numbered = []
    for folder in checkpoint_folders(output_dir):
        if _is_whole_json(folder / TRAINER_STATE_NAME):
            numbered.append((int(folder.name.rsplit("-", 1)[-1]), folder))
        else:
            logger.warning("removing %s: its writing was interrupted", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return str(max(numbered)[1]) if numbered else None


def _is_whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
        return True
    except (OSError, ValueError):  # missing, or cut short
        return False


def remove_checkpoints(output_dir: Path) -> None:
    """Remove the Trainer checkpoints of a finished task (its artifacts are all a later task needs)."""
    for checkpoint in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer step a Trainer checkpoint was written at."""
    return int(json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())["global_step"])
