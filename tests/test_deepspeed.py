"""DeepSpeed on the CPU (gloo): under ZeRO-3 SAPT's parameters are partitioned across processes, and
a two-process run still saves whole blocks and router, equal to a plain one-process run with the
same global batch. CI installs DeepSpeed (requirements-deepspeed.txt); elsewhere these tests need it."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import BENCHMARK, REPO_ROOT, requires_benchmark
from launch import TASKS, assert_same_task, run_task, torchrun

if importlib.util.find_spec("deepspeed") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must test DeepSpeed: pip install -r requirements-deepspeed.txt")
    pytest.skip("DeepSpeed is not installed (pip install -r requirements-deepspeed.txt)", allow_module_level=True)

ZERO = {stage: str(REPO_ROOT / "configs" / "ds_configs" / f"zero{stage}.json") for stage in (2, 3)}


@requires_benchmark()
def test_zero3_on_two_processes_saves_what_one_plain_process_saves(tiny_models, tmp_path):
    model = tiny_models["llama"]
    # 5 dev examples: the processes hold 3 and 2, and must still run the same number of forwards for ā.
    uneven = ("--max_eval_samples", "5")
    for position in (1, 2):  # task 2: two blocks, the router with a frozen key, ARM
        zero3, log = run_task(
            torchrun(2, 29541), model, "llama", tmp_path / "zero3", position, 2, *uneven, "--deepspeed", ZERO[3]
        )
        one, _ = run_task([sys.executable], model, "llama", tmp_path / "one", position, 4, *uneven)
        # The run really was partitioned, SAPT's own tensors included (else nothing here was tested).
        partitioned = re.search(r"ZeRO-3 partitions (\d+) parameter tensors \((\d+) of them SAPT's\) across 2", log)
        assert partitioned and int(partitioned.group(2)) > 0, log[-2000:]
        assert_same_task(zero3, one)
    assert not list((tmp_path / "zero3").rglob("checkpoint-*"))  # DeepSpeed's pickled checkpoints are not written


@requires_benchmark()
def test_zero2_on_two_processes_saves_what_one_plain_process_saves(tiny_models, tmp_path):
    model = tiny_models["llama"]
    zero2, _ = run_task(torchrun(2, 29542), model, "llama", tmp_path / "zero2", 1, 2, "--deepspeed", ZERO[2])
    one, _ = run_task([sys.executable], model, "llama", tmp_path / "one", 1, 4)
    assert_same_task(zero2, one)


def test_o_lora_under_zero3_is_refused_in_one_line(tiny_models, tmp_path):
    command = [
        sys.executable, "-m", "sapt.train_task", "--model_name_or_path", str(tiny_models["llama"]),
        "--data_dir", str(BENCHMARK), "--task_order", ",".join(TASKS), "--task", TASKS[0],
        "--output_dir", str(tmp_path / "out"), "--method", "o_lora", "--deepspeed", ZERO[3],
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 2
    assert "o_lora's regularizers need whole blocks" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
