"""Release-exact mode: what the official release's code really did, where it differs from the method as
the paper describes it (issue 10; docs/release_exact.md). Every behaviour has its own switch.

    python -m sapt train_task ... --release_exact                        # every behaviour of the family
    python -m sapt train_task ... --release_behaviours no_bos,eval_schedule  # some of them
    python -m sapt train_task ... --release_exact --release_behaviours=-per_backward_steps  # all but one
    python gen_script_long_llama.py --release_exact                      # a whole paper reproduction

The release ran transformers 4.30.2, accelerate 0.24.1 and (LLaMA) DeepSpeed 0.11.2 on 4 GPUs. Here
one process stands for the release's `--release_processes` processes (the LLaMA generators write 4):
its micro-batch is theirs put together, its cross-entropy the mean of their per-process means, and
ARM's pseudo batch the per-process share (every release process drew the same pseudo rows).

This module holds the switches, the checks of their arguments, the release's step budgets (Long/LLaMA)
and what the generators write for them; sapt.training.release_training holds what a task step does with them
(its training-step count and evaluation schedule, its stream of micro-batches, its cross-entropy and
its pseudo-row sampler, gathered in ReleaseMode); the per-backward optimizer stepping is in
sapt.training.release_stepping.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..utils.cli import UsageError

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


# ---- checks of a task step's arguments (sapt.training.validation) ----------------------------------------------
# The router remedies of sapt.train_task (docs/router.md): not the release's, so never in its mode.
REMEDY_ARGUMENTS = (
    "arm_warmup_steps", "arm_target_floor", "own_block_weight", "router_pretrain_steps", "freeze_router_while_training",
)


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
    remedies = [name for name in REMEDY_ARGUMENTS if getattr(args, name)]
    if switches.any and remedies:
        raise ReleaseArgumentError(
            f"--{remedies[0]} is a remedy the release does not have (docs/router.md); leave it out of release-exact runs"
        )
    launched = training_args.world_size > 1 or getattr(training_args, "deepspeed", None)
    if switches.one_process and launched:
        named = [name for name in ("per_backward_steps", "eval_schedule") if getattr(switches, name)]
        raise ReleaseArgumentError(
            f"release behaviours {', '.join(named)} run in one process without DeepSpeed (it stands for the "
            "release's --release_processes); launch one process"
        )


# ---- the generators (sapt.experiments.pipeline) -----------------------------------------------------------------
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
