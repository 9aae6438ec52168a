"""Release-exact training: what a task step does with the switches of sapt.training.release_exact.

The release's training-step count and evaluation schedule, its stream of micro-batches, its
cross-entropy (ReleaseTrainer), its ARM (ReleaseReflection: its pseudo-row sampler, pooling and
precision) and its query-network init. `ReleaseMode` is the release-exact recipe (sapt.training.recipe):
sapt.train_task chooses it once, with `training_recipe`, when any release behaviour is on, and the
default path never asks about the release again (sapt.evaluate reads its tokenisation). The
per-backward optimizer stepping is in sapt.training.release_stepping.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from ..model import IGNORE_INDEX
from ..reflection import AttentiveReflection
from ..router import to_log_weights
from .recipe import TrainingRecipe
from .release_exact import ReleaseArgumentError, ReleaseSwitches, resolve_switches
from .trainer import LossTerm, SaptTrainer

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
    """What the Trainer does differently in release-exact mode (each None: as the method describes)."""

    decoder_only: bool
    train_batches: ReleaseStream | None = None  # the release's micro-batch stream (eval_schedule)
    ce_groups: int | None = None  # CE as the mean of this many per-process means / GA (ce_mean_of_means)
    stepping: object | None = None  # a release_stepping.PerBackwardStepping (per_backward_steps)
    evaluation: ReleaseEvaluation | None = None  # evaluation at the release's points only (eval_schedule)

    def cross_entropy(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        """This micro-batch's CE as the release's processes computed it (not yet divided by GA)."""
        if self.ce_groups == 1:
            return outputs.loss  # the model's own mean over the micro-batch's label tokens
        return release_cross_entropy(outputs.logits, labels, self.ce_groups, self.decoder_only)


class ReleaseTrainer(SaptTrainer):
    """SaptTrainer training as the release did (`release`: a ReleaseTraining; None trains as SaptTrainer):
    its stream of micro-batches, its cross-entropy, and its per-backward optimizer stepping."""

    def __init__(self, *args, release: ReleaseTraining | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = release if release is not None else ReleaseTraining(decoder_only=False)
        if self.release.stepping is not None:
            self.checkpoint_parts.append(self.release.stepping)  # its micro-step counter survives a resume

    def cross_entropy_share(self, outputs, inputs, num_items_in_batch):
        if self.release.ce_groups is None:
            return super().cross_entropy_share(outputs, inputs, num_items_in_batch)
        return self.release.cross_entropy(outputs, inputs["labels"]) / self.args.gradient_accumulation_steps

    def add_terms(self, model, inputs, loss):
        if self.release.stepping is not None:  # the stepping backpropagates each term alone
            return loss
        return super().add_terms(model, inputs, loss)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.release.stepping is None:
            return super().training_step(model, inputs, num_items_in_batch)
        return self.release.stepping.training_step(self, model, inputs, num_items_in_batch)

    def get_train_dataloader(self):
        """The release's stream of micro-batches, when its schedule is on."""
        if self.release.train_batches is None:
            return super().get_train_dataloader()
        loader = DataLoader(
            self.train_dataset, batch_sampler=self.release.train_batches, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.release.stepping is not None:  # the Trainer's own once-per-step optimizer.step() does nothing
            self.optimizer = self.release.stepping.take_over(optimizer)
        return self.optimizer


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


class ReleaseReflection(AttentiveReflection):
    """ARM as the release computed it. `rows(task, position)` picks each pseudo batch's rows instead of the
    step's window (ReshuffledPseudoRows.rows); `pool_all` max-pools over every position (padding too);
    `autocast_dtype` computes the KL under autocast against a target of that dtype. None of them: ARM as
    AttentiveReflection computes it."""

    def __init__(self, *args, rows=None, pool_all: bool = False, autocast_dtype: torch.dtype | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampled_rows = rows
        self.pool_all = pool_all
        self.autocast_dtype = autocast_dtype

    def rows(self, task: int, position) -> list[int]:
        if self.sampled_rows is None:
            return super().rows(task, position)
        return self.sampled_rows(task, position)

    def task_terms(self) -> list:
        """One term per earlier task, each called as term(model, position): the release backpropagates each alone."""
        return [partial(self.task_loss, task) for task in range(len(self.targets))]

    def kl(self, model, batch: dict, target: torch.Tensor) -> torch.Tensor:
        mask = None if self.pool_all else batch["attention_mask"].to(model.device)
        with self._precision(model):
            log_weights = to_log_weights(model.routing_logits(batch["input_ids"].to(model.device), mask))  # (B, T)
            if self.autocast_dtype is None:
                expanded = target.to(log_weights).expand_as(log_weights)
            else:  # the release keeps ā in bf16
                expanded = target.to(device=log_weights.device, dtype=self.autocast_dtype).expand_as(log_weights)
            return F.kl_div(log_weights, expanded, reduction="batchmean")

    def _precision(self, model):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(model.device.type, dtype=self.autocast_dtype)


def init_query_net_normal(router, std: float, generator: torch.Generator | None = None) -> None:
    """Redraw the router's two linear layers from N(0, std), drawn on the CPU (the LayerNorm keeps its init):
    the release's LLaMA init applied the backbone's `_init_weights` to them."""
    with torch.no_grad():
        for linear in (router.query_net[0], router.query_net[1]):
            drawn = torch.empty(linear.weight.shape).normal_(0.0, std, generator=generator)
            linear.weight.copy_(drawn)


# ---- one task's release-exact recipe (sapt.train_task) ------------------------------------------------
def training_recipe(args, is_encoder_decoder: bool, bf16: bool = False) -> TrainingRecipe:
    """The recipe of a task step (SaptArguments): release-exact when any release behaviour is on, else the
    paper's method (sapt.training.recipe)."""
    release = ReleaseMode.from_arguments(args, is_encoder_decoder, bf16)
    return release if release.switches.any else TrainingRecipe()


@dataclass
class ReleaseMode(TrainingRecipe):
    """The release-exact recipe: the switches of one task step, with what they need: how many of the
    release's processes this process stands for, the backbone family, the evaluation period in epochs,
    and whether the Trainer runs in bf16."""

    switches: ReleaseSwitches
    processes: int = 1
    decoder_only: bool = False
    eval_every_epochs: int = RELEASE_EVAL_EVERY_EPOCHS
    bf16: bool = False

    @classmethod
    def from_arguments(cls, args, is_encoder_decoder: bool, bf16: bool = False) -> ReleaseMode:
        """From SaptArguments (release_exact, release_behaviours, release_processes, eval_every_epochs)."""
        switches = resolve_switches(args.release_exact, args.release_behaviours, is_encoder_decoder)
        return cls(switches, args.release_processes, not is_encoder_decoder,
                   args.eval_every_epochs or RELEASE_EVAL_EVERY_EPOCHS, bf16)

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

    def init_query_net(self, model, backbone_config, seed: int) -> None:
        """The release's LLaMA query network: N(0, initializer_range) linear layers (a new router only)."""
        if self.switches.query_init and model.router is not None:
            std = getattr(backbone_config, "initializer_range", 0.02)
            init_query_net_normal(model.router, std, torch.Generator().manual_seed(seed))

    def pseudo_collator(self, train_collator, generation_collator):
        """pseudo_rows: pseudo inputs collated as training rows (prompt + EOS)."""
        return train_collator if self.switches.pseudo_rows else generation_collator

    def arm_terms(self, args, pseudo_sets, routing_means, collator, batch_size: int, num_blocks: int,
                  pseudo_tasks: list[str], seed: int) -> list[LossTerm]:
        """The release's ARM; under per-backward stepping one term per earlier task (each backpropagated alone)."""
        batch_size = batch_size // self.processes  # every release process drew the same pseudo rows: one share
        first_step = 1 if self.switches.arm_from_second_step else 0
        rows = None
        if self.switches.reshuffled_pseudo:
            rows = ReshuffledPseudoRows([len(pseudo) for pseudo in pseudo_sets], batch_size, seed, first_step).rows
        autocast_dtype = torch.bfloat16 if self.switches.bf16_kl and self.bf16 else None
        reflection = ReleaseReflection(
            pseudo_sets, routing_means, collator, batch_size, num_blocks, first_step=first_step, rows=rows,
            pool_all=self.switches.pseudo_rows, autocast_dtype=autocast_dtype,
        )
        if self.switches.per_backward_steps:
            return [
                LossTerm(f"arm/{task}", args.kl_ratio, lambda model, position, _, term=term: term(model, position))
                for task, term in zip(pseudo_tasks, reflection.task_terms())
            ]
        return [LossTerm("arm", args.kl_ratio, lambda model, position, _: reflection.loss(model, position))]

    def trainer(self, training_args, num_train: int, **kwargs) -> SaptTrainer:
        """A ReleaseTrainer where the release trained differently (its schedule, CE or stepping)."""
        release = self.training(training_args, num_train)
        if release is None:
            return super().trainer(training_args, num_train, **kwargs)
        return ReleaseTrainer(args=training_args, release=release, **kwargs)

    def add_evaluation(self, trainer: SaptTrainer, args) -> bool:
        """Under eval_schedule: the release's points only, and no final evaluation."""
        evaluation = trainer.release.evaluation if isinstance(trainer, ReleaseTrainer) else None
        if evaluation is None:
            return super().add_evaluation(trainer, args)
        trainer.add_callback(evaluation)
        return False

    def training(self, training_args, num_train: int) -> ReleaseTraining | None:
        """The Trainer's release-exact part (None: none). Under eval_schedule this sets
        training_args.max_steps to the release's step count and turns the Trainer's own evaluation and
        saving off (the evaluation callback evaluates, and saves when saving was on, at the release's points)."""
        switches = self.switches
        if not (switches.eval_schedule or switches.ce_mean_of_means or switches.per_backward_steps):
            return None
        accumulation = training_args.gradient_accumulation_steps
        training = ReleaseTraining(decoder_only=self.decoder_only)
        if switches.ce_mean_of_means:
            training.ce_groups = self.processes
        if switches.per_backward_steps:
            from .release_stepping import PerBackwardStepping

            training.stepping = PerBackwardStepping(accumulation, training_args.max_grad_norm)
        if not switches.eval_schedule:
            return training
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
        training.evaluation = ReleaseEvaluation(schedule.eval_every, saves)
        return training
