"""Two tasks from the command line, one process per task, on tiny T5 and tiny LLaMA with real SuperNI data."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import BENCHMARK, GENERATED, REPO_ROOT, SUPERNI_TASKS
from sapt.checkpoint import load_checkpoint

TASKS = SUPERNI_TASKS
ARTIFACTS = [
    "sapt_config.json", "lineage.json", "block.safetensors", "router.safetensors", "routing_mean.json",
    "routing_weights.json", "all_results.json", "task_complete.json", "task_args.json",
]


def train_task(model_dir, outputs, position, family, extra=()):
    task = TASKS[position - 1]
    command = [
        sys.executable, "-m", "sapt", "train_task",
        "--model_name_or_path", str(model_dir), "--data_dir", str(BENCHMARK),
        "--task_order", ",".join(TASKS), "--task", task,
        "--output_dir", str(outputs / f"{position}-{task}"),
        "--gen_data_dir", str(GENERATED / f"lora_gen_superni_{family}"),
        "--max_train_samples", "16", "--max_eval_samples", "4", "--max_predict_samples", "4",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--num_train_epochs", "1", "--learning_rate", "1e-3", "--max_source_length", "96",
        "--generation_max_length", "4", "--eval_strategy", "epoch", "--lora_r", "2", "--kl_ratio", "0.5",
        "--seed", "7", "--disable_tqdm", "true", *extra,
    ]
    if position > 1:
        command += ["--previous_task_dir", str(outputs / f"{position - 1}-{TASKS[position - 2]}")]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_two_task_run_writes_every_file_and_key(tiny_models, tmp_path, family):
    outputs = tmp_path / "logs_and_outputs" / "run" / "outputs"
    for position in (1, 2):
        done = train_task(tiny_models[family], outputs, position, family)
        assert done.returncode == 0, done.stderr[-3000:]
    # Byte for byte the release's format: its score.py splits on commas without stripping.
    assert (outputs / "task_order.txt").read_bytes() == ",".join(TASKS).encode()
    assert all((outputs / f"{i}-{t}").is_dir() for i, t in enumerate((outputs / "task_order.txt").read_text().split(","), 1))
    for position, task in enumerate(TASKS, start=1):
        folder = outputs / f"{position}-{task}"
        for name in ARTIFACTS:
            assert (folder / name).is_file(), f"{folder / name} missing"
        results = json.loads((folder / "all_results.json").read_text())
        for seen in TASKS[:position]:
            assert 0 <= results[f"predict_exact_match_for_{seen}"] <= 100
            assert 0 <= results[f"predict_eval_rougeL_for_{seen}"] <= 100
            lines = (folder / "predictions" / f"{seen}.jsonl").read_text().splitlines()
            assert len(lines) == 4 and {"index", "target", "prediction"} <= set(json.loads(lines[0]))
    first_mean = json.loads((outputs / f"1-{TASKS[0]}" / "routing_mean.json").read_text())
    assert first_mean == {"tasks": [TASKS[0]], "weights": [1.0]}
    second_mean = json.loads((outputs / f"2-{TASKS[1]}" / "routing_mean.json").read_text())
    assert second_mean["tasks"] == TASKS[::-1] and sum(second_mean["weights"]) == pytest.approx(1.0)

    # The old block and the old key did not change while task 2 trained.
    first = load_checkpoint(outputs / f"1-{TASKS[0]}")
    second = load_checkpoint(outputs)
    assert second.tasks == TASKS and second.num_blocks == 2
    for (_, a), (_, b) in zip(first.sapt_layers(), second.sapt_layers()):
        assert torch.equal(a.past_A[0], b.past_A[0]) and torch.equal(a.past_B[0], b.past_B[0])
    assert torch.equal(first.router.keys()[0], second.router.keys()[0])


@pytest.mark.slow
def test_user_mistakes_get_one_line_and_exit_2(tiny_models, tmp_path):
    outputs = tmp_path / "outputs"
    second = train_task(tiny_models["t5"], outputs, 2, "t5")  # no first task trained
    assert second.returncode == 2
    assert not outputs.exists()  # nothing written, not even the run's lock or its folder
    assert second.stderr.strip().splitlines()[-1].startswith("sapt train_task: error: ")
    assert "Traceback" not in second.stderr
    unknown = train_task(tiny_models["t5"], outputs, 1, "t5", extra=["--task", "nope"])
    assert unknown.returncode == 2 and "not in --task_order" in unknown.stderr
    assert not (outputs / f"1-{TASKS[0]}" / "all_results.json").exists()


def test_bf16_training_runs_on_the_cpu(tiny_models, tmp_path):
    from sapt.training.train_task import main

    task = TASKS[0]
    argv = [
        "--model_name_or_path", str(tiny_models["llama"]), "--data_dir", str(BENCHMARK), "--task_order", task,
        "--task", task, "--output_dir", str(tmp_path / f"1-{task}"), "--bf16", "true",
        "--max_train_samples", "8", "--max_eval_samples", "2", "--max_predict_samples", "2",
        "--per_device_train_batch_size", "4", "--max_source_length", "64", "--generation_max_length", "3",
        "--learning_rate", "1e-2", "--disable_tqdm", "true",
    ]
    assert main(argv) == 0
    results = json.loads((tmp_path / f"1-{task}" / "train_results.json").read_text())
    assert math.isfinite(results["train_loss"])  # neither NaN nor inf
    from safetensors.torch import load_file

    block = load_file(str(tmp_path / f"1-{task}" / "block.safetensors"))
    assert {t.dtype for t in block.values()} == {torch.float32}  # adapters stay fp32 under autocast
    assert any(t.abs().sum() > 0 for name, t in block.items() if name.endswith("lora_B"))
