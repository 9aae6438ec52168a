"""Generators write pipelines that parse; quick pipelines run end to end and continue after a stop."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from conftest import REPO_ROOT, SHARED, requires_benchmark
from sapt.config import METHODS
from sapt.pipeline import main as pipeline_main
from sapt.train_task import RELEASE_DEFAULTS, SaptArguments

GENERATORS = ["superni_t5", "long_t5", "superni_llama", "long_llama"]


def generate_in_process(preset, *args, capsys=None):
    assert pipeline_main(preset, list(args)) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def generate(preset, *args):
    done = subprocess.run(
        [sys.executable, f"gen_script_{preset}.py", *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("preset", GENERATORS)
@pytest.mark.parametrize("method", METHODS)
def test_generator_writes_a_pipeline_whose_commands_parse(tmp_path, capsys, preset, method):
    script = generate_in_process(
        preset, "--method", method, "--output", str(tmp_path / "p.sh"), "--workdir", str(tmp_path), capsys=capsys
    )
    assert script == str(tmp_path / "p.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    configs = sorted((tmp_path / "p").glob("*.json"))
    assert len(configs) == (1 if method == "mtl" else 15)
    parser = HfArgumentParser((SaptArguments, Seq2SeqTrainingArguments))
    for path in configs:
        config = {**json.loads(path.read_text()), "bf16": False}  # bf16 needs a GPU to construct
        config.pop("deepspeed", None)
        sapt_args, training_args = parser.parse_dict({**RELEASE_DEFAULTS, **config})
        assert sapt_args.method == method
        assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * max(
            1, 4 if "llama" in preset else 1
        ) == 32  # the release's global batch
    previous = [json.loads(p.read_text()).get("previous_task_dir") for p in configs]
    if method in ("sapt", "o_lora", "seq_lora", "replay"):
        assert previous[0] is None and all(previous[1:])


def test_paper_presets_carry_the_release_hyper_parameters(tmp_path):
    generate("long_t5", "--output", str(tmp_path / "p.sh"), "--order", "6")
    first = json.loads(sorted((tmp_path / "p").glob("1-*.json"))[0].read_text())
    assert first["task"] == "yelp" and first["lora_r"] == 8 and first["kl_ratio"] == 0.2
    assert first["learning_rate"] == 3e-4 and first["num_train_epochs"] == 10 and first["bf16"] is True
    generate("superni_llama", "--output", str(tmp_path / "l.sh"), "--deepspeed", "zero2")
    config = json.loads(sorted((tmp_path / "l").glob("1-*.json"))[0].read_text())
    assert config["deepspeed"] == str(REPO_ROOT / "configs" / "ds_configs" / "zero2.json") and config["kl_ratio"] == 1.0
    assert config["save_strategy"] == "no"  # DeepSpeed's engine checkpoints are pickles: not written
    assert "torchrun --nproc_per_node 4" in (tmp_path / "l.sh").read_text()


def test_invalid_generator_arguments_exit_2():
    for args in (["--order", "9"], ["--method", "ewc"], ["--set", "novalue"], ["--gpus", "-1"]):
        done = subprocess.run([sys.executable, "gen_script_superni_t5.py", *args], capture_output=True, text=True, cwd=REPO_ROOT)
        assert done.returncode == 2 and "error" in done.stderr.splitlines()[-1]


def quick_pipeline(tmp_path, preset, *extra):
    script = generate(
        preset, "--quick", "--workdir", str(tmp_path), "--output", str(tmp_path / "quick.sh"),
        "--data_dir", str(SHARED / "CL_Benchmark"), "--gen_data_root", str(SHARED / "generated_data"),
        "--run_name", "quick", "--set", "num_train_epochs=1", "--set", "max_train_samples=16", *extra,
    )
    return script


def run_pipeline(script, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(["bash", script], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@requires_benchmark()
@pytest.mark.parametrize("preset", ["superni_t5", "long_llama"])
def test_quick_pipeline_runs_end_to_end_and_continues_after_a_stop(tmp_path, preset):
    script = quick_pipeline(tmp_path, preset)
    log = run_pipeline(script, tmp_path)
    outputs = tmp_path / "logs_and_outputs" / "quick" / "outputs"
    steps = sorted(p.name for p in outputs.iterdir() if p.is_dir())
    assert len(steps) == 3 and "AP   =" in log
    scored = json.loads((tmp_path / "results" / "quick.json").read_text())
    assert len(scored["task_names"]) == 3

    if preset == "superni_t5":  # sapt: one process per task, one seed, as the generators write it
        assert_tasks_drew_their_own_keys_and_blocks(outputs, steps)
    tensors = {s: (outputs / s / "block.safetensors").read_bytes() for s in steps}

    # Stop after the first task: later folders are gone; the rerun trains only those.
    first = outputs / steps[0]
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    for step in steps[1:]:
        subprocess.run(["rm", "-r", str(outputs / step)], check=True)
    log = run_pipeline(script, tmp_path)
    assert f"[pipeline] {steps[0]}: complete, skipped" in log
    assert f"[pipeline] {steps[1]}: training" in log and f"[pipeline] {steps[2]}: training" in log
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == stamps
    # The retrained tasks reproduce their tensors exactly.
    assert {s: (outputs / s / "block.safetensors").read_bytes() for s in steps} == tensors
    assert all((outputs / s / "task_complete.json").is_file() for s in steps)


def assert_tasks_drew_their_own_keys_and_blocks(outputs, steps):
    """Keys and LoRA A matrices of the three tasks are as dissimilar as independent draws (a few steps
    of training move them little: with shared initial draws their cosine was 0.999+)."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    def cosine(a, b):
        return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()

    keys = load_file(str(outputs / steps[-1] / "router.safetensors"))["keys"]
    assert keys.shape[0] == 3
    blocks = [load_file(str(outputs / s / "block.safetensors")) for s in steps]
    downs = [torch.cat([b[name].flatten() for name in sorted(b) if name.endswith("lora_A")]) for b in blocks]
    for i in range(3):
        for j in range(i):
            assert abs(cosine(keys[i], keys[j])) < 0.5
            assert abs(cosine(downs[i], downs[j])) < 0.5


def test_own_task_list_and_a_given_model_in_quick_mode(tmp_path, capsys):
    """--tasks trains exactly the named tasks in that order; --quick with a model uses it and builds no tiny one."""
    data = tmp_path / "data" / "Long_Sequence"
    for task in ("b_task", "a_task", "c_task"):
        (data / task).mkdir(parents=True)
    script = generate_in_process(
        "long_llama", "--quick", "--tasks", "c_task,a_task", "--model_name_or_path", "models/smollm2-135m",
        "--data_dir", "data", "--workdir", str(tmp_path), "--output", str(tmp_path / "p.sh"), capsys=capsys,
    )
    text = open(script).read()
    assert "sapt.tiny" not in text and "STEPS=(1-c_task 2-a_task)" in text
    configs = [json.loads(p.read_text()) for p in sorted((tmp_path / "p").glob("*.json"))]
    assert [c["task"] for c in configs] == ["c_task", "a_task"]
    assert all(c["model_name_or_path"] == "models/smollm2-135m" and c["task_order"] == "c_task,a_task" for c in configs)
    # Without a model, quick mode builds its tiny one first.
    script = generate_in_process("long_llama", "--quick", "--tasks", "a_task,b_task", "--data_dir", "data",
                                 "--workdir", str(tmp_path), "--output", str(tmp_path / "q.sh"), capsys=capsys)
    assert "python -m sapt.tiny --family llama --out tiny_models/llama" in open(script).read()


@pytest.mark.parametrize("value, message", [
    ("a_task,nope", "no task folder named 'nope'"), ("a_task,a_task", "--tasks repeats a_task"), (",", "--tasks is empty"),
])
def test_own_task_list_errors_are_one_line(tmp_path, value, message):
    (tmp_path / "data" / "Long_Sequence" / "a_task").mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "gen_script_long_llama.py", "--tasks", value, "--data_dir", "data", "--workdir", str(tmp_path),
         "--output", str(tmp_path / "p.sh")], capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert done.returncode == 2 and message in done.stderr.splitlines()[-1]
    assert not (tmp_path / "p.sh").exists()


def test_evaluation_batch_follows_a_training_batch_set_on_the_command_line(tmp_path, capsys):
    def first_config(*extra):
        generate_in_process("long_t5", "--output", str(tmp_path / "p.sh"), "--workdir", str(tmp_path), *extra, capsys=capsys)
        return json.loads(sorted((tmp_path / "p").glob("1-*.json"))[0].read_text())

    assert first_config()["per_device_eval_batch_size"] == 32  # the preset's 16, doubled
    assert first_config("--set", "per_device_train_batch_size=4")["per_device_eval_batch_size"] == 8
    assert first_config("--set", "per_device_eval_batch_size=3")["per_device_eval_batch_size"] == 3
