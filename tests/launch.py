"""Running one task of the two-task SuperNI order as a subprocess, under any launcher, and comparing
what two runs saved (shared by the multi-process and DeepSpeed tests)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import BENCHMARK, REPO_ROOT, SHARED

TASKS = ["task363_sst2_polarity_classification", "task875_emotion_classification"]
TOLERANCE = 1e-5  # float summation order differs between one and several processes


def no_dropout_copy(model_dir, destination):
    """Dropout draws different masks in different process layouts; equality needs it off."""
    shutil.copytree(model_dir, destination)
    config = json.loads((destination / "config.json").read_text())
    config["dropout_rate"] = 0.0
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def run_task(launcher, model, family, outputs, position, per_device_batch, *extra):
    """Train task `position` (1 or 2) of TASKS; returns (task folder, stderr)."""
    task = TASKS[position - 1]
    command = launcher + [
        "-m", "sapt.train_task", "--model_name_or_path", str(model), "--data_dir", str(BENCHMARK),
        "--task_order", ",".join(TASKS), "--task", task, "--output_dir", str(outputs / f"{position}-{task}"),
        "--gen_data_dir", str(SHARED / "generated_data" / f"lora_gen_superni_{family}"),
        "--max_train_samples", "16", "--max_eval_samples", "6", "--max_predict_samples", "6",
        "--per_device_train_batch_size", str(per_device_batch), "--per_device_eval_batch_size", "2",
        "--num_train_epochs", "1", "--max_source_length", "64", "--generation_max_length", "4", "--lora_r", "2",
        # SGD, in order: the comparison checks the gradient arithmetic itself (Adam would turn
        # rounding noise on near-zero gradients into steps of size lr).
        "--optim", "sgd", "--learning_rate", "0.5", "--train_sampling_strategy", "sequential",
        "--seed", "3", "--disable_tqdm", "true", "--eval_every_epochs", "1", *extra,
    ]
    if position > 1:
        command += ["--previous_task_dir", str(outputs / f"1-{TASKS[0]}")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return outputs / f"{position}-{task}", done.stderr


def assert_same_task(folder_a, folder_b):
    for name in ("block.safetensors", "router.safetensors"):
        a, b = load_file(str(folder_a / name)), load_file(str(folder_b / name))
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].shape == b[key].shape
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=TOLERANCE)
    mean_a = json.loads((folder_a / "routing_mean.json").read_text())
    mean_b = json.loads((folder_b / "routing_mean.json").read_text())
    assert mean_a["tasks"] == mean_b["tasks"]
    assert mean_a["weights"] == pytest.approx(mean_b["weights"], abs=TOLERANCE)
    results_a = json.loads((folder_a / "all_results.json").read_text())
    results_b = json.loads((folder_b / "all_results.json").read_text())
    predict = {k for k in results_b if k.startswith("predict_")}
    assert predict and {k: results_a[k] for k in predict} == {k: results_b[k] for k in predict}
    for task_file in (folder_b / "predictions").iterdir():  # gathered from every rank, in order
        assert (folder_a / "predictions" / task_file.name).read_text() == task_file.read_text()


def torchrun(processes: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
