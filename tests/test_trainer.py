"""SaptTrainer on tiny SAPT models: the loss of a step with gradient accumulation, the router's learning
rate, model selection on dev, and what the README claims of the Trainer's paths (beam search in
batches, gradient checkpointing, bf16 autocast)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import PrinterCallback, Seq2SeqTrainingArguments, TrainerCallback, TrainerControl, TrainerState

from conftest import VOCAB, make_sapt
from sapt.o_lora import l2_loss
from sapt.layer import SaptLinear
from sapt.model import IGNORE_INDEX
from sapt.training.trainer import EveryNEpochs, KeepBestTrainable, LogMetrics, LossTerm, SaptTrainer, trainable_tensors

PAD = {"t5": 0, "llama": 3}  # the conftest backbones' pad ids
# Label tokens of five examples: powers of two, so any two micro-batches hold different counts and the
# mean of per-micro-batch means differs from the mean over the step's tokens whatever the data order.
LABEL_COUNTS = (1, 2, 4, 8, 16)
FOUR = LABEL_COUNTS[:4]  # one batch of four, or two batches of two


# ---- data: token ids directly, no tokenizer ------------------------------------------------------
def examples(family: str, label_counts=LABEL_COUNTS, seed: int = 0) -> list[dict]:
    """Prompts of different lengths; LLaMA rows are prompt + answer with the prompt masked out."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for number, count in enumerate(label_counts):
        prompt = torch.randint(4, VOCAB, (3 + number % 3,), generator=generator).tolist()
        answer = torch.randint(4, VOCAB, (count,), generator=generator).tolist()
        if family == "t5":
            rows.append({"prompt": prompt, "input_ids": prompt, "labels": answer, "index": number})
        else:
            labels = [IGNORE_INDEX] * len(prompt) + answer
            rows.append({"prompt": prompt, "input_ids": prompt + answer, "labels": labels, "index": number})
    return rows


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])


def training_collator(family: str):
    left = family == "llama"

    def collate(batch):
        ids = [ex["input_ids"] for ex in batch]
        return {
            "input_ids": _pad(ids, PAD[family], left),
            "attention_mask": _pad([[1] * len(r) for r in ids], 0, left),
            "labels": _pad([ex["labels"] for ex in batch], IGNORE_INDEX, left),
        }

    return collate


def generation_collator(family: str):
    """Prompts only (left padding for LLaMA, where generation continues the row), as sapt's Collator."""
    left = family == "llama"

    def collate(batch):
        prompts = [ex["prompt"] for ex in batch]
        return {
            "input_ids": _pad(prompts, PAD[family], left),
            "attention_mask": _pad([[1] * len(p) for p in prompts], 0, left),
            "example_index": torch.tensor([ex["index"] for ex in batch]),
        }

    return collate


def make_trainer(model, family, tmp_path, train=None, evaluation=None, trainer_kwargs=None, **settings) -> SaptTrainer:
    arguments = dict(
        output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=1e-3, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, remove_unused_columns=False, logging_strategy="no", seed=0,
    )
    arguments.update(settings)
    return SaptTrainer(
        model=model, args=Seq2SeqTrainingArguments(**arguments), train_dataset=train, eval_dataset=evaluation,
        data_collator=training_collator(family), generation_collator=generation_collator(family),
        **(trainer_kwargs or {}),
    )


class GradientsBeforeStep(TrainerCallback):
    """The accumulated gradients of every trainable parameter just before each optimizer step."""

    def __init__(self, model):
        self.model = model
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in self.model.trainable_parameters()})


def record_micro_batches(trainer: SaptTrainer) -> list[dict]:
    """The training micro-batches compute_loss sees, in order."""
    seen, original = [], trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    return seen


def summed_ce(model, batch, family) -> torch.Tensor:
    """Cross-entropy summed over every label token of a batch, from the logits."""
    logits = model(**batch).logits
    labels = batch["labels"]
    if family == "llama":  # position i predicts token i + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def label_tokens(batch, family) -> int:
    labels = batch["labels"][:, 1:] if family == "llama" else batch["labels"]
    return int(labels.ne(IGNORE_INDEX).sum())


def gradients(loss, model) -> dict[str, torch.Tensor]:
    named = list(model.trainable_parameters())
    return dict(zip([n for n, _ in named], torch.autograd.grad(loss, [p for _, p in named], retain_graph=True)))


def assert_gradients_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def differs(actual, expected) -> bool:
    return any(not torch.allclose(actual[n], expected[n], rtol=1e-4, atol=1e-6) for n in expected)


# ---- the loss of one optimizer step ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_accumulated_gradient_is_the_token_mean_over_the_step_plus_each_term_once(family, tmp_path):
    """Five examples, micro-batches of two, two per step: a full step, then a last step of one
    micro-batch. Learning rate 0 keeps the weights, so both steps compare with the starting model."""
    weight = 0.3
    model = make_sapt(family, 2)  # two blocks: the router's gradient is part of the check
    trainer = make_trainer(
        model, family, tmp_path, train=examples(family), gradient_accumulation_steps=2, num_train_epochs=1,
        learning_rate=0.0,
        trainer_kwargs={"regularizers": [LossTerm("l2", weight, lambda m, _, __: l2_loss(m))]},  # O-LoRA's L2 as the extra term
    )
    grads = GradientsBeforeStep(model)
    trainer.add_callback(grads)
    batches = record_micro_batches(trainer)
    trainer.train()
    assert len(grads.steps) == 2 and len(batches) == 3

    # By hand, on the same starting weights: CE summed over the step's label tokens / their number.
    reference = make_sapt(family, 2).train()
    term = weight * l2_loss(reference)
    for step, micro_batches in zip(grads.steps, (batches[:2], batches[2:])):
        counts = [label_tokens(b, family) for b in micro_batches]
        sums = [summed_ce(reference, b, family) for b in micro_batches]
        expected = gradients(sum(sums) / sum(counts) + term, reference)
        assert expected["router.key"].abs().sum() > 0
        assert_gradients_close(step, expected)
    assert sum(label_tokens(b, family) for b in batches) == sum(LABEL_COUNTS)

    # The ways this goes wrong give other gradients on these batches: the mean of the micro-batch means,
    # the extra term in full at every micro-batch, and (last step) the term divided by the full 2.
    counts = [label_tokens(b, family) for b in batches]
    sums = [summed_ce(reference, b, family) for b in batches]
    full_step = gradients((sums[0] + sums[1]) / (counts[0] + counts[1]) + term, reference)
    mean_of_means = gradients((sums[0] / counts[0] + sums[1] / counts[1]) / 2 + term, reference)
    term_per_micro_batch = gradients((sums[0] + sums[1]) / (counts[0] + counts[1]) + 2 * term, reference)
    half_term_last = gradients(sums[2] / counts[2] + term / 2, reference)
    assert counts[0] != counts[1]
    assert differs(mean_of_means, full_step) and differs(term_per_micro_batch, full_step)
    assert differs(half_term_last, gradients(sums[2] / counts[2] + term, reference))


# ---- the router's own learning rate ---------------------------------------------------------------
def test_router_learning_rate_reaches_the_optimizer_and_its_steps(tmp_path):
    model = make_sapt("llama", 2)  # two blocks: the router gets gradient
    trainer = make_trainer(
        model, "llama", tmp_path, train=examples("llama", FOUR), optim="sgd", learning_rate=1e-3, max_steps=1,
        per_device_train_batch_size=4, trainer_kwargs={"router_learning_rate": 0.05},
    )
    grads = GradientsBeforeStep(model)
    trainer.add_callback(grads)
    before = trainable_tensors(model)
    trainer.train()

    query_net = {n for n, _ in model.trainable_parameters() if n.startswith("router.query_net.")}
    assert query_net and "router.key" in before
    learning_rates = {}
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            name = next(n for n, p in model.named_parameters() if p is param)
            assert name not in learning_rates, f"{name} in two parameter groups"
            learning_rates[name] = group["lr"]
    assert learning_rates.keys() == before.keys()  # every trainable tensor, nothing frozen
    assert learning_rates == {n: 0.05 if n in query_net else 1e-3 for n in before}

    # Plain SGD: each tensor moved by its group's rate times its gradient.
    after = trainable_tensors(model)
    for name, grad in grads.steps[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(after[name], before[name] - learning_rates[name] * grad, msg=name)


# ---- model selection on dev -----------------------------------------------------------------------
class Snapshots(TrainerCallback):
    def __init__(self, model):
        self.model = model
        self.at_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_evaluate(self, args, state, control, **kwargs):
        self.at_step[state.global_step] = trainable_tensors(self.model)


def test_best_dev_step_is_restored_earliest_on_a_tie_not_the_last(tmp_path):
    scripted = [10.0, 30.0, 30.0, 20.0]  # epochs 1-4: best at epoch 2, tied at 3, final epoch worse
    scores = iter(scripted)
    model = make_sapt("llama", 2)
    data = examples("llama", FOUR)
    trainer = make_trainer(
        model, "llama", tmp_path, train=data, evaluation=data, learning_rate=5e-2, num_train_epochs=4,
        eval_strategy="epoch", trainer_kwargs={
            "compute_metrics": lambda prediction: {"exact_match": next(scores)},
            "generation_kwargs": {"max_new_tokens": 1, "do_sample": False},
        },
    )
    selection = KeepBestTrainable(model, "exact_match")
    snapshots = Snapshots(model)
    trainer.add_callback(selection)
    trainer.add_callback(snapshots)
    trainer.train()

    assert sorted(snapshots.at_step) == [2, 4, 6, 8]  # 2 steps an epoch
    assert (selection.best_score, selection.best_step, selection.last_eval_step) == (30.0, 4, 8)
    best, tied, last = (snapshots.at_step[s] for s in (4, 6, 8))
    assert differs(tied, best) and differs(last, best)  # training moved the tensors between evaluations
    assert differs(trainable_tensors(model), best)
    selection.restore()
    restored = trainable_tensors(model)
    assert all(torch.equal(restored[n], best[n]) for n in best)

    # The snapshot and the scores survive a checkpoint (a resumed task selects the same step).
    selection.save(tmp_path)
    other = make_sapt("llama", 2)
    reloaded = KeepBestTrainable(other, "exact_match")
    reloaded.load(tmp_path)
    reloaded.restore()
    assert (reloaded.best_score, reloaded.best_step, reloaded.last_eval_step) == (30.0, 4, 8)
    assert all(torch.equal(t, best[n]) for n, t in trainable_tensors(other).items())


@pytest.mark.parametrize("save", [False, True])
def test_every_n_epochs_evaluates_on_multiples_of_n(save):
    callback = EveryNEpochs(3, save=save)
    evaluated, saved = [], []
    for epoch in range(1, 8):
        control = callback.on_epoch_end(None, TrainerState(epoch=float(epoch)), TrainerControl())
        evaluated += [epoch] if control.should_evaluate else []
        saved += [epoch] if control.should_save else []
    assert evaluated == [3, 6]
    assert saved == ([3, 6] if save else [])
    with pytest.raises(ValueError):
        EveryNEpochs(0)


# ---- what the README claims of the Trainer's paths -----------------------------------------------
def record_routing(model) -> list[torch.Tensor]:
    """The routing weights each `generate` call of the model decoded with."""
    routed, original = [], model.generate

    def generate(*args, **kwargs):
        output = original(*args, **kwargs)
        routed.append(model.routing.weights.clone())
        return output

    model.generate = generate
    return routed


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_beam_search_predictions_of_a_batch_equal_each_example_alone(family, tmp_path):
    """Prompts of 3, 4 and 5 tokens: padded together (left for LLaMA) or predicted one at a time."""
    model = make_sapt(family, 3).eval()
    data = examples(family, label_counts=(1, 1, 1))
    beams = {"max_new_tokens": 4, "min_new_tokens": 4, "num_beams": 3, "do_sample": False}  # no early EOS
    routed = record_routing(model)
    outputs, routing = {}, {}
    for batch_size in (3, 1):
        trainer = make_trainer(model, family, tmp_path, per_device_eval_batch_size=batch_size,
                               trainer_kwargs={"generation_kwargs": beams})
        outputs[batch_size] = trainer.predict(data)
        routing[batch_size] = torch.cat(routed)
        routed.clear()
    together, alone = outputs[3], outputs[1]
    assert together.label_ids.tolist() == alone.label_ids.tolist() == [0, 1, 2]
    assert together.predictions.shape == (3, 4 if family == "llama" else 5)  # T5 keeps its start token
    assert together.predictions.tolist() == alone.predictions.tolist()
    assert len({tuple(row) for row in alone.predictions.tolist()}) == 3  # rows differ: a mix-up would show
    # Nor did the padding enter the routing the beams decoded with.
    assert routing[3].shape == (3, 3)
    torch.testing.assert_close(routing[3], routing[1])


class ForwardCalls:
    """Counts the forward calls of one wrapped projection and the dtype of its base layer's output."""

    def __init__(self, layer: SaptLinear):
        self.calls, self.dtypes, self.autocast = 0, set(), set()
        layer.register_forward_hook(self._count)
        layer.base_layer.register_forward_hook(self._dtype)

    def _count(self, module, args, output):
        self.calls += 1

    def _dtype(self, module, args, output):
        self.dtypes.add(output.dtype)
        self.autocast.add(torch.is_autocast_enabled("cpu"))


def one_training_step(tmp_path, **settings):
    """One optimizer step of a 3-block LLaMA SAPT over all four examples; its counter and gradients."""
    model = make_sapt("llama", 3)
    counter = ForwardCalls(next(layer for _, layer in model.sapt_layers()))
    trainer = make_trainer(model, "llama", tmp_path, train=examples("llama", FOUR), per_device_train_batch_size=4,
                           max_steps=1, **settings)
    grads = GradientsBeforeStep(model)
    trainer.add_callback(grads)
    result = trainer.train()
    return counter, grads.steps[0], result.training_loss


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("flag", ["gradient_checkpointing", "activation_checkpointing"])  # the release's name, today's
def test_trainer_gradient_checkpointing_recomputes_the_layers_with_the_same_gradients(tmp_path, flag):
    plain, plain_grads, plain_loss = one_training_step(tmp_path)
    checkpointed, checkpointed_grads, checkpointed_loss = one_training_step(tmp_path, **{flag: True})
    assert plain.calls == 1  # one forward, no recomputation
    assert checkpointed.calls == 2  # forward, then again in backward
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert "router.key" in plain_grads and plain_grads["router.key"].abs().sum() > 0
    assert_gradients_close(checkpointed_grads, plain_grads)


def test_bf16_trainer_step_runs_the_model_under_cpu_autocast(tmp_path):
    full, _, full_loss = one_training_step(tmp_path)
    mixed, mixed_grads, mixed_loss = one_training_step(tmp_path, bf16=True)
    assert full.dtypes == {torch.float32} and full.autocast == {False}
    assert mixed.dtypes == {torch.bfloat16} and mixed.autocast == {True}
    assert torch.isfinite(torch.tensor(mixed_loss)) and mixed_loss == pytest.approx(full_loss, rel=5e-2)
    assert {g.dtype for g in mixed_grads.values()} == {torch.float32}  # adapters and router stay fp32


def test_without_progress_bars_the_logs_go_through_the_log_as_numbers(tmp_path):
    """disable_tqdm (what the pipelines set): transformers' PrinterCallback, which prints numbers as strings,
    gives way to LogMetrics."""
    trainer = make_trainer(make_sapt("t5", 1), "t5", tmp_path)
    kinds = {type(callback) for callback in trainer.callback_handler.callbacks}
    assert LogMetrics in kinds and PrinterCallback not in kinds
