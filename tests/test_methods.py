"""The baseline methods that share SAPT's harness."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import Seq2SeqTrainingArguments

from conftest import BENCHMARK, GENERATED, SUPERNI_TASKS, make_sapt, sample_batch
from sapt.o_lora import l2_loss, orthogonality_loss
from sapt.checkpoint import load_checkpoint
from sapt.training.data import load_split
from sapt.training.task_args import SaptArguments, plan
from sapt.training.task_data import load_training_data, replay_memory, union
from sapt.training.train_task import main, training_terms
from sapt.training.trainer import SaptTrainer

TASKS = SUPERNI_TASKS


def test_orthogonality_term_is_zero_for_orthogonal_blocks_and_positive_otherwise():
    model = make_sapt("t5", 2, method="o_lora")
    for _, layer in model.sapt_layers():
        d_in = layer.in_features
        basis = torch.eye(d_in)
        layer.set_frozen_blocks(basis[None, :4], torch.zeros(1, layer.out_features, 4))  # old block: e_0..e_3
        layer.lora_A.data = basis[4:8].clone()  # new block spans e_4..e_7
    assert orthogonality_loss(model).item() == 0.0
    layer = next(layer for _, layer in model.sapt_layers())
    layer.lora_A.data[0, 0] = 0.5  # touch the old subspace in one projection
    assert orthogonality_loss(model).item() == pytest.approx(0.5)


def test_l2_term_is_the_squared_norm_of_the_trainable_block():
    model = make_sapt("llama", 2, method="o_lora")
    expected = sum(l.lora_A.pow(2).sum() + l.lora_B.pow(2).sum() for _, l in model.sapt_layers())
    torch.testing.assert_close(l2_loss(model), expected)


def hand_orthogonality(model) -> torch.Tensor:
    """Σ over projections, over earlier blocks i, over entries of |A_new A_iᵀ| (block by block)."""
    total = torch.zeros(())
    for _, layer in model.sapt_layers():
        for old_A in layer.past_A:  # (r, d_in) each
            total = total + sum(abs(new_row @ old_row) for new_row in layer.lora_A for old_row in old_A)
    return total


def hand_l2(model) -> torch.Tensor:
    return sum(sum(v * v for v in p.flatten()) for _, l in model.sapt_layers() for p in (l.lora_A, l.lora_B))


def test_o_lora_terms_reach_the_training_loss_with_their_weights(tmp_path):
    """One Trainer step of task 3 of 3: its loss is CE + λ1·Σ|A_new A_oldᵀ| + λ2·‖A_new, B_new‖², with the
    weights as given on the command line."""
    args = SaptArguments(model_name_or_path="tiny", task_order="a,b,c", task="c", method="o_lora",
                         orthogonal_weight=0.7, l2_weight=0.2)
    model = make_sapt("t5", 3, method="o_lora")
    batch = sample_batch("t5")
    rows = [{k: v[i] for k, v in batch.items()} for i in range(3)]
    collate = lambda examples: {k: torch.stack([ex[k] for ex in examples]) for k in examples[0]}
    trainer = SaptTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", max_steps=1,
            per_device_train_batch_size=3, learning_rate=1e-3, remove_unused_columns=False, disable_tqdm=True,
        ),
        train_dataset=rows, data_collator=collate,
        regularizers=training_terms(args, model, plan(args), [], None, 3, 0),
    )
    reference = make_sapt("t5", 3, method="o_lora").train()  # the same starting weights
    with torch.no_grad():
        ce = reference(**batch).loss
        orthogonality, l2 = hand_orthogonality(reference), hand_l2(reference)
    assert orthogonality > 1 and l2 > 1  # both terms change the loss visibly
    loss = trainer.train().training_loss
    assert loss == pytest.approx((ce + 0.7 * orthogonality + 0.2 * l2).item(), rel=1e-5)


def test_o_lora_sums_blocks_with_weight_one():
    model = make_sapt("t5", 3, method="o_lora")
    assert model.router is None
    batch = sample_batch("t5")
    model(**batch)
    torch.testing.assert_close(model.routing.weights, torch.ones(3, 3))


def test_one_block_methods_keep_training_the_same_block():
    model = make_sapt("llama", 1, method="seq_lora")
    before = [l.lora_A.detach().clone() for _, l in model.sapt_layers()]
    model.freeze_current_task()
    model.add_task("task2")
    assert model.num_blocks == 1 and model.tasks == ["task1", "task2"]
    for (_, layer), old in zip(model.sapt_layers(), before):
        assert layer.lora_A.requires_grad and torch.equal(layer.lora_A, old)


def test_replay_memory_keeps_two_percent_of_each_task_at_least_one():
    big = Dataset.from_dict({"source": [f"a{i}" for i in range(200)], "target": ["x"] * 200, "index": list(range(200))})
    small = Dataset.from_dict({"source": ["b0", "b1"], "target": ["y", "y"], "index": [0, 1]})
    memory = replay_memory([big, small], 0.02, seed=0)
    assert len(memory) == 4 + 1
    assert memory["source"] == replay_memory([big, small], 0.02, seed=0)["source"]
    assert union([small, small])["index"] == [0, 1, 2, 3]


def test_replay_memory_draws_two_percent_of_each_earlier_task_from_its_real_rows():
    trains = [load_split(BENCHMARK, task, "train", seed=1) for task in TASKS]
    memory = replay_memory(trains, 0.02, seed=7)
    for number, (task, train) in enumerate(zip(TASKS, trains)):
        rows = [row for row in memory if row["task"] == task]
        assert len(rows) == max(1, round(0.02 * len(train)))
        # Real rows of that task's training set (index = place in its split), each drawn once.
        assert all(row == train[row["index"]] for row in rows)
        drawn = [row["index"] for row in rows]
        assert len(set(drawn)) == len(drawn)
        assert drawn != list(range(len(drawn)))  # a draw, not the head of the set
        # The draw: the set shuffled with seed + the task's place among the earlier tasks.
        assert drawn == train.shuffle(seed=7 + number)["index"][: len(drawn)]
    again, other_seed = replay_memory(trains, 0.02, seed=7), replay_memory(trains, 0.02, seed=8)
    assert again["index"] == memory["index"] and other_seed["index"] != memory["index"]


def test_replay_step_trains_on_its_task_plus_the_memory_of_the_earlier_one():
    args = SaptArguments(model_name_or_path="tiny", task_order=",".join(TASKS), task=TASKS[1], method="replay",
                         data_dir=str(BENCHMARK), max_train_samples=150, max_predict_samples=2)
    train, _, tests, _ = load_training_data(args, plan(args), seed=3)
    own = load_split(BENCHMARK, TASKS[1], "train", seed=3, max_samples=150)
    earlier = load_split(BENCHMARK, TASKS[0], "train", seed=3, max_samples=150)
    rows = list(train)
    assert rows[: len(own)] == list(own)
    memory = rows[len(own) :]
    assert len(memory) == 3 == round(0.02 * 150)  # the default ratio, of the capped earlier set
    assert all(row["task"] == TASKS[0] and row == earlier[row["index"]] for row in memory)
    assert list(tests) == TASKS


def run_method(tiny_models, outputs, method, positions=(1, 2)):
    for position in positions:
        task = TASKS[position - 1]
        argv = [
            "--model_name_or_path", str(tiny_models["t5"]), "--data_dir", str(BENCHMARK), "--method", method,
            "--task_order", ",".join(TASKS), "--task", task, "--output_dir", str(outputs / f"{position}-{task}"),
            "--gen_data_dir", str(GENERATED / "lora_gen_superni_t5"),
            "--max_train_samples", "8", "--max_eval_samples", "4", "--max_predict_samples", "4",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--num_train_epochs", "1",
            "--max_source_length", "64", "--generation_max_length", "3", "--lora_r", "2", "--disable_tqdm", "true",
        ]
        if position > 1:
            argv += ["--previous_task_dir", str(outputs / f"{position - 1}-{TASKS[position - 2]}")]
        assert main(argv) == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sapt", "o_lora", "seq_lora", "replay", "single"])
def test_every_method_runs_two_quick_tasks(tiny_models, tmp_path, method):
    outputs = tmp_path / "outputs"
    run_method(tiny_models, outputs, method)
    final = json.loads((outputs / f"2-{TASKS[1]}" / "all_results.json").read_text())
    evaluated = TASKS[1:] if method == "single" else TASKS
    assert {k for k in final if k.startswith("predict_eval_rougeL_for_")} == {f"predict_eval_rougeL_for_{t}" for t in evaluated}
    model = load_checkpoint(outputs)
    blocks = 2 if method in ("sapt", "o_lora") else 1
    assert model.num_blocks == blocks and (model.router is not None) == (method == "sapt")


def test_mtl_learns_the_union_in_one_step(tiny_models, tmp_path):
    outputs = tmp_path / "outputs"
    run_method(tiny_models, outputs, "mtl", positions=(2,))
    model = load_checkpoint(outputs)
    assert model.tasks == TASKS and model.num_blocks == 1
    final = json.loads((outputs / f"2-{TASKS[1]}" / "all_results.json").read_text())
    assert all(f"predict_exact_match_for_{t}" in final for t in TASKS)


def test_joint_run_scores_ap_only(tmp_path):
    from sapt.experiments.cl_metrics import read_run, summarize

    outputs = tmp_path / "outputs"
    final = outputs / f"2-{TASKS[1]}"
    final.mkdir(parents=True)
    (outputs / "task_order.txt").write_text(",".join(TASKS) + "\n")
    scores = {f"predict_eval_rougeL_for_{t}": s for t, s in zip(TASKS, (40.0, 60.0))}
    scores.update({f"predict_exact_match_for_{t}": 0.0 for t in TASKS})
    (final / "all_results.json").write_text(json.dumps(scores))
    tasks, matrix, metric = read_run(outputs)
    summary = summarize(matrix)
    assert tasks == TASKS and metric == "rougeL"
    assert summary["AP"] == 50.0 and summary["F.Ra"] is None and summary["BWT"] is None
