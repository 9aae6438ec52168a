"""The router remedies (docs/router.md) and the routing trace: each does what it says, by hand."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_sapt, sample_batch
from sapt.own_block import own_block_loss
from sapt.reflection import AttentiveReflection, arm_target
from sapt.training.routing_trace import RoutingTrace, read_trace, routing_summary
from sapt.training.trainer import StepPosition, TermLog
from test_reflection import IdCollator, pseudo_set


# ---- floored targets -------------------------------------------------------------------------------
def test_floored_target_is_the_mix_with_uniform():
    eps = 0.1
    torch.testing.assert_close(arm_target([0.3, 0.7], 4, eps), 0.9 * torch.tensor([0.3, 0.7, 0.0, 0.0]) + eps / 4)
    assert not torch.allclose(arm_target([0.3, 0.7], 4, eps), arm_target([0.3, 0.7], 4))
    assert arm_target([1.0], 3, eps).sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        arm_target([1.0], 2, 1.0)


def test_floored_kl_has_its_minimum_at_finite_logits():
    """With a floor the KL's gradient vanishes at the target (finite logits); without, it never does."""
    target = arm_target([1.0], 2, 0.2)  # [0.9, 0.1]
    logits = torch.log(target).requires_grad_()
    F.kl_div(logits.log_softmax(-1)[None], target[None], reduction="batchmean").backward()
    assert logits.grad.abs().max().item() < 1e-6
    plain = torch.tensor([math.log(0.9), math.log(0.1)], requires_grad=True)
    F.kl_div(plain.log_softmax(-1)[None], arm_target([1.0], 2)[None], reduction="batchmean").backward()
    assert plain.grad.abs().max().item() > 0.05


# ---- ARM warm-up -----------------------------------------------------------------------------------
def test_arm_gives_no_term_and_no_gradient_during_its_warm_up():
    model = make_sapt("llama", 3)
    reflection = AttentiveReflection([pseudo_set(1), pseudo_set(2)], [[1.0], [0.4, 0.6]], IdCollator(), 2, 3, first_step=4)
    for step in range(4):
        assert reflection.loss(model, StepPosition(step, 0, 1, 0, 1)) is None
    value = reflection.loss(model, StepPosition(4, 0, 1, 0, 1))
    value.backward()
    assert model.router.key.grad.abs().sum().item() > 0  # from step 4 on the KL reaches the router


def test_warm_up_keeps_the_kl_out_of_a_trainer_step(tmp_path):
    """In a real SaptTrainer step, a warm-up of one step leaves the router exactly where CE alone takes it."""
    from test_trainer import examples, make_trainer

    from sapt.training.trainer import LossTerm

    def router_after_one_step(first_step, subdir):
        model = make_sapt("llama", 2)
        reflection = AttentiveReflection([pseudo_set(1)], [[1.0]], IdCollator(), 2, 2, first_step=first_step)
        term = LossTerm("arm", 5.0, lambda m, p, _: reflection.loss(m, p))
        trainer = make_trainer(model, "llama", tmp_path / subdir, train=examples("llama"), max_steps=1,
                               learning_rate=0.1, optim="sgd", trainer_kwargs={"regularizers": [term]})
        trainer.train()
        return model.router.key.detach().clone()

    def router_ce_only():
        model = make_sapt("llama", 2)
        trainer = make_trainer(model, "llama", tmp_path / "ce", train=examples("llama"), max_steps=1,
                               learning_rate=0.1, optim="sgd")
        trainer.train()
        return model.router.key.detach().clone()

    ce_only = router_ce_only()
    torch.testing.assert_close(router_after_one_step(1, "warm"), ce_only)
    assert not torch.allclose(router_after_one_step(0, "cold"), ce_only)


# ---- own-block loss --------------------------------------------------------------------------------
def test_own_block_loss_is_minus_mean_log_weight_of_the_newest_block():
    model = make_sapt("llama", 3)
    batch = sample_batch("llama", batch=4)
    weights = model.routing_weights(batch["input_ids"], batch["attention_mask"], batch["labels"])
    expected = -torch.log(weights[:, -1]).mean()
    torch.testing.assert_close(own_block_loss(model, batch), expected)


def test_own_block_loss_trains_the_router_only():
    model = make_sapt("t5", 3)
    own_block_loss(model, sample_batch("t5")).backward()
    assert model.router.key.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.router.query_net[:2].parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" in n)  # no block gets gradient
    assert own_block_loss(make_sapt("t5", 1), sample_batch("t5")) is None  # one block: nothing to route


def test_remedies_are_refused_in_release_exact_mode():
    from transformers import Seq2SeqTrainingArguments

    from sapt.training.release_exact import REMEDY_ARGUMENTS, ReleaseArgumentError, check_release_arguments
    from sapt.training.task_args import SaptArguments

    training_args = Seq2SeqTrainingArguments(output_dir="unused", use_cpu=True)
    for name, value in zip(REMEDY_ARGUMENTS, (3, 0.1, 1.0)):
        args = SaptArguments(model_name_or_path="m", task_order="a,b", task="b", release_exact=True, **{name: value})
        with pytest.raises(ReleaseArgumentError, match=name):
            check_release_arguments(args, training_args, is_encoder_decoder=False)
        args.release_exact = False
        check_release_arguments(args, training_args, is_encoder_decoder=False)  # the default path takes it


# ---- the routing trace -----------------------------------------------------------------------------
def test_routing_summary_against_a_hand_computation():
    model = make_sapt("llama", 3)
    probes = {f"task{i + 1}": sample_batch("llama", batch=5, seed=i) for i in range(3)}
    summary = routing_summary(model, probes)
    spreads = []
    for block, (task, batch) in enumerate(probes.items()):
        logits = model.routing_logits(batch["input_ids"], batch["attention_mask"]).detach()
        rows = [row.tolist() for row in logits]
        weights = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in rows]
        own = sum(w[block] for w in weights) / len(weights)
        accuracy = sum(max(range(3), key=lambda j: w[j]) == block for w in weights) / len(weights)
        centred = [[v - sum(row) / 3 for v in row] for row in rows]
        spread = sum(
            math.sqrt(sum((c[j] - sum(r[j] for r in centred) / 5) ** 2 for c in centred) / 5) for j in range(3)
        ) / 3
        spreads.append(spread)
        got = summary[task]
        assert got["own_weight"] == pytest.approx(own, rel=1e-5)
        assert got["accuracy"] == pytest.approx(accuracy)
        assert got["logit_spread"] == pytest.approx(spread, rel=1e-4)
        assert got["new_block_weight"] == pytest.approx(sum(w[2] for w in weights) / 5, rel=1e-5)
    assert min(spreads) > 0  # the inputs route differently: the spread is not trivially zero


def test_term_log_means_and_round_trip(tmp_path):
    log = TermLog()
    for value in (1.0, 2.0, 4.5):
        log.add("ce", torch.tensor(value))
    log.add("arm", torch.tensor(0.25))
    log.save(tmp_path)
    restored = TermLog()
    restored.load(tmp_path)
    assert log.take() == {"ce": 2.5, "arm": 0.25}
    assert restored.take() == {"ce": 2.5, "arm": 0.25}
    assert log.take() == {}


def test_trace_written_during_training_and_trimmed_on_resume(tmp_path):
    from types import SimpleNamespace

    model = make_sapt("llama", 2)
    probes = {"task1": sample_batch("llama", seed=1), "task2": sample_batch("llama", seed=2)}
    trace = RoutingTrace(model, probes, every=2, output_dir=tmp_path, term_log=TermLog())
    state = SimpleNamespace(global_step=0, epoch=0.0)
    trace.begin(0)
    trace.on_train_begin(None, state, None)
    for step in range(1, 7):
        state.global_step = step
        trace.term_log.add("ce", torch.tensor(float(step)))
        trace.on_step_end(None, state, None)
    records = read_trace(tmp_path / "routing_trace.jsonl")
    assert [(r["step"], r["event"]) for r in records] == [(0, "start"), (2, "step"), (4, "step"), (6, "step")]
    assert records[1]["losses"] == {"ce": 1.5} and records[3]["losses"] == {"ce": 5.5}
    assert set(records[0]["tasks"]) == {"task1", "task2"}
    # A kill cut the last line in half; the run resumes from its checkpoint at step 4.
    with open(tmp_path / "routing_trace.jsonl", "a") as handle:
        handle.write('{"step": 8, "ev')
    state.global_step = 4
    resumed = RoutingTrace(model, probes, every=2, output_dir=tmp_path, term_log=TermLog())
    resumed.begin(4)
    resumed.on_train_begin(None, state, None)
    lines = (tmp_path / "routing_trace.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 2, 4]


# ---- router pretraining ----------------------------------------------------------------------------
def _pretrained(seed_model=0):
    from datasets import Dataset

    from sapt.training.router_pretraining import pretrain_router
    from sapt.training.trainer import LossTerm

    model = make_sapt("llama", 2, seed=seed_model)
    # The current task's prompts and the earlier task's pseudo inputs use different tokens: separable.
    prompts = Dataset.from_dict({"ids": torch.randint(4, 40, (6, 5), generator=torch.Generator().manual_seed(3)).tolist()})
    pseudo = Dataset.from_dict({"ids": torch.randint(50, 90, (6, 5), generator=torch.Generator().manual_seed(4)).tolist()})
    reflection = AttentiveReflection([pseudo], [[1.0]], IdCollator(), 2, 2)
    terms = [
        LossTerm("own_block", 1.0, lambda m, _, inputs: own_block_loss(m, inputs)),
        LossTerm("arm", 2.0, lambda m, p, _: reflection.loss(m, p)),
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = pretrain_router(model, terms, prompts, IdCollator(), steps=40, batch_size=2, learning_rate=0.005,
                             weight_decay=0.0, seed=7)
    return model, before, losses


def test_router_pretraining_moves_the_router_only_and_lowers_its_loss():
    model, before, losses = _pretrained()
    assert len(losses) == 40 and max(losses[-5:]) < 0.1 * losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("router.") for n in changed)
    assert "router.key" in changed and any(n.startswith("router.query_net.") for n in changed)


def test_router_pretraining_is_deterministic():
    first, _, losses_a = _pretrained()
    second, _, losses_b = _pretrained()
    assert losses_a == losses_b
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name


def test_remedy_arguments_that_cannot_work_are_refused_in_one_line():
    from sapt.training.task_args import SaptArguments
    from sapt.training.validation import _check_arguments
    from sapt.utils.cli import UsageError

    def args(**kw):
        return SaptArguments(model_name_or_path="m", task_order="a,b", task="b", **kw)

    _check_arguments(args(own_block_weight=1.0, router_pretrain_steps=200, freeze_router_while_training=True))
    for bad, message in (
        (dict(router_pretrain_steps=200), "needs --own_block_weight"),
        (dict(freeze_router_while_training=True), "needs --router_pretrain_steps"),
        (dict(arm_target_floor=1.0), "arm_target_floor"),
        (dict(arm_warmup_steps=-1), "arm_warmup_steps"),
        (dict(own_block_weight=-1.0), "own_block_weight"),
    ):
        with pytest.raises(UsageError, match=message):
            _check_arguments(args(**bad))


# ---- through sapt.train_task -----------------------------------------------------------------------
def _two_tasks(tiny_models, outputs, *extra):
    from conftest import BENCHMARK, GENERATED, SUPERNI_TASKS
    from sapt.training.train_task import main

    for position, task in enumerate(SUPERNI_TASKS[:2], 1):
        argv = [
            "--model_name_or_path", str(tiny_models["t5"]), "--data_dir", str(BENCHMARK), "--method", "sapt",
            "--task_order", ",".join(SUPERNI_TASKS[:2]), "--task", task, "--output_dir", str(outputs / f"{position}-{task}"),
            "--gen_data_dir", str(GENERATED / "lora_gen_superni_t5"), "--max_train_samples", "8",
            "--max_eval_samples", "4", "--max_predict_samples", "4", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "4", "--num_train_epochs", "2", "--eval_every_epochs", "1",
            "--max_source_length", "64", "--generation_max_length", "3", "--lora_r", "2", "--disable_tqdm", "true",
            "--routing_trace_every", "1", "--routing_trace_inputs", "3", *extra,
        ]
        if position > 1:
            argv += ["--previous_task_dir", str(outputs / f"1-{SUPERNI_TASKS[0]}")]
        assert main(argv) == 0
    return [json.loads(line) for line in (outputs / f"2-{SUPERNI_TASKS[1]}" / "routing_trace.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pretrained_router_is_traced_and_frozen_while_the_block_trains(tiny_models, tmp_path):
    remedies = ["--own_block_weight", "1", "--router_pretrain_steps", "40", "--learning_rate", "0.01"]
    frozen = _two_tasks(tiny_models, tmp_path / "frozen", *remedies, "--freeze_router_while_training", "true")
    assert [r["event"] for r in frozen[:2]] == ["before_pretraining", "start"]
    assert [r["step"] for r in frozen if r["event"] == "step"] == [1, 2, 3, 4]
    assert frozen[0]["tasks"] != frozen[1]["tasks"]  # pretraining moved the router
    assert all(r["tasks"] == frozen[1]["tasks"] for r in frozen[2:])  # and nothing moved it afterwards
    assert set(frozen[2]["losses"]) == {"ce", "own_block", "arm"}
    trained = _two_tasks(tiny_models, tmp_path / "trained", *remedies)
    assert trained[1]["tasks"] == frozen[1]["tasks"]  # the same pretraining: deterministic
    assert trained[-1]["tasks"] != frozen[-1]["tasks"]  # unfrozen, the block's training moves the router
    plain = _two_tasks(tiny_models, tmp_path / "plain")
    assert plain[0]["event"] == "start" and plain[0]["tasks"] == frozen[0]["tasks"]
