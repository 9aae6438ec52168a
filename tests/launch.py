"""Running one task of the two-task SuperNI order as a subprocess, under any launcher, and comparing
what two runs saved (shared by the multi-process and DeepSpeed tests)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import BENCHMARK, GENERATED, REPO_ROOT, SUPERNI_TASKS

TASKS = SUPERNI_TASKS
TOLERANCE = 1e-5  # float summation order differs between one and several processes
# Long enough that every set holds several distinct prompts (checked by `distinct_prompts`): at 64
# tokens the release's SuperNI prompts all end inside the shared Definition text, and one prompt per set
# could not show rows that were paired with the wrong index or the wrong process.
SOURCE_LENGTH = 128


def no_dropout_copy(model_dir, destination):
    """Dropout draws different masks in different process layouts; equality needs it off."""
    shutil.copytree(model_dir, destination)
    config = json.loads((destination / "config.json").read_text())
    config["dropout_rate"] = 0.0
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def run_task(launcher, model, family, outputs, position, per_device_batch, *extra, accumulation=1, optimizer="sgd",
             first_task_dir=None):
    """Train task `position` (1 or 2) of TASKS; returns (task folder, stderr). Task 2 builds on
    `first_task_dir` (default: task 1's folder under the same `outputs`)."""
    task = TASKS[position - 1]
    # SGD by default: the comparisons then check the gradient arithmetic itself (Adam turns rounding noise on
    # near-zero gradients into steps of size lr); AdamW runs at a small rate for the same reason.
    learning_rate = {"sgd": "0.5", "adamw_torch": "0.002"}[optimizer]
    command = launcher + [
        "-m", "sapt", "train_task", "--model_name_or_path", str(model), "--data_dir", str(BENCHMARK),
        "--task_order", ",".join(TASKS), "--task", task, "--output_dir", str(outputs / f"{position}-{task}"),
        "--gen_data_dir", str(GENERATED / f"lora_gen_superni_{family}"),
        "--max_train_samples", "16", "--max_eval_samples", "6", "--max_predict_samples", "6",
        "--per_device_train_batch_size", str(per_device_batch), "--per_device_eval_batch_size", "2",
        "--gradient_accumulation_steps", str(accumulation),
        "--num_train_epochs", "1", "--max_source_length", str(SOURCE_LENGTH), "--generation_max_length", "4",
        "--lora_r", "2", "--optim", optimizer, "--learning_rate", learning_rate,
        "--train_sampling_strategy", "sequential", "--seed", "3", "--disable_tqdm", "true", "--eval_every_epochs", "1",
        *extra,
    ]
    if position > 1:
        command += ["--previous_task_dir", str(first_task_dir or outputs / f"1-{TASKS[0]}")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return outputs / f"{position}-{task}", done.stderr


def distinct_prompts(model, family) -> dict[str, int]:
    """How many different prompt token sequences each set that the runs read holds after truncation."""
    from sapt.backbone import load_tokenizer
    from sapt.training.data import load_pseudo_split, load_split

    tokenizer = load_tokenizer(str(model), family == "t5")
    sets = {f"{task}/{split}": load_split(BENCHMARK, task, split, 3, 16) for task in TASKS for split in ("train", "dev", "test")}
    sets[f"{TASKS[0]}/pseudo"] = load_pseudo_split(GENERATED / f"lora_gen_superni_{family}", TASKS[0], 3)
    return {
        name: len({tuple(tokenizer(source, truncation=True, max_length=SOURCE_LENGTH)["input_ids"]) for source in rows["source"][:16]})
        for name, rows in sets.items()
    }


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
        records_a = [json.loads(line) for line in (folder_a / "predictions" / task_file.name).read_text().splitlines()]
        records_b = [json.loads(line) for line in task_file.read_text().splitlines()]
        assert len(records_a) == len(records_b)
        for a, b in zip(records_a, records_b):
            assert a.keys() == b.keys()
            assert {k: a[k] for k in ("index", "target", "prediction")} == {k: b[k] for k in ("index", "target", "prediction")}
            if "routing" in a:
                assert a["routing"] == pytest.approx(b["routing"], abs=TOLERANCE)


def torchrun(processes: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
