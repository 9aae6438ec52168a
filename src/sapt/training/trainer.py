"""SaptTrainer: the stock Trainer plus the ARM loss, a router learning rate, generation for
evaluation, and light checkpoints holding only what trains (sapt.training.resume); the callbacks a task step
adds to it (model selection on dev, evaluation every n epochs, stopping on a signal)."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PrinterCallback, Trainer, TrainerCallback
from transformers.trainer_utils import SaveStrategy

from ..model import IGNORE_INDEX
from ..utils.fileio import save_tensors_atomic, write_json_atomic
from .resume import PickleFreeCheckpoints, load_trainable_tensors, trainable_tensors

BEST_FILE = "best_trainable.safetensors"
SELECTION_FILE = "selection.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossTerm:
    """An extra loss term: `weight * fn(model, position, inputs)` joins CE while training. `fn` returns
    None where it is inactive (ARM before its first step); `name` labels its values in the routing trace."""

    name: str
    weight: float
    fn: Callable


class TermLog:
    """Running means of CE and of every extra term's unweighted value since the last `take()`: what
    the routing trace records beside the routing itself. Kept with each checkpoint, so a resumed task
    records the same means as an uninterrupted one."""

    FILE = "term_log.json"

    def __init__(self):
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def save(self, directory) -> None:
        sums = {name: float(total) for name, total in self._sums.items()}
        write_json_atomic(Path(directory) / self.FILE, {"sums": sums, "counts": self._counts})

    def load(self, directory) -> None:
        path = Path(directory) / self.FILE
        if path.is_file():
            state = json.loads(path.read_text())
            self._sums, self._counts = state["sums"], state["counts"]

    def add(self, name: str, value: torch.Tensor) -> None:
        # Summed as tensors: reading a number would wait for the GPU at every micro-batch.
        self._sums[name] = self._sums.get(name, 0.0) + value.detach().float()
        self._counts[name] = self._counts.get(name, 0) + 1

    def take(self) -> dict[str, float]:
        means = {name: float(total) / self._counts[name] for name, total in self._sums.items()}
        self._sums, self._counts = {}, {}
        return means


@dataclass(frozen=True)
class StepPosition:
    """Where a training micro-batch sits: its optimizer step, its place among the step's micro-batches,
    and its process. Terms that draw their own data (ARM) use it to take their share of the step."""

    step: int
    micro_batch: int
    accumulation_steps: int
    rank: int
    world_size: int


class SaptTrainer(PickleFreeCheckpoints, Trainer):
    """The stock Trainer with weighted extra loss terms (LossTerm), each called as
    fn(model, StepPosition, inputs)."""

    def __init__(
        self,
        *args,
        generation_collator=None,
        regularizers: list[LossTerm] = (),
        router_learning_rate: float | None = None,
        generation_kwargs: dict | None = None,
        checkpoint_parts: list = (),
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.generation_collator = generation_collator
        self.regularizers = [term for term in regularizers if term.weight]
        self.term_log = TermLog()
        self.router_learning_rate = router_learning_rate
        self._micro_batch = (-1, 0)  # (optimizer step, micro-batches seen in it)
        self.generation_kwargs = generation_kwargs or {}
        # Objects with save(dir)/load(dir) whose state must survive a resume (model selection, ARM position).
        self.checkpoint_parts = list(checkpoint_parts) + [self.term_log]
        # Makes the Trainer count the label tokens of each optimizer step (compute_loss uses the count);
        # the model itself is never given that count.
        self.model_accepts_loss_kwargs = True
        # DeepSpeed's engine checkpoints are pickled and hold the whole frozen backbone: under
        # DeepSpeed none are written, and an interrupted task restarts from its beginning.
        self.writes_checkpoints = not self.is_deepspeed_enabled
        if not self.writes_checkpoints and self.args.save_strategy != SaveStrategy.NO:
            logger.warning("DeepSpeed: no mid-task checkpoints; an interrupted task restarts from its beginning")
            self.args.save_strategy = SaveStrategy.NO
        if self.pop_callback(PrinterCallback) is not None:  # without progress bars: the logs, as numbers
            self.add_callback(LogMetrics())

    # ---- loss ---------------------------------------------------------------------------------
    # The loss is normalised here, not by the model: CE becomes this micro-batch's share of the mean
    # over every label token of the whole optimizer step (all accumulation steps, all processes), so
    # one process with the global batch and N processes with 1/N of it take the same step. Extra
    # terms (ARM, O-LoRA) are per-batch means and are divided by the accumulation steps alike.
    loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """CE plus each weighted extra term (SAPT's ARM, O-LoRA's orthogonality, ...) while training."""
        outputs = model(**inputs)
        loss = outputs.loss  # mean over this micro-batch's label tokens
        if model.training:
            self.term_log.add("ce", loss)
            loss = self.add_terms(model, inputs, self.cross_entropy_share(outputs, inputs, num_items_in_batch))
        return (loss, outputs) if return_outputs else loss

    def cross_entropy_share(self, outputs, inputs, num_items_in_batch):
        """This micro-batch's CE as its share of the step's mean over every label token (the Trainer's
        count), or without a count its mean divided by the accumulation steps."""
        loss = outputs.loss
        if num_items_in_batch is None:
            return loss / self.current_gradient_accumulation_steps
        local_tokens = inputs["labels"].ne(IGNORE_INDEX).sum()
        loss = loss * local_tokens / num_items_in_batch
        if self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages the gradients over processes
        return loss

    def add_terms(self, model, inputs, loss):
        """`loss` plus each weighted extra term of this micro-batch, divided by the accumulation steps."""
        if not self.regularizers:
            return loss
        steps = self.current_gradient_accumulation_steps
        sapt_model = self.accelerator.unwrap_model(model)
        position = self._next_position()
        for term in self.regularizers:
            value = term.fn(sapt_model, position, inputs)
            if value is not None:  # None: inactive here (ARM before its first step)
                self.term_log.add(term.name, value)
                loss = loss + term.weight * value / steps
        return loss

    def _next_position(self) -> StepPosition:
        step, seen = self._micro_batch
        micro = seen if step == self.state.global_step else 0
        self._micro_batch = (self.state.global_step, micro + 1)
        return StepPosition(
            step=self.state.global_step, micro_batch=micro, accumulation_steps=self.args.gradient_accumulation_steps,
            rank=self.args.process_index, world_size=self.args.world_size,
        )

    def create_optimizer(self, model=None):
        if self.router_learning_rate is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        router, others = [], []
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                (router if name.startswith("router.query_net.") else others).append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        groups = [
            {"params": others, "weight_decay": self.args.weight_decay},
            {"params": router, "weight_decay": self.args.weight_decay, "lr": self.router_learning_rate},
        ]
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ---- evaluation by generation --------------------------------------------------------------
    def _generation_dataloader(self, build, dataset):
        collator, self.data_collator = self.data_collator, self.generation_collator
        try:
            return build(dataset)
        finally:
            self.data_collator = collator

    def get_eval_dataloader(self, eval_dataset=None):
        return self._generation_dataloader(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._generation_dataloader(super().get_test_dataloader, test_dataset)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Greedy (or configured) decoding; returns (None, generated ids, example indices)."""
        inputs = self._prepare_inputs(inputs)
        index = inputs.pop("example_index")
        sapt_model = self.accelerator.unwrap_model(model)
        generated = sapt_model.generate(**inputs, **self.generation_kwargs)
        if not sapt_model.config.is_encoder_decoder:
            generated = generated[:, inputs["input_ids"].shape[1] :]  # keep only the new tokens
        return None, generated, index


class LogMetrics(TrainerCallback):
    """The Trainer's logs (loss, dev scores, timings) as one JSON line each through this package's logger:
    numbers stay numbers (transformers' PrinterCallback, which this replaces, prints them as strings)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in logs.items() if k != "total_flos"}
            logger.info("step %d: %s", state.global_step, json.dumps(shown))


class KeepBestTrainable(TrainerCallback):
    """Model selection by a dev metric: snapshot the trainable tensors whenever the metric improves
    (earliest wins ties), and put the best snapshot back with `restore()`."""

    def __init__(self, model, metric: str):
        self.model = model
        self.metric_key = f"eval_{metric}"
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.last_eval_step: int | None = None
        self._snapshot: dict[str, torch.Tensor] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.last_eval_step = state.global_step
        score = (metrics or {}).get(self.metric_key)
        if score is None:
            return
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_step = score, state.global_step
            self._snapshot = trainable_tensors(self.model)

    def save(self, directory) -> None:
        """Keep the best snapshot with each Trainer checkpoint, so selection survives a resume."""
        if self._snapshot is not None:
            save_tensors_atomic(Path(directory) / BEST_FILE, self._snapshot)
        write_json_atomic(
            Path(directory) / SELECTION_FILE,
            {"best_score": self.best_score, "best_step": self.best_step, "last_eval_step": self.last_eval_step},
        )

    def load(self, directory) -> None:
        directory = Path(directory)
        if (directory / SELECTION_FILE).is_file():
            state = json.loads((directory / SELECTION_FILE).read_text())
            self.best_score, self.best_step = state["best_score"], state["best_step"]
            self.last_eval_step = state["last_eval_step"]
        if (directory / BEST_FILE).is_file():
            self._snapshot = load_file(str(directory / BEST_FILE))

    def restore(self) -> None:
        if self._snapshot is not None:
            load_trainable_tensors(self.model, self._snapshot)


class EveryNEpochs(TrainerCallback):
    """Evaluate (and optionally save) at the end of every n-th epoch, as the release's scripts do."""

    def __init__(self, every: int, save: bool = False):
        if every < 1:
            raise ValueError("evaluation period must be at least one epoch")
        self.every = every
        self.save = save

    def on_epoch_end(self, args, state, control, **kwargs):
        if round(state.epoch or 0) % self.every == 0:
            control.should_evaluate = True
            control.should_save = control.should_save or self.save
        return control


class StopOnSignal(TrainerCallback):
    """Ctrl-C or SIGTERM: finish the current step, save a resumable checkpoint (unless `save` is
    off), stop training."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM), save: bool = True):
        self.received: int | None = None
        self.save = save
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now, as without this handler
            self.uninstall()
            signal.raise_signal(signum)
        self.received = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = self.save
            control.should_training_stop = True
        return control

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
