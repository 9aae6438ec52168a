"""DeepSpeed on the CPU (gloo): under ZeRO-3 SAPT's parameters are partitioned across processes, and
a two-process run still saves whole blocks and router, equal to a plain one-process run with the
same global batch. CI installs DeepSpeed (requirements-deepspeed.txt); elsewhere these tests need it."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import BENCHMARK, REPO_ROOT
from launch import TASKS, assert_same_task, run_task, torchrun

pytestmark = pytest.mark.slow  # every test here runs a pipeline, a training process or several

if importlib.util.find_spec("deepspeed") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must test DeepSpeed: pip install -r requirements-deepspeed.txt")
    pytest.skip("DeepSpeed is not installed (pip install -r requirements-deepspeed.txt)", allow_module_level=True)

ZERO = {stage: REPO_ROOT / "configs" / "ds_configs" / f"zero{stage}.json" for stage in (2, 3)}
SPLIT_LOG = re.compile(
    r"ZeRO-3 splits (\d+) parameter tensors across 2 processes; SAPT's: "
    r"lora_A (\d+), lora_B (\d+), router key (\d+), query network (\d+)"
)


@pytest.fixture
def zero3_splitting_everything(tmp_path):
    """The shipped ZeRO-3 config with no persistence threshold: transformers' default (10 × hidden size)
    would keep the tiny model's LoRA blocks and key whole, and the gather code would only see whole tensors."""
    config = json.loads(ZERO[3].read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_split_all.json"
    path.write_text(json.dumps(config))
    return str(path)


# 5 dev examples: the processes hold 3 and 2, and must still run the same number of forwards for ā.
UNEVEN = ("--max_eval_samples", "5")


@pytest.fixture(scope="module")
def one_process(tiny_models, tmp_path_factory):
    """Tasks 1 and 2 trained by one plain process with the global batch: what every DeepSpeed run must equal."""
    outputs = tmp_path_factory.mktemp("one")
    return [run_task([sys.executable], tiny_models["llama"], "llama", outputs, position, 4, *UNEVEN)[0] for position in (1, 2)]


def test_zero3_on_two_processes_saves_what_one_plain_process_saves(
    tiny_models, tmp_path, zero3_splitting_everything, one_process
):
    for position in (1, 2):  # task 2: two blocks, the router with a frozen key, ARM
        zero3, log = run_task(
            torchrun(2, 29541), tiny_models["llama"], "llama", tmp_path / "zero3", position, 2, *UNEVEN,
            "--deepspeed", zero3_splitting_everything,
        )
        # SAPT's own tensors really were split across the processes (else the gathers were not tested).
        split = SPLIT_LOG.search(log)
        assert split, log[-2000:]
        lora_a, lora_b, key, query = (int(n) for n in split.groups()[1:])
        assert lora_a == lora_b == 2 * 2  # q_proj and v_proj of 2 layers
        assert key == 1 and query > 0  # the current key (the frozen ones are buffers)
        assert_same_task(zero3, one_process[position - 1])
    assert not list((tmp_path / "zero3").rglob("checkpoint-*"))  # DeepSpeed's pickled checkpoints are not written


def test_zero2_on_two_processes_saves_what_one_plain_process_saves(tiny_models, tmp_path, one_process):
    for position in (1, 2):  # task 2: the router and ARM under ZeRO-2 too
        zero2, _ = run_task(
            torchrun(2, 29542), tiny_models["llama"], "llama", tmp_path / "zero2", position, 2, *UNEVEN,
            "--deepspeed", str(ZERO[2]),
        )
        assert_same_task(zero2, one_process[position - 1])


def test_o_lora_under_zero3_is_refused_in_one_line(tiny_models, tmp_path):
    command = [
        sys.executable, "-m", "sapt", "train_task", "--model_name_or_path", str(tiny_models["llama"]),
        "--data_dir", str(BENCHMARK), "--task_order", ",".join(TASKS), "--task", TASKS[0],
        "--output_dir", str(tmp_path / "out"), "--method", "o_lora", "--deepspeed", str(ZERO[3]),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 2
    assert "o_lora's regularizers need whole blocks" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
