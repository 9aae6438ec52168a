"""sapt.evaluate: re-evaluating a finished run with its routing replaced, on a tiny two-task run trained
here with `python -m sapt train_task`; and the proof that default evaluation never reads task identity."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from datasets import concatenate_datasets

from conftest import BENCHMARK, GENERATED, REPO_ROOT, SUPERNI_TASKS
from sapt.experiments import evaluate
from sapt.run_files import ROUTING_KEY
from sapt.checkpoint import load_checkpoint, load_routing_mean
from sapt.training.collators import Collator
from sapt.training.metrics import compute_metrics
from sapt.training.prediction import load_test_sets, predict_tests

TASKS = SUPERNI_TASKS
PREDICT = 6
EVAL_BATCH = 4  # 6 test inputs: a batch of 4 and one of 2, so padding varies between batches


def step_arguments(model_dir, outputs, position):
    task = TASKS[position - 1]
    arguments = {
        "model_name_or_path": str(model_dir), "data_dir": str(BENCHMARK), "task_order": ",".join(TASKS),
        "task": task, "output_dir": str(outputs / f"{position}-{task}"),
        "gen_data_dir": str(GENERATED / "lora_gen_superni_llama"),
        "max_train_samples": 8, "max_eval_samples": 2, "max_predict_samples": PREDICT,
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": EVAL_BATCH, "max_steps": 4,
        "learning_rate": 0.02, "max_source_length": 160, "generation_max_length": 3, "lora_r": 2, "seed": 7,
        "disable_tqdm": True,
    }
    if position > 1:
        arguments["previous_task_dir"] = str(outputs / f"1-{TASKS[0]}")
    return arguments


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory):
    """A finished two-task SAPT run (tiny LLaMA), and the folder of its step configs."""
    root = tmp_path_factory.mktemp("evaluate")
    outputs, configs = root / "run" / "outputs", root / "configs"
    configs.mkdir()
    for position in (1, 2):
        config = configs / f"{position}-{TASKS[position - 1]}.json"
        config.write_text(json.dumps(step_arguments(tiny_models["llama"], outputs, position)))
        done = subprocess.run(
            [sys.executable, "-m", "sapt", "train_task", str(config)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return root / "run", configs


def read_records(folder, task):
    return [json.loads(line) for line in (folder / "predictions" / f"{task}.jsonl").read_text().splitlines()]


def folder(outputs, position):
    return outputs / f"{position}-{TASKS[position - 1]}"


@pytest.mark.slow
def test_learned_routing_reproduces_the_stored_results(run):
    run_dir, _ = run
    written = evaluate.evaluate_run(run_dir, "learned")
    assert written == run_dir / "routing" / "learned" / "outputs"
    assert (written / "task_order.txt").read_bytes() == ",".join(TASKS).encode()
    stored_routing = [r[ROUTING_KEY] for r in read_records(folder(run_dir / "outputs", 2), TASKS[0])]
    assert all(len(w) == 2 and 0 < w[0] < 1 for w in stored_routing)  # train_task stored real mixtures
    for position in (1, 2):
        stored = json.loads((folder(run_dir / "outputs", position) / "all_results.json").read_text())
        again = json.loads((folder(written, position) / "all_results.json").read_text())
        assert again == {k: v for k, v in stored.items() if k.startswith("predict_")}
        for task in TASKS[:position]:
            assert read_records(folder(written, position), task) == read_records(folder(run_dir / "outputs", position), task)


def test_oracle_with_one_block_equals_single_block_evaluation(run, tiny_models, tmp_path):
    run_dir, _ = run
    outputs = run_dir / "outputs"
    oracle = evaluate.evaluate_run(run_dir, "oracle")
    second = folder(oracle, 2)
    assert [r[ROUTING_KEY] for r in read_records(second, TASKS[0])] == [[1.0, 0.0]] * PREDICT
    assert [r[ROUTING_KEY] for r in read_records(second, TASKS[1])] == [[0.0, 1.0]] * PREDICT
    # Block 1 alone is the model after task 1: its stored predictions.
    assert read_records(folder(oracle, 1), TASKS[0]) == read_records(folder(outputs, 1), TASKS[0])
    texts = [r["prediction"] for r in read_records(second, TASKS[0])]
    assert texts == [r["prediction"] for r in read_records(folder(outputs, 1), TASKS[0])]
    # Block 2 alone: the model after task 2 with block 1 taken out.
    single = load_checkpoint(folder(outputs, 2))
    for _, layer in single.sapt_layers():
        layer.set_frozen_blocks(layer.past_A[1:], layer.past_B[1:])
    single.router.past_keys = single.router.past_keys[1:]
    single.sapt_config.tasks = TASKS[1:]
    settings = json.loads((folder(outputs, 2) / "task_args.json").read_text())
    alone = single_block_predictions(single, tiny_models["llama"], settings, tmp_path)
    assert [r["prediction"] for r in read_records(second, TASKS[1])] == alone
    learned = [r["prediction"] for r in read_records(folder(outputs, 2), TASKS[1])]
    assert alone != learned  # the routing changes the output here, so the equality above could fail
    results = json.loads((second / "all_results.json").read_text())
    references = [r["target"] for r in read_records(second, TASKS[1])]
    assert results[f"predict_exact_match_for_{TASKS[1]}"] == compute_metrics(alone, references)["exact_match"]


def single_block_predictions(model, model_dir, settings, tmp_path) -> list[str]:
    from sapt.backbone import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir), False)
    trainer = evaluate.prediction_trainer(model, tokenizer, settings, tmp_path)
    tests = load_test_sets(BENCHMARK, TASKS[1:], settings["seed"], PREDICT)
    return [r["prediction"] for r in predict_tests(trainer, model, tokenizer, tests).records[TASKS[1]]]


def test_uniform_and_mean_routing_weights_and_resume(run, monkeypatch):
    run_dir, _ = run
    outputs = run_dir / "outputs"
    uniform = evaluate.evaluate_run(run_dir, "uniform")
    assert {tuple(r[ROUTING_KEY]) for t in TASKS for r in read_records(folder(uniform, 2), t)} == {(0.5, 0.5)}
    mean = evaluate.evaluate_run(run_dir, "ā")  # the alias of mean
    assert mean == run_dir / "routing" / "mean" / "outputs"
    first_mean = load_routing_mean(folder(outputs, 1))  # [1.0], padded with a zero for block 2
    second_mean = load_routing_mean(folder(outputs, 2))
    assert [r[ROUTING_KEY] for r in read_records(folder(mean, 2), TASKS[0])] == [first_mean + [0.0]] * PREDICT
    assert [r[ROUTING_KEY] for r in read_records(folder(mean, 2), TASKS[1])] == [second_mean] * PREDICT
    # A second call redoes nothing.
    monkeypatch.setattr(evaluate, "evaluate_row", lambda *a: pytest.fail("a finished row was evaluated again"))
    assert evaluate.evaluate_run(run_dir, "mean") == mean


def without_routing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != ROUTING_KEY}


def same_routing(record: dict, expected: dict) -> bool:
    """Equal routing weights up to float noise: a batch of other inputs (or another size) can change the
    last bits of the batched products, never more."""
    a, b = record[ROUTING_KEY], expected[ROUTING_KEY]
    return len(a) == len(b) and all(abs(x - y) <= 1e-6 for x, y in zip(a, b))


def test_older_folders_take_the_step_configs(run, tmp_path):
    run_dir, configs = run
    older = tmp_path / "older"
    shutil.copytree(run_dir / "outputs", older / "outputs")
    for task_args in (older / "outputs").glob("*/task_args.json"):
        task_args.unlink()
    assert evaluate.main([str(older), "--routing", "learned"]) == 2  # needs --config now
    assert not (older / "routing").exists()
    written = evaluate.evaluate_run(older, "learned", config_dir=configs, overrides={"max_predict_samples": 3})
    results = json.loads((folder(written, 2) / "all_results.json").read_text())
    records = read_records(folder(written, 2), TASKS[1])
    stored = read_records(folder(run_dir / "outputs", 2), TASKS[1])
    assert len(records) == 3 and [without_routing(r) for r in records] == [without_routing(r) for r in stored[:3]]
    assert all(same_routing(r, s) for r, s in zip(records, stored))
    scores = compute_metrics([r["prediction"] for r in records], [r["target"] for r in records])
    assert results[f"predict_exact_match_for_{TASKS[1]}"] == scores["exact_match"]


def test_mistakes_are_one_line_and_write_nothing(run, tmp_path, capsys):
    run_dir, _ = run
    assert evaluate.main([str(tmp_path / "nowhere"), "--routing", "learned"]) == 2
    assert evaluate.main([str(run_dir), "--routing", "best"]) == 2
    plain = tmp_path / "plain"
    shutil.copytree(run_dir / "outputs", plain / "outputs")
    config = folder(plain / "outputs", 1) / "sapt_config.json"
    config.write_text(config.read_text().replace('"method": "sapt"', '"method": "seq_lora"'))
    assert evaluate.main([str(plain), "--routing", "oracle"]) == 2
    assert evaluate.main([str(run_dir), "--routing", "oracle", "--batch_size", "0"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("sapt evaluate: error: ") for line in errors)
    assert "no run here" in errors[0] and "unknown routing 'best'" in errors[1]
    assert "'seq_lora' has no router" in errors[2]
    assert not (plain / "routing").exists() and not (tmp_path / "nowhere").exists()


def test_compare_labels_the_oracle_as_an_upper_bound_reading_the_task_id(run, capsys):
    spec = importlib.util.spec_from_file_location("score_cli", REPO_ROOT / "score.py")
    score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score)
    run_dir, _ = run
    oracle = evaluate.evaluate_run(run_dir, "oracle")
    assert score.main(["--compare", str(run_dir), str(oracle)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("run [oracle routing: own block only, reads the task id]")


# ---- no task identity at test time ---------------------------------------------------------------
def test_mixed_batches_give_the_per_task_predictions_and_routing(run, tiny_models, tmp_path):
    """Test inputs of both tasks shuffled into mixed batches: every prediction and routing weight is
    the one per-task evaluation gives, so evaluation cannot depend on which task an input is from."""
    from sapt.backbone import load_tokenizer

    run_dir, _ = run
    model = load_checkpoint(folder(run_dir / "outputs", 2))
    assert not model.sapt_config.pool_padding
    tokenizer = load_tokenizer(str(tiny_models["llama"]), False)
    settings = json.loads((folder(run_dir / "outputs", 2) / "task_args.json").read_text())
    trainer = evaluate.prediction_trainer(model, tokenizer, settings, tmp_path)
    tests = load_test_sets(BENCHMARK, TASKS, 7, PREDICT)
    per_task = predict_tests(trainer, model, tokenizer, tests).records

    origin = [(task, i) for task in TASKS for i in range(PREDICT)]
    order = torch.randperm(len(origin), generator=torch.Generator().manual_seed(3)).tolist()
    pooled = concatenate_datasets([tests[t] for t in TASKS]).select(order)
    mixed = pooled.map(lambda _, i: {"index": i, "task": "unknown"}, with_indices=True)
    records = predict_tests(trainer, model, tokenizer, {"mixed": mixed}).records["mixed"]

    # The batches really mix the tasks, and pad inputs to other lengths than per-task batches do.
    collator = Collator(tokenizer, False, max_source_length=settings["max_source_length"], for_generation=True)
    batches = [order[s : s + EVAL_BATCH] for s in range(0, len(order), EVAL_BATCH)]
    assert any(len({origin[k][0] for k in batch}) == 2 for batch in batches)
    mixed_width = {origin[k]: len(collator([pooled[j] for j in range(s, s + len(b))])["input_ids"][0])
                   for s, b in zip(range(0, len(order), EVAL_BATCH), batches) for k in b}
    own_width = {
        (task, i): len(collator([tests[task][j] for j in range(s, min(s + EVAL_BATCH, PREDICT))])["input_ids"][0])
        for task in TASKS for s in range(0, PREDICT, EVAL_BATCH) for i in range(s, min(s + EVAL_BATCH, PREDICT))
    }
    assert sum(mixed_width[key] != own_width[key] for key in origin) >= 4
    routing = [r[ROUTING_KEY] for t in TASKS for r in per_task[t]]
    assert len({tuple(w) for w in routing}) > 1  # routing depends on the input

    for record in records:
        task, i = origin[order[record["index"]]]
        expected = per_task[task][i]
        assert expected["index"] == i
        assert record["prediction"] == expected["prediction"] and same_routing(record, expected)
