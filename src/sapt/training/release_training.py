"""Release-exact training: what a task step does with the switches of sapt.training.release_exact.

The release's training-step count and evaluation schedule, its stream of micro-batches, its
cross-entropy and its pseudo-row sampler; `ReleaseMode` gathers them for sapt.train_task (and the
tokenisation for sapt.evaluate). The per-backward optimizer stepping is in sapt.training.release_stepping.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from ..model import IGNORE_INDEX
from .release_exact import ReleaseArgumentError, ReleaseSwitches, resolve_switches

logger = logging.getLogger("sapt")


# ---- item 3: the release's step count and evaluation schedule --------------------------------------
RELEASE_EVAL_EVERY_EPOCHS = 5  # the release's scripts: evaluate and save every 5 epochs' worth of steps


@dataclass(frozen=True)
class ReleaseSchedule:
    """How many optimizer steps the release trains and where it evaluates, for one task.

    transformers 4.30 counts an optimizer step every GA micro-batches of one stream that runs on across
    epochs (its counter is never reset), trains floor(B/GA) * epochs steps (B: micro-batches per epoch
    per process) unless max_steps is given, evaluates every `eval_every` steps and never at the end."""

    batches_per_epoch: int  # B
    accumulation_steps: int  # GA
    total_steps: int
    eval_every: int

    @property
    def evaluation_steps(self) -> list[int]:
        return list(range(self.eval_every, self.total_steps + 1, self.eval_every))

    @property
    def epochs_streamed(self) -> int:
        """Epochs of micro-batches the stream needs for total_steps * GA of them."""
        return -(-self.total_steps * self.accumulation_steps // self.batches_per_epoch)


def release_schedule(
    num_examples: int,
    per_process_batch: int,
    processes: int,
    accumulation_steps: int,
    epochs: float,
    max_steps: int = -1,
    eval_every_epochs: int = RELEASE_EVAL_EVERY_EPOCHS,
) -> ReleaseSchedule:
    """The release's schedule for N examples, per-process batch b, p processes and GA."""
    batches = -(-num_examples // (per_process_batch * processes))  # a DistributedSampler pads to ceil(N/p)
    if batches <= accumulation_steps:
        # 4.30 then also steps at each epoch's end, with whatever accumulated: not reproduced here
        raise ReleaseArgumentError(
            f"release schedule: {num_examples} examples make {batches} micro-batches per epoch, not more than "
            f"the {accumulation_steps} accumulation steps; use more data or a smaller batch"
        )
    if max_steps > 0:
        total = max_steps
    else:
        total = math.ceil(epochs * (batches // accumulation_steps))
    eval_every = eval_every_epochs * -(-num_examples // (per_process_batch * processes * accumulation_steps))
    return ReleaseSchedule(batches, accumulation_steps, total, eval_every)


def epoch_batches(num_examples: int, per_process_batch: int, processes: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of the release's global micro-batches: a DistributedSampler permutation (seeded by
    seed + epoch, padded to a multiple of the processes), each process's share in order, and micro-batch
    j the j-th batch of every process put together (process 0 first). The last one may be smaller."""
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    padded = -(-num_examples // processes) * processes
    while len(order) < padded:
        order += order[: padded - len(order)]
    shares = [order[rank::processes] for rank in range(processes)]
    count = -(-len(shares[0]) // per_process_batch)
    size = per_process_batch
    return [[i for share in shares for i in share[j * size : (j + 1) * size]] for j in range(count)]


class ReleaseStream(torch.utils.data.Sampler):
    """A batch sampler over the epochs' micro-batches in one stream, cut at total_steps * GA of them."""

    def __init__(self, schedule: ReleaseSchedule, num_examples: int, per_process_batch: int, processes: int, seed: int):
        self.schedule = schedule
        self.arguments = (num_examples, per_process_batch, processes, seed)

    def __len__(self) -> int:
        return self.schedule.total_steps * self.schedule.accumulation_steps

    def __iter__(self):
        num_examples, batch, processes, seed = self.arguments
        left = len(self)
        for epoch in range(self.schedule.epochs_streamed):
            for micro_batch in epoch_batches(num_examples, batch, processes, seed, epoch):
                if left == 0:
                    return
                left -= 1
                yield micro_batch


class ReleaseEvaluation(TrainerCallback):
    """Evaluate (and save, when saving is on) every `every` optimizer steps, and never at the end."""

    def __init__(self, every: int, save: bool):
        self.every = every
        self.save = save

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            control.should_evaluate = True
            control.should_save = control.should_save or self.save
        return control


# ---- the release's cross-entropy ---------------------------------------------------------------------
def release_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, groups: int, decoder_only: bool) -> torch.Tensor:
    """Mean over `groups` equal slices of the micro-batch's rows (the release's processes) of each
    slice's mean over its label tokens. (B, L, V) logits, (B, L) labels."""
    if decoder_only:  # position i predicts token i + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    if labels.shape[0] % groups:
        raise ValueError(f"a micro-batch of {labels.shape[0]} rows does not split into {groups} processes")
    per_token = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    sums = per_token.sum(dim=1).view(groups, -1).sum(dim=1)
    counts = labels.ne(IGNORE_INDEX).sum(dim=1).view(groups, -1).sum(dim=1)
    return (sums / counts).mean()


@dataclass
class ReleaseTraining:
    """What SaptTrainer does differently in release-exact mode (each None: as the method describes)."""

    decoder_only: bool
    train_batches: ReleaseStream | None = None  # the release's micro-batch stream (eval_schedule)
    ce_groups: int | None = None  # CE as the mean of this many per-process means / GA (ce_mean_of_means)
    stepping: object | None = None  # a release_stepping.PerBackwardStepping (per_backward_steps)

    def cross_entropy(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        """This micro-batch's CE as the release's processes computed it (not yet divided by GA)."""
        if self.ce_groups == 1:
            return outputs.loss  # the model's own mean over the micro-batch's label tokens
        return release_cross_entropy(outputs.logits, labels, self.ce_groups, self.decoder_only)


# ---- the release's pseudo-row sampler ---------------------------------------------------------------
class ReshuffledPseudoRows:
    """The rows of each earlier task's pseudo batch as the release drew them.

    One torch generator seeded with the run's seed feeds one RandomSampler per earlier task (oldest
    first); each micro-batch that has ARM takes the next batch of every task in turn, and a task whose
    pass is used up starts a new one with a fresh permutation (drop_last off: the last batch of a pass
    may be smaller). torch's RandomSampler draws one permutation per pass plus an empty one when its
    pass ends, and those draws interleave across tasks in the order the batches were taken; this
    replays them. Stateless from the outside: the rows depend only on the micro-batch's position, so a
    resumed run draws what an uninterrupted one does (the permutations are recomputed from the seed)."""

    def __init__(self, set_sizes: list[int], batch_size: int, seed: int, first_step: int = 0):
        self.sizes = list(set_sizes)
        self.batch_size = batch_size
        self.first_step = first_step
        self._generator = torch.Generator().manual_seed(seed)
        self._passes: list[list[list[int]]] = [[] for _ in self.sizes]  # task -> pass -> permutation
        self._replayed = 0  # draws (micro-batches with ARM) already replayed

    def draw_index(self, position) -> int:
        """How many micro-batches with ARM came before this one (one process: rank 0)."""
        return (position.step - self.first_step) * position.accumulation_steps + position.micro_batch

    def rows(self, task: int, position) -> list[int]:
        draw = self.draw_index(position)
        while self._replayed <= draw:
            self._replay(self._replayed)
            self._replayed += 1
        size, batch = self.sizes[task], self.batch_size
        per_pass = -(-size // batch)
        permutation = self._passes[task][draw // per_pass]
        start = (draw % per_pass) * batch
        return permutation[start : start + batch]

    def _replay(self, draw: int) -> None:
        for task, size in enumerate(self.sizes):
            per_pass = -(-size // self.batch_size)
            at, number = draw % per_pass, draw // per_pass
            if at == 0:
                if number > 0 and size % self.batch_size == 0:
                    self._empty_draw(size)  # the used-up pass's sampler, asked once more
                self._passes[task].append(torch.randperm(size, generator=self._generator).tolist())
            if at == per_pass - 1 and size % self.batch_size:
                self._empty_draw(size)  # the short last batch: the sampler ran out while filling it

    def _empty_draw(self, size: int) -> None:
        torch.randperm(size, generator=self._generator)


# ---- one task's release-exact set-up (sapt.train_task) -----------------------------------------------
@dataclass
class ReleaseMode:
    """The switches of one task step, with what they need: how many of the release's processes this
    process stands for, the backbone family, and the evaluation period in epochs."""

    switches: ReleaseSwitches
    processes: int = 1
    decoder_only: bool = False
    eval_every_epochs: int = RELEASE_EVAL_EVERY_EPOCHS

    @classmethod
    def from_arguments(cls, args, is_encoder_decoder: bool) -> ReleaseMode:
        """From SaptArguments (release_exact, release_behaviours, release_processes, eval_every_epochs)."""
        switches = resolve_switches(args.release_exact, args.release_behaviours, is_encoder_decoder)
        return cls(switches, args.release_processes, not is_encoder_decoder,
                   args.eval_every_epochs or RELEASE_EVAL_EVERY_EPOCHS)

    def apply_to_arguments(self, args) -> None:
        """Behaviours the project already has a flag for."""
        if self.switches.pool_padding:
            args.pool_padding = True

    def collator_options(self, tokenizer) -> dict:
        """Collator fields for the release's LLaMA tokenisation (no BOS, BOS as padding, label truncation)."""
        options = {}
        if self.switches.no_bos:
            options.update(special_tokens=False, pad_token_id=tokenizer.bos_token_id)
        if self.switches.label_truncation:
            options["eos_survives_truncation"] = False
        return options

    def arm_batch_size(self, per_device_batch: int) -> int:
        """Every release process drew the same pseudo rows: ARM's batch is one process's share."""
        return per_device_batch // self.processes

    def reflection_options(self, pseudo_sizes: list[int], batch_size: int, seed: int, bf16: bool) -> dict:
        """AttentiveReflection options for the release's ARM."""
        first_step = 1 if self.switches.arm_from_second_step else 0
        options = {"first_step": first_step, "pool_all": self.switches.pseudo_rows}
        if self.switches.reshuffled_pseudo:
            options["rows"] = ReshuffledPseudoRows(pseudo_sizes, batch_size, seed, first_step).rows
        if self.switches.bf16_kl and bf16:
            options["autocast_dtype"] = torch.bfloat16
        return options

    def init_query_net(self, model, backbone_config, seed: int) -> None:
        """The release's LLaMA query network: N(0, initializer_range) linear layers (a new router only)."""
        if self.switches.query_init and model.router is not None:
            std = getattr(backbone_config, "initializer_range", 0.02)
            model.router.init_query_net_normal(std, torch.Generator().manual_seed(seed))

    def training(self, training_args, num_train: int) -> tuple[ReleaseTraining | None, TrainerCallback | None]:
        """SaptTrainer's release-exact part and the evaluation callback. Under eval_schedule this sets
        training_args.max_steps to the release's step count and turns the Trainer's own evaluation and
        saving off (the callback evaluates, and saves when saving was on, at the release's points)."""
        switches = self.switches
        if not (switches.eval_schedule or switches.ce_mean_of_means or switches.per_backward_steps):
            return None, None
        accumulation = training_args.gradient_accumulation_steps
        training = ReleaseTraining(decoder_only=self.decoder_only)
        if switches.ce_mean_of_means:
            training.ce_groups = self.processes
        if switches.per_backward_steps:
            from .release_stepping import PerBackwardStepping

            training.stepping = PerBackwardStepping(accumulation, training_args.max_grad_norm)
        if not switches.eval_schedule:
            return training, None
        per_process = training_args.per_device_train_batch_size // self.processes
        schedule = release_schedule(
            num_train, per_process, self.processes, accumulation, training_args.num_train_epochs,
            training_args.max_steps, self.eval_every_epochs,
        )
        seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
        training.train_batches = ReleaseStream(schedule, num_train, per_process, self.processes, seed)
        saves = training_args.save_strategy != SaveStrategy.NO
        training_args.max_steps = schedule.total_steps
        training_args.eval_strategy = IntervalStrategy.NO
        training_args.save_strategy = SaveStrategy.NO
        points = schedule.evaluation_steps
        shown = points if len(points) <= 5 else f"[{points[0]}, {points[1]}, ..., {points[-1]}] ({len(points)} points)"
        logger.info(
            "release schedule: %d steps, evaluation at %s (every %d), no final evaluation",
            schedule.total_steps, shown or "no step", schedule.eval_every,
        )
        return training, ReleaseEvaluation(schedule.eval_every, saves)
