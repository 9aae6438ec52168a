"""Release-exact mode: what the official release's code really did, where it differs from the method as
the paper describes it (issue 10; docs/release_exact.md). Every behaviour has its own switch.

    python -m sapt.train_task ... --release_exact                        # every behaviour of the family
    python -m sapt.train_task ... --release_behaviours no_bos,eval_schedule  # some of them
    python -m sapt.train_task ... --release_exact --release_behaviours=-per_backward_steps  # all but one
    python gen_script_long_llama.py --release_exact                      # a whole paper reproduction

The release ran transformers 4.30.2, accelerate 0.24.1 and (LLaMA) DeepSpeed 0.11.2 on 4 GPUs. Here
one process stands for the release's `--release_processes` processes (the LLaMA generators write 4):
its micro-batch is theirs put together, its cross-entropy the mean of their per-process means, and
ARM's pseudo batch the per-process share (every release process drew the same pseudo rows).

This module holds the switches, the release's step budgets (Long/LLaMA), its training-step count and
evaluation schedule, its stream of micro-batches, its cross-entropy and its pseudo-row sampler; the
per-backward optimizer stepping is in sapt.release_stepping.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from .model import IGNORE_INDEX
from .validation import UsageError

logger = logging.getLogger("sapt")

DECODER_ONLY, EVERY_FAMILY = "decoder-only (LLaMA)", "every family"


def _switch(families: str, help_text: str):
    return field(default=False, metadata={"families": families, "help": help_text})


@dataclass(frozen=True)
class ReleaseSwitches:
    """One switch per behaviour of the release (all off: the method as the paper describes it).
    `families` says for which backbones the release did it; `--release_exact` turns on those of the
    backbone's family."""

    per_backward_steps: bool = _switch(
        DECODER_ONLY,
        "One optimizer application per backward, counted as DeepSpeed micro-steps: CE and each earlier "
        "task's KL are separate backward calls, and the optimizer applies the last GA of them (each /GA) "
        "whenever (micro_steps + 1) % GA == 0. Task t steps t times per nominal step.",
    )
    step_budgets: bool = _switch(
        DECODER_ONLY,
        "Long/LLaMA: cb, copa, boolq, imdb, dbpedia, multirc (after the first task) train a fixed number of "
        "optimizer steps without ARM. Applied by the generators (max_steps, no_reflection in the configs).",
    )
    eval_schedule: bool = _switch(
        EVERY_FAMILY,
        "floor(B/GA) steps per epoch over one continuous stream of micro-batches, evaluation every "
        "5*ceil(N/(batch*processes*GA)) steps, no final evaluation; the best evaluated model is kept "
        "(the last one when none was evaluated).",
    )
    no_bos: bool = _switch(
        DECODER_ONLY, "Prompts and labels tokenised without special tokens (no BOS); padding with id 1 (BOS)."
    )
    label_truncation: bool = _switch(
        DECODER_ONLY, "Labels are label + EOS truncated to max_target_length (EOS lost for long labels)."
    )
    pool_padding: bool = _switch(EVERY_FAMILY, "The routing max-pool covers padding positions (--pool_padding).")
    query_init: bool = _switch(DECODER_ONLY, "The query network's linear layers start from N(0, initializer_range).")
    pseudo_rows: bool = _switch(
        DECODER_ONLY,
        "Pseudo inputs collated as training rows (prompt + EOS, left-padded) and max-pooled over every position.",
    )
    reshuffled_pseudo: bool = _switch(
        EVERY_FAMILY, "Pseudo batches from one seeded sampler per run, each task's set reshuffled on every pass."
    )
    arm_from_second_step: bool = _switch(EVERY_FAMILY, "No ARM on the first optimizer step of a task.")
    bf16_kl: bool = _switch(DECODER_ONLY, "With --bf16: ARM's KL under bf16 autocast against a bf16 target.")
    ce_mean_of_means: bool = _switch(
        EVERY_FAMILY, "A step's cross-entropy is the mean of the per-process micro-batch means, divided by GA."
    )

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def applies(cls, name: str, is_encoder_decoder: bool) -> bool:
        families = next(f for f in fields(cls) if f.name == name).metadata["families"]
        return families == EVERY_FAMILY or not is_encoder_decoder

    @property
    def on(self) -> list[str]:
        return [name for name in self.names() if getattr(self, name)]

    @property
    def any(self) -> bool:
        return bool(self.on)

    @property
    def one_process(self) -> bool:
        """The switches that emulate the release's processes inside one process."""
        return self.per_backward_steps or self.eval_schedule


class ReleaseArgumentError(UsageError):
    """A release-exact argument that cannot be honoured (a one-line usage error, exit status 2)."""


def resolve_switches(release_exact: bool, behaviours: str | None, is_encoder_decoder: bool) -> ReleaseSwitches:
    """The switches of `--release_exact` (every behaviour of the family) and `--release_behaviours`
    (names to add; `-name` to remove; `all` = --release_exact)."""
    names = ReleaseSwitches.names()
    chosen = {n for n in names if ReleaseSwitches.applies(n, is_encoder_decoder)} if release_exact else set()
    for item in (behaviours or "").split(","):
        item = item.strip()
        if not item:
            continue
        remove, name = item.startswith("-"), item.lstrip("-")
        if name == "all":
            every = {n for n in names if ReleaseSwitches.applies(n, is_encoder_decoder)}
            chosen = chosen - every if remove else chosen | every
            continue
        if name not in names:
            raise ReleaseArgumentError(f"--release_behaviours: unknown behaviour {name!r} (one of {', '.join(names)})")
        if not remove and not ReleaseSwitches.applies(name, is_encoder_decoder):
            raise ReleaseArgumentError(
                f"--release_behaviours: {name} is what the release did for decoder-only (LLaMA) backbones only"
            )
        chosen = chosen - {name} if remove else chosen | {name}
    return ReleaseSwitches(**{name: name in chosen for name in names})


# ---- item 2: Long/LLaMA's step budgets ---------------------------------------------------------------
# The release's Long/LLaMA script trains these tasks, when they are not the first of the order, for a
# fixed number of optimizer steps (global batch 32) and without ARM.
LONG_LLAMA_STEP_BUDGETS = {"cb": 100, "copa": 200, "boolq": 500, "imdb": 250, "dbpedia": 200, "multirc": 500}


def step_budget(benchmark: str, is_encoder_decoder: bool, task: str, position: int) -> int | None:
    """max_steps of a task in the release's Long/LLaMA script (position 1-based), or None (epochs, ARM)."""
    if benchmark != "Long_Sequence" or is_encoder_decoder or position == 1:
        return None
    return LONG_LLAMA_STEP_BUDGETS.get(task)


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


def check_release_arguments(args, training_args, is_encoder_decoder: bool) -> None:
    """Release-exact arguments this task can honour; raises ReleaseArgumentError (a UsageError)."""
    switches = resolve_switches(args.release_exact, args.release_behaviours, is_encoder_decoder)
    processes = args.release_processes
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ReleaseArgumentError(f"--release_processes {processes!r}: expected an integer of at least 1")
    if training_args.per_device_train_batch_size % processes:
        raise ReleaseArgumentError(
            f"--release_processes {processes}: --per_device_train_batch_size "
            f"{training_args.per_device_train_batch_size} must hold that many processes' batches"
        )
    launched = training_args.world_size > 1 or getattr(training_args, "deepspeed", None)
    if switches.one_process and launched:
        named = [name for name in ("per_backward_steps", "eval_schedule") if getattr(switches, name)]
        raise ReleaseArgumentError(
            f"release behaviours {', '.join(named)} run in one process without DeepSpeed (it stands for the "
            "release's --release_processes); launch one process"
        )


# ---- the generators (sapt.pipeline) -----------------------------------------------------------------
def generator_switches(settings: dict, release_exact: bool, behaviours: str | None) -> ReleaseSwitches:
    """The switches of a preset's pipeline (`settings`: the preset, with --quick applied)."""
    return resolve_switches(release_exact, behaviours, is_encoder_decoder=settings["family"] == "t5")


def release_task_arguments(
    settings: dict, task: str, position: int, release_exact: bool, behaviours: str | None
) -> dict:
    """The train_task arguments a generator writes for one task in release-exact mode (position 1-based).

    Where the release's processes are emulated in one (per-backward stepping, its schedule), the one
    process takes their micro-batches together (per-device batch x the preset's processes) and records
    how many it stands for. Under step budgets, those tasks get max_steps and no ARM; a value of None
    means "leave this argument out"."""
    switches = generator_switches(settings, release_exact, behaviours)
    arguments = {}
    if release_exact:
        arguments["release_exact"] = True
    if behaviours:
        arguments["release_behaviours"] = behaviours
    processes = max(1, settings["gpus"])
    if switches.one_process and processes > 1:
        arguments["per_device_train_batch_size"] = settings["per_device_train_batch_size"] * processes
        arguments["release_processes"] = processes
    budget = step_budget(settings["benchmark"], settings["family"] == "t5", task, position)
    if switches.step_budgets and budget is not None:
        arguments.update(max_steps=budget, no_reflection=True, gen_data_dir=None)
    return arguments
