"""Release-exact mode (issue 10): each behaviour of the release against a computation of its own.

Stepping (LLaMA: one optimizer application per backward), Long/LLaMA's step budgets in the generated
configs, the release's step count and evaluation points with the model it keeps, its LLaMA tokenisation
(no BOS, BOS as padding, label truncation), its pseudo-row sampler and cross-entropy, the switches, and
one release-exact run through the command line read the way the release's score.py reads it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from itertools import count

import pytest
import torch
import torch.nn.functional as F
from conftest import BENCHMARK, GENERATED, LONG_TASKS, REPO_ROOT, VOCAB, make_sapt
from datasets import Dataset
from torch.utils.data import RandomSampler
from transformers import Seq2SeqTrainingArguments, TrainerCallback

from sapt.training.collators import Collator
from sapt.model import IGNORE_INDEX
from sapt.experiments.pipeline import main as pipeline_main
from sapt.training.release_exact import ReleaseSwitches, resolve_switches
from sapt.training.release_training import (
    ReleaseEvaluation,
    ReleaseMode,
    ReleaseStream,
    ReleaseTraining,
    ReshuffledPseudoRows,
    release_cross_entropy,
    release_schedule,
)
from sapt.training.release_training import ReleaseReflection as AttentiveReflection  # the release's ARM options moved
from sapt.training.release_training import ReleaseTrainer as SaptTrainer  # release= moved
from sapt.training.release_stepping import PerBackwardStepping
from sapt.training.trainer import KeepBestTrainable, LossTerm, StepPosition, trainable_tensors
from sapt.utils.cli import UsageError

LLAMA_PAD, LLAMA_BOS = 3, 1  # the conftest LLaMA's ids


# ---- tiny data: token ids directly ------------------------------------------------------------------
def llama_examples(number: int, seed: int = 0) -> list[dict]:
    """Prompt + answer rows with the prompt masked out; answers of 1-3 tokens, prompts of 3-5."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(number):
        prompt = torch.randint(4, VOCAB, (3 + index % 3,), generator=generator).tolist()
        answer = torch.randint(4, VOCAB, (1 + index % 3,), generator=generator).tolist()
        rows.append({"prompt": prompt, "input_ids": prompt + answer,
                     "labels": [IGNORE_INDEX] * len(prompt) + answer, "index": index})
    return rows


def _left_pad(rows, value):
    width = max(map(len, rows))
    return torch.tensor([[value] * (width - len(r)) + r for r in rows])


def training_collator(batch):
    ids = [ex["input_ids"] for ex in batch]
    return {"input_ids": _left_pad(ids, LLAMA_PAD), "attention_mask": _left_pad([[1] * len(r) for r in ids], 0),
            "labels": _left_pad([ex["labels"] for ex in batch], IGNORE_INDEX)}


def generation_collator(batch):
    prompts = [ex["prompt"] for ex in batch]
    return {"input_ids": _left_pad(prompts, LLAMA_PAD), "attention_mask": _left_pad([[1] * len(p) for p in prompts], 0),
            "example_index": torch.tensor([ex["index"] for ex in batch])}


class RecordingIds:
    """Pseudo rows carry token ids; every collated batch is kept, in call order."""

    def __init__(self):
        self.batches: list[torch.Tensor] = []

    def __call__(self, rows):
        ids = torch.tensor([row["ids"] for row in rows])
        self.batches.append(ids)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def pseudo_set(seed: int, rows: int = 5) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"ids": torch.randint(4, VOCAB, (rows, 6), generator=generator).tolist()})


def trainer_for(model, tmp_path, train, evaluation=None, **settings) -> SaptTrainer:
    arguments = dict(
        output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=0.1, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, remove_unused_columns=False, logging_strategy="no", seed=0,
    )
    trainer_keys = ("regularizers", "release", "optimizers", "compute_metrics", "generation_kwargs")
    extra = {k: settings.pop(k) for k in trainer_keys if k in settings}
    arguments.update(settings)
    return SaptTrainer(
        model=model, args=Seq2SeqTrainingArguments(**arguments), train_dataset=train, eval_dataset=evaluation,
        data_collator=training_collator, generation_collator=generation_collator, **extra,
    )


def record_micro_batches(trainer) -> list[dict]:
    seen, original = [], trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    return seen


class CountingSGD(torch.optim.SGD):
    """SGD that counts its steps and keeps each step's gradients (before the update)."""

    def __init__(self, named, lr):
        self.names = [n for n, _ in named]
        super().__init__([p for _, p in named], lr=lr)
        self.gradients: list[dict[str, torch.Tensor]] = []

    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        self.gradients.append(
            {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for n, p in zip(self.names, params)}
        )
        return super().step(closure)


class NominalSteps(TrainerCallback):
    """The counting optimizer's step count at the end of every nominal (Trainer) step."""

    def __init__(self, optimizer):
        self.optimizer, self.counts = optimizer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.append(len(self.optimizer.gradients))


def hand_kl(model, ids, mean, num_blocks):
    log_p = model.routing_logits(ids, torch.ones_like(ids)).log_softmax(-1)  # (B, T)
    target = torch.tensor(mean + [0.0] * (num_blocks - len(mean)))
    return sum(t * (torch.log(t) - lp) for t, lp in zip(target, log_p.T) if t > 0).mean()


# ---- item 1: one optimizer application per backward -------------------------------------------------
GA, LR, WEIGHT = 2, 0.1, 0.7
MEANS = [[1.0], [0.4, 0.6]]  # ā of tasks 1 and 2


def train_task3(tmp_path, release_exact: bool, arm_from_second_step: bool = True):
    """Task 3 of a tiny LLaMA (two earlier tasks: ARM has two KL terms), 3 nominal steps of GA 2 with a
    counting SGD. Release-exact: per-backward stepping, the release's CE, no ARM on the first step
    (unless `arm_from_second_step` is off)."""
    model = make_sapt("llama", 3)
    optimizer = CountingSGD(list(model.trainable_parameters()), LR)
    pseudo = RecordingIds()
    reflection = AttentiveReflection(
        [pseudo_set(1), pseudo_set(2)], MEANS, pseudo, batch_size=2, num_blocks=3,
        first_step=1 if release_exact and arm_from_second_step else 0,
    )
    if release_exact:
        release = ReleaseTraining(decoder_only=True, ce_groups=1, stepping=PerBackwardStepping(GA, 0.0))
        terms = [LossTerm(f"arm/{i}", WEIGHT, lambda m, p, _, term=term: term(m, p))
                 for i, term in enumerate(reflection.task_terms())]
    else:
        release, terms = None, [LossTerm("arm", WEIGHT, lambda m, p, _: reflection.loss(m, p))]
    trainer = trainer_for(model, tmp_path, llama_examples(12), gradient_accumulation_steps=GA, max_steps=3,
                          regularizers=terms, release=release, optimizers=(optimizer, None))
    steps = NominalSteps(optimizer)
    trainer.add_callback(steps)
    batches = record_micro_batches(trainer)
    trainer.train()
    return model, optimizer, steps.counts, batches, pseudo.batches


def test_release_stepping_takes_one_optimizer_step_per_backward_at_task_3(tmp_path):
    _, optimizer, counts, batches, pseudo = train_task3(tmp_path, release_exact=True)
    # First nominal step: no ARM, GA backward calls, one application; then CE + 2 KL per micro-batch:
    # 3 * GA backward calls, 3 applications per nominal step.
    assert counts == [1, 4, 7]
    assert len(batches) == 3 * GA and len(pseudo) == 2 * 2 * GA

    # By hand: the backward terms in the release's order, each at the weights current when it runs;
    # every GA-th term applies SGD with 1/GA of the sum of the last GA terms.
    reference = make_sapt("llama", 3).train()
    named = list(reference.trainable_parameters())
    terms = []
    kl_batches = iter(pseudo)
    for number, batch in enumerate(batches):
        terms.append(lambda b=batch: reference(**b).loss)  # the micro-batch's mean over its label tokens
        if number >= GA:  # from the second nominal step on
            for mean in MEANS:
                ids = next(kl_batches)
                terms.append(lambda ids=ids, mean=mean: WEIGHT * hand_kl(reference, ids, mean, 3))
    expected, accumulated = [], None
    for number, term in enumerate(terms):
        grads = torch.autograd.grad(term() / GA, [p for _, p in named], allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads)]
        accumulated = grads if accumulated is None else [a + g for a, g in zip(accumulated, grads)]
        if (number + 1) % GA == 0:
            expected.append({n: g.clone() for (n, _), g in zip(named, accumulated)})
            with torch.no_grad():
                for (_, p), g in zip(named, accumulated):
                    p -= LR * g
            accumulated = None
    assert len(expected) == len(optimizer.gradients) == 7
    for actual, wanted in zip(optimizer.gradients, expected):
        assert actual.keys() == wanted.keys()
        for name in wanted:
            torch.testing.assert_close(actual[name], wanted[name], rtol=1e-4, atol=1e-6, msg=name)
    # Windows of GA terms: [CE, KL1], [KL2, CE], [KL1, KL2] per nominal step from the second on, so
    # applications 3 and 6 hold no cross-entropy: the block gets nothing, the router's key does.
    block = next(n for n in expected[0] if "lora_B" in n)
    assert [bool(e[block].abs().sum() > 0) for e in expected] == [True, True, True, False, True, True, False]
    assert expected[3]["router.key"].abs().sum() > 0 and expected[6]["router.key"].abs().sum() > 0


def test_release_stepping_with_arm_from_the_first_step_takes_3_steps_every_nominal_step(tmp_path):
    _, _, counts, _, pseudo = train_task3(tmp_path, release_exact=True, arm_from_second_step=False)
    assert counts == [3, 6, 9] and len(pseudo) == 2 * 3 * GA


def test_default_stepping_takes_one_optimizer_step_per_nominal_step(tmp_path):
    _, _, counts, batches, pseudo = train_task3(tmp_path, release_exact=False)
    assert counts == [1, 2, 3]
    assert len(batches) == 3 * GA and len(pseudo) == 2 * 3 * GA  # ARM from the first step, one batch per task


# ---- item 2: Long/LLaMA's step budgets in the generated configs ------------------------------------
RELEASE_BUDGETS = {"cb": 100, "copa": 200, "boolq": 500, "imdb": 250, "dbpedia": 200, "multirc": 500}  # issue 10


def configs_of(tmp_path, capsys, inputs, preset, *flags) -> dict[str, dict]:
    out = tmp_path / f"{preset}{len(flags)}.sh"
    assert pipeline_main(preset, ["--output", str(out), "--workdir", str(tmp_path), *inputs, *flags]) == 0
    capsys.readouterr()
    return {p.stem.split("-", 1)[1]: json.loads(p.read_text()) for p in out.with_suffix("").glob("*.json")}


@pytest.mark.parametrize("order", ["4", "5", "6"])
def test_long_llama_release_configs_carry_the_step_budgets_and_no_arm(tmp_path, capsys, paper_inputs, order):
    configs = configs_of(tmp_path, capsys, paper_inputs, "long_llama", "--order", order, "--release_exact")
    first = next(task for task, c in configs.items() if "previous_task_dir" not in c)
    assert len(configs) == 15
    for task, config in configs.items():
        assert config["release_exact"] is True and config["release_processes"] == 4
        # one process with 4 processes' micro-batches: 2 x 4 per micro-batch, global batch 32 per nominal step
        assert config["per_device_train_batch_size"] == 8 and config["gradient_accumulation_steps"] == 4
        if task in RELEASE_BUDGETS and task != first:
            assert config["max_steps"] == RELEASE_BUDGETS[task] and config["no_reflection"] is True
            assert "gen_data_dir" not in config
        else:
            assert config["num_train_epochs"] == 20 and "max_steps" not in config and "no_reflection" not in config
            assert config["gen_data_dir"].endswith("lora_gen_long_llama")
    trained_by_budget = {t for t in RELEASE_BUDGETS if t != first}
    assert trained_by_budget == {t for t, c in configs.items() if "max_steps" in c}
    assert len(trained_by_budget) == (5 if order == "5" else 6)  # order 5 starts with multirc


def test_budgets_only_in_release_mode_and_only_for_long_llama(tmp_path, capsys, paper_inputs):
    release = ("--release_exact",)
    for preset, flags in (("long_llama", ()), ("long_t5", release), ("superni_llama", release)):
        configs = configs_of(tmp_path, capsys, paper_inputs, preset, *flags)
        assert not any("max_steps" in c or c.get("no_reflection") for c in configs.values()), preset
    default = configs_of(tmp_path, capsys, paper_inputs, "long_llama")
    assert all("release_exact" not in c and c["per_device_train_batch_size"] == 2 for c in default.values())


def test_release_generator_refuses_several_processes(tmp_path, capsys):
    for flags in (["--gpus", "4"], ["--deepspeed", "zero2"]):
        with pytest.raises(SystemExit) as stop:
            pipeline_main("long_llama", ["--release_exact", "--output", str(tmp_path / "x.sh"), *flags])
        assert stop.value.code == 2 and "one process" in capsys.readouterr().err
        assert not (tmp_path / "x").exists() and not (tmp_path / "x.sh").exists()


# ---- item 3: step count, evaluation points, selection ----------------------------------------------
def simulate_release(num_examples, batch, processes, accumulation, epochs, max_steps=-1, every_epochs=5):
    """transformers 4.30's loop, one micro-batch at a time: (steps trained, steps evaluated)."""
    per_process = math.ceil(math.ceil(num_examples / processes) / batch)  # DistributedSampler, then batches
    per_epoch = max(per_process // accumulation, 1)
    wanted = max_steps if max_steps > 0 else math.ceil(epochs * per_epoch)
    period = every_epochs * math.ceil(num_examples / batch / processes / accumulation)  # run_*.py's float division
    steps, evaluated = 0, []
    for seen in count(1):  # micro-batches, one stream across epochs
        if seen % accumulation == 0:
            steps += 1
            if steps % period == 0:
                evaluated.append(steps)
            if steps >= wanted:
                return steps, evaluated


@pytest.mark.parametrize(
    "n, batch, processes, accumulation, epochs, max_steps, every, expected_evals",
    [
        (2000, 16, 1, 2, 10, -1, 5, 1),  # Long/T5, odd B: one evaluation, at about epoch 5
        (4000, 16, 1, 2, 10, -1, 5, 2),  # Long/T5, even B: the last step falls on the schedule
        (2000, 2, 4, 4, 20, -1, 5, 3),  # Long/LLaMA: epoch 20 is never a candidate
        (1000, 8, 1, 4, 100, -1, 5, 19),  # SuperNI/T5
        (1000, 2, 4, 4, 50, -1, 5, 9),  # SuperNI/LLaMA
        (2000, 2, 4, 4, 20, 250, 5, 0),  # imdb by step budget: 5 epochs' worth is more than max_steps
        (1003, 3, 2, 3, 7, -1, 2, None),  # uneven everything
    ],
)
def test_release_schedule_matches_the_release_loop(
    n, batch, processes, accumulation, epochs, max_steps, every, expected_evals
):
    schedule = release_schedule(n, batch, processes, accumulation, epochs, max_steps, every)
    steps, evaluated = simulate_release(n, batch, processes, accumulation, epochs, max_steps, every)
    assert schedule.total_steps == steps and schedule.evaluation_steps == evaluated
    if expected_evals is not None:
        assert len(evaluated) == expected_evals


def test_long_t5_evaluates_once_at_about_epoch_5_and_never_at_the_end():
    schedule = release_schedule(2000, 16, 1, 2, 10)  # sst2-sized: B = 125
    assert schedule.total_steps == 10 * (125 // 2) == 620
    assert schedule.evaluation_steps == [5 * math.ceil(2000 / 32)] == [315]
    assert 315 / (125 / 2) == pytest.approx(5.04)  # about epoch 5
    # The project's default: ceil(B/GA) steps per epoch, evaluation at exact 5-epoch multiples and the end.
    assert 10 * math.ceil(125 / 2) == 630 != schedule.total_steps


def test_release_stream_runs_on_across_epochs():
    schedule = release_schedule(10, 2, 1, 2, 3)  # B = 5: every second step spans two epochs
    stream = list(ReleaseStream(schedule, 10, 2, 1, seed=0))
    assert schedule.total_steps == 6 and len(stream) == 12
    assert sorted(i for b in stream[:5] for i in b) == list(range(10)) == sorted(i for b in stream[5:10] for i in b)
    assert stream[:5] != stream[5:10]  # reshuffled each epoch
    # Two processes: each micro-batch is both processes' batches, each process's share of a padded permutation.
    two = list(ReleaseStream(release_schedule(7, 2, 2, 1, 1), 7, 2, 2, seed=3))
    order = torch.randperm(7, generator=torch.Generator().manual_seed(3)).tolist()
    order += order[:1]
    assert two == [order[0:4:2] + order[1:4:2], order[4:8:2] + order[5:8:2]]


def test_kept_model_is_the_best_evaluated_point_and_the_final_step_is_not_one(tmp_path):
    # 14 examples, batch 2, GA 2: B = 7, 3 steps per epoch, 3 epochs = 9 steps; evaluation every
    # 1 * ceil(14 / 4) = 4 steps: at 4 and 8, not at 9.
    schedule = release_schedule(14, 2, 1, 2, 3, eval_every_epochs=1)
    assert (schedule.total_steps, schedule.evaluation_steps) == (9, [4, 8])
    model = make_sapt("llama", 1)
    scores = iter([70.0, 20.0, 99.0])  # a third evaluation (the final step) would win
    args = dict(gradient_accumulation_steps=2, max_steps=schedule.total_steps, learning_rate=0.05)
    trainer = trainer_for(
        model, tmp_path, llama_examples(14), llama_examples(2), **args,
        compute_metrics=lambda _: {"exact_match": next(scores)},
        release=ReleaseTraining(decoder_only=True, train_batches=ReleaseStream(schedule, 14, 2, 1, seed=0)),
        generation_kwargs={"max_new_tokens": 1},
    )
    selection = KeepBestTrainable(model, "exact_match")
    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            snapshots[state.global_step] = trainable_tensors(model)

    for callback in (selection, Snapshot(), ReleaseEvaluation(schedule.eval_every, save=False)):
        trainer.add_callback(callback)
    trainer.train()
    assert trainer.state.global_step == 9 and sorted(snapshots) == [4, 8]
    final = trainable_tensors(model)
    selection.restore()
    kept = trainable_tensors(model)
    assert selection.best_step == 4
    assert all(torch.equal(kept[n], snapshots[4][n]) for n in kept)
    assert any(not torch.equal(kept[n], final[n]) for n in kept)


# ---- item 4 and the label: the release's LLaMA tokenisation ----------------------------------------
def release_collators(tokenizer, **lengths):
    mode = ReleaseMode(resolve_switches(True, None, is_encoder_decoder=False), decoder_only=True)
    options = mode.collator_options(tokenizer)
    return (Collator(tokenizer, False, **lengths, **options),
            Collator(tokenizer, False, **lengths, for_generation=True, **options))


def test_release_llama_inputs_carry_no_bos_and_pad_with_bos(tiny_models):
    from sapt.backbone import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_models["llama"]), is_encoder_decoder=False)
    bos = tokenizer.bos_token_id
    assert bos == 1 and tokenizer.pad_token_id != bos
    examples = [{"source": "Definition\nshort one\nOutput: ", "target": "yes", "index": 0},
                {"source": "Definition\na much longer input than the other one\nOutput: ", "target": "no", "index": 1},
                {"source": "pseudo input\nOutput: ", "target": "", "index": 2}]  # a pseudo row: empty output
    release = release_collators(tokenizer)
    default = (Collator(tokenizer, False), Collator(tokenizer, False, for_generation=True))
    for collator, reference in zip(release, default):
        batch, plain = collator(examples), reference(examples)
        mask = batch["attention_mask"].bool()
        firsts = [row[m][0].item() for row, m in zip(batch["input_ids"], mask)]
        assert bos not in firsts  # no sequence starts with BOS
        assert (~mask).any() and batch["input_ids"][~mask].eq(bos).all()  # padding is the release's id, 1
        plain_firsts = [row[m][0].item() for row, m in zip(plain["input_ids"], plain["attention_mask"].bool())]
        assert plain_firsts == [bos] * 3 and plain["input_ids"][~plain["attention_mask"].bool()].ne(bos).all()
    # A pseudo row collated as a training row is its prompt + EOS.
    pseudo = release[0](examples[2:])
    assert pseudo["input_ids"][0, -1].item() == tokenizer.eos_token_id


def test_release_labels_lose_eos_when_truncated(tiny_models):
    from sapt.backbone import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_models["llama"]), is_encoder_decoder=False)
    eos, long_label = tokenizer.eos_token_id, "one two three four five six seven eight"
    label_ids = tokenizer(long_label, add_special_tokens=False)["input_ids"]
    assert len(label_ids) > 4
    example = [{"source": "x\nOutput: ", "target": long_label, "index": 0}]
    release = release_collators(tokenizer, max_target_length=4)[0](example)
    default = Collator(tokenizer, False, max_target_length=4)(example)
    release_labels = release["labels"][0][release["labels"][0].ne(IGNORE_INDEX)].tolist()
    default_labels = default["labels"][0][default["labels"][0].ne(IGNORE_INDEX)].tolist()
    assert release_labels == label_ids[:4] and default_labels == label_ids[:4] + [eos]
    short = [{"source": "x\nOutput: ", "target": "one", "index": 0}]
    kept = release_collators(tokenizer, max_target_length=4)[0](short)["labels"][0].tolist()
    assert kept[-1] == eos


# ---- the smaller behaviours --------------------------------------------------------------------------
def test_reshuffled_pseudo_rows_replay_the_release_samplers():
    """Each task's rows as the release's DataLoaders (one seeded generator, one RandomSampler per task,
    drop_last off, a new iterator when one runs out) give them, micro-batch after micro-batch."""
    sizes, batch, seed, accumulation = [5, 4, 3], 2, 11, 2  # a partial last batch, an even one, a single batch
    generator = torch.Generator().manual_seed(seed)
    loaders = [
        torch.utils.data.DataLoader(range(n), batch_size=batch, sampler=RandomSampler(range(n), generator=generator))
        for n in sizes
    ]
    iterators = [iter(loader) for loader in loaders]
    sampler = ReshuffledPseudoRows(sizes, batch, seed, first_step=1)
    for draw in range(14):
        step, micro = 1 + draw // accumulation, draw % accumulation
        for task in range(len(sizes)):
            try:
                expected = next(iterators[task])
            except StopIteration:
                iterators[task] = iter(loaders[task])
                expected = next(iterators[task])
            position = StepPosition(step, micro, accumulation, 0, 1)
            assert sampler.rows(task, position) == expected.tolist(), (draw, task)
    # Resuming recomputes the same rows from the seed alone.
    fresh = ReshuffledPseudoRows(sizes, batch, seed, first_step=1)
    later = StepPosition(7, 1, accumulation, 0, 1)
    assert fresh.rows(1, later) == sampler.rows(1, later)


def test_release_cross_entropy_is_the_mean_of_per_process_means():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, generator=generator)
    labels = torch.randint(0, 7, (4, 5), generator=generator)
    labels[0, :4] = IGNORE_INDEX  # row 0: one label token; others four or five
    labels[2, :1] = IGNORE_INDEX
    # By hand: process 0 holds rows 0-1, process 1 rows 2-3; each a mean over its tokens (after the shift).
    means = []
    for rows in ((0, 1), (2, 3)):
        pairs = [(r, t) for r in rows for t in range(4) if labels[r, t + 1] >= 0]
        losses = [F.cross_entropy(logits[r, t], labels[r, t + 1]) for r, t in pairs]
        means.append(sum(losses) / len(losses))
    torch.testing.assert_close(release_cross_entropy(logits, labels, 2, decoder_only=True), sum(means) / 2)
    pooled = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert not torch.allclose(pooled, sum(means) / 2)  # the token-weighted mean differs on these rows
    torch.testing.assert_close(release_cross_entropy(logits, labels, 1, decoder_only=True), pooled)


def test_query_init_draws_from_normal_002_and_keeps_the_layer_norm():
    model = make_sapt("llama", 1)
    before = {n: p.clone() for n, p in model.router.query_net.named_parameters()}
    ReleaseMode(ReleaseSwitches(query_init=True), decoder_only=True).init_query_net(model, model.config, seed=5)
    weights = torch.cat([model.router.query_net[i].weight.flatten() for i in (0, 1)])
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002
    assert torch.equal(model.router.query_net[3].weight, before["3.weight"])
    assert not torch.equal(model.router.query_net[0].weight, before["0.weight"])


def test_first_step_without_arm_and_pooling_over_everything():
    model = make_sapt("llama", 2)
    rows = Dataset.from_dict({"ids": [[5, 6, LLAMA_PAD, LLAMA_PAD]]})

    class Padded:
        def __call__(self, batch):
            ids = torch.tensor([r["ids"] for r in batch])
            return {"input_ids": ids, "attention_mask": ids.ne(LLAMA_PAD).long()}

    masked = AttentiveReflection([rows], [[1.0]], Padded(), 1, 2, first_step=1)
    pooled_all = AttentiveReflection([rows], [[1.0]], Padded(), 1, 2, first_step=1, pool_all=True)
    assert masked.loss(model, StepPosition(0, 0, 1, 0, 1)) is None  # no ARM on the first optimizer step
    at_step_1 = StepPosition(1, 0, 1, 0, 1)
    ids = torch.tensor([[5, 6, LLAMA_PAD, LLAMA_PAD]])
    torch.testing.assert_close(pooled_all.loss(model, at_step_1), hand_kl_masked(model, ids, None))
    torch.testing.assert_close(masked.loss(model, at_step_1), hand_kl_masked(model, ids, ids.ne(LLAMA_PAD).long()))
    assert not torch.allclose(masked.loss(model, at_step_1), pooled_all.loss(model, at_step_1))


def test_bf16_kl_uses_autocast_and_a_bf16_target():
    model = make_sapt("llama", 3)
    rows = pseudo_set(4, rows=2)
    mean = [0.3, 0.7]  # 0.3 and 0.7 are not bf16 numbers: the target moves when rounded
    position = StepPosition(0, 0, 1, 0, 1)
    release = AttentiveReflection([rows], [mean], RecordingIds(), 2, 3, autocast_dtype=torch.bfloat16)
    plain = AttentiveReflection([rows], [mean], RecordingIds(), 2, 3)
    ids = torch.tensor(rows["ids"])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # router and log-softmax in bf16, the KL itself in fp32
        log_p = model.routing_logits(ids, torch.ones_like(ids)).log_softmax(-1).float()
    target = torch.tensor(mean + [0.0]).to(torch.bfloat16).float()
    by_hand = sum(t * (torch.log(t) - lp) for t, lp in zip(target, log_p.T) if t > 0).mean()
    torch.testing.assert_close(release.loss(model, position), by_hand)
    torch.testing.assert_close(plain.loss(model, position), hand_kl(model, ids, mean, 3))
    assert abs(release.loss(model, position).item() - plain.loss(model, position).item()) > 1e-4


def hand_kl_masked(model, ids, mask):
    embeddings = model.get_input_embeddings()(ids)
    if mask is not None:
        embeddings = embeddings.masked_fill(~mask.bool()[..., None], torch.finfo(embeddings.dtype).min)
    log_p = model.router(embeddings.amax(dim=1)).log_softmax(-1)
    return -log_p[:, 0].mean()  # target [1, 0]: KL = -log p_1


# ---- the switches --------------------------------------------------------------------------------------
def test_switches_follow_the_family_and_can_be_taken_one_by_one():
    llama = resolve_switches(True, None, is_encoder_decoder=False)
    t5 = resolve_switches(True, None, is_encoder_decoder=True)
    assert set(llama.on) == set(ReleaseSwitches.names())
    every_family = {"eval_schedule", "pool_padding", "reshuffled_pseudo", "arm_from_second_step", "ce_mean_of_means"}
    assert set(t5.on) == every_family
    assert resolve_switches(False, None, False).on == []  # the default: the method as described
    assert resolve_switches(False, "no_bos,eval_schedule", False).on == ["eval_schedule", "no_bos"]
    assert "per_backward_steps" not in resolve_switches(True, "-per_backward_steps", False).on
    for bad in ("no_such", "no_bos"):  # unknown; LLaMA-only on T5
        with pytest.raises(UsageError, match=bad):
            resolve_switches(False, bad, is_encoder_decoder=True)


# ---- one release-exact run, read as the release's score.py reads it -----------------------------------
@pytest.mark.slow
def test_release_exact_run_from_the_command_line(tiny_models, tmp_path):
    outputs = tmp_path / "logs_and_outputs" / "run" / "outputs"
    common = [
        "--model_name_or_path", str(tiny_models["llama"]), "--data_dir", str(BENCHMARK),
        "--task_order", ",".join(LONG_TASKS), "--gen_data_dir", str(GENERATED / "lora_gen_long_llama"),
        "--max_train_samples", "12", "--max_eval_samples", "4", "--max_predict_samples", "4",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--num_train_epochs", "3", "--eval_every_epochs", "1", "--learning_rate", "1e-3", "--max_source_length", "64",
        "--generation_max_length", "3", "--lora_r", "2", "--seed", "7", "--disable_tqdm", "true",
        "--release_exact", "--release_processes", "2",
    ]
    for position, task in enumerate(LONG_TASKS, start=1):
        previous = ["--previous_task_dir", str(outputs / f"1-{LONG_TASKS[0]}")] if position > 1 else []
        done = subprocess.run(
            [sys.executable, "-m", "sapt", "train_task", *common, "--task", task,
             "--output_dir", str(outputs / f"{position}-{task}"), *previous],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        # 12 examples, 2 processes of 2, GA 2: B = 3, 1 step per epoch, 3 steps; evaluation every 1 * ceil(12/8) = 2
        assert "release schedule: 3 steps, evaluation at [2] (every 2)" in done.stderr
        results = json.loads((outputs / f"{position}-{task}" / "all_results.json").read_text())
        assert results["best_step"] == 2  # the only evaluated point; step 3 is not a candidate
    config = json.loads((outputs / f"2-{LONG_TASKS[1]}" / "sapt_config.json").read_text())
    assert config["pool_padding"] is True
    # The release's score.py: readlines()[0].split(',') and each i-task folder's all_results.json.
    with open(outputs / "task_order.txt") as handle:
        tasks = handle.readlines()[0].split(",")
    assert tasks == LONG_TASKS
    for i, task in enumerate(tasks):
        results = json.loads((outputs / f"{i + 1}-{task}" / "all_results.json").read_text())
        assert all(f"predict_eval_rougeL_for_{seen}" in results for seen in tasks[: i + 1])
    bad = subprocess.run(
        [sys.executable, "-m", "sapt", "train_task", *common, "--task", LONG_TASKS[0], "--release_behaviours", "nope",
         "--output_dir", str(tmp_path / "bad")], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )
    assert bad.returncode == 2 and "unknown behaviour 'nope'" in bad.stderr and not (tmp_path / "bad").exists()
