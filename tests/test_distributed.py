"""Two processes (torchrun / accelerate launch, gloo on the CPU) take the same steps as one process
with the same global batch: equal saved blocks, router, ā and metrics."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import BENCHMARK, REPO_ROOT, SHARED, requires_benchmark

TASKS = ["task363_sst2_polarity_classification", "task875_emotion_classification"]
TOLERANCE = 1e-5  # float summation order differs between one and two processes


def no_dropout_copy(model_dir, destination):
    """Dropout draws different masks in different process layouts; equality needs it off."""
    shutil.copytree(model_dir, destination)
    config = json.loads((destination / "config.json").read_text())
    config["dropout_rate"] = 0.0
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def run(launcher, model, outputs, position, per_device_batch):
    task = TASKS[position - 1]
    command = launcher + [
        "-m", "sapt.train_task", "--model_name_or_path", str(model), "--data_dir", str(BENCHMARK),
        "--task_order", ",".join(TASKS), "--task", task, "--output_dir", str(outputs / f"{position}-{task}"),
        "--gen_data_dir", str(SHARED / "generated_data" / "lora_gen_superni_t5"),
        "--max_train_samples", "16", "--max_eval_samples", "6", "--max_predict_samples", "6",
        "--per_device_train_batch_size", str(per_device_batch), "--per_device_eval_batch_size", "2",
        "--num_train_epochs", "1", "--max_source_length", "64", "--generation_max_length", "4", "--lora_r", "2",
        # SGD, in order: the comparison checks the gradient arithmetic itself (Adam would turn
        # rounding noise on near-zero gradients into steps of size lr).
        "--optim", "sgd", "--learning_rate", "0.5", "--train_sampling_strategy", "sequential",
        "--seed", "3", "--disable_tqdm", "true", "--eval_every_epochs", "1",
    ]
    if position > 1:
        command += ["--previous_task_dir", str(outputs / f"1-{TASKS[0]}")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return outputs / f"{position}-{task}"


def assert_same_task(folder_a, folder_b):
    for name in ("block.safetensors", "router.safetensors"):
        a, b = load_file(str(folder_a / name)), load_file(str(folder_b / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=TOLERANCE)
    mean_a = json.loads((folder_a / "routing_mean.json").read_text())
    mean_b = json.loads((folder_b / "routing_mean.json").read_text())
    assert mean_a["tasks"] == mean_b["tasks"]
    assert mean_a["weights"] == pytest.approx(mean_b["weights"], abs=TOLERANCE)
    results_a = json.loads((folder_a / "all_results.json").read_text())
    results_b = json.loads((folder_b / "all_results.json").read_text())
    predict = {k for k in results_b if k.startswith("predict_")}
    assert predict and {k: results_a[k] for k in predict} == {k: results_b[k] for k in predict}
    for task_file in (folder_b / "predictions").iterdir():  # gathered from both ranks, in order
        assert (folder_a / "predictions" / task_file.name).read_text() == task_file.read_text()


@requires_benchmark()
def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_models, tmp_path):
    model = no_dropout_copy(tiny_models["t5"], tmp_path / "t5")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    single = [sys.executable]
    for position in (1, 2):  # task 2 adds the router and ARM to what must agree
        two = run(torchrun, model, tmp_path / "two", position, per_device_batch=4)
        one = run(single, model, tmp_path / "one", position, per_device_batch=8)
        assert_same_task(two, one)
    # Only rank 0 writes: one copy of every file, nothing left under temporary names.
    assert not list((tmp_path / "two").rglob("*.tmp"))


@requires_benchmark()
def test_accelerate_launch_works_the_same_way(tiny_models, tmp_path):
    model = no_dropout_copy(tiny_models["t5"], tmp_path / "t5")
    accelerate = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29532",
    ]
    launched = run(accelerate, model, tmp_path / "accelerate", 1, per_device_batch=4)
    single = run([sys.executable], model, tmp_path / "one", 1, per_device_batch=8)
    assert_same_task(launched, single)
