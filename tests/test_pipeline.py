"""Generators write pipelines that parse; quick pipelines run end to end and continue after a stop."""

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, Seq2SeqTrainingArguments

import sapt.experiments
from conftest import BENCHMARK, GENERATED, LONG_TASKS, REPO_ROOT, write_model_folder, write_task_files
from sapt.methods.registry import METHOD_NAMES
from sapt.experiments.pipeline import main as pipeline_main
from sapt.training.task_args import RELEASE_DEFAULTS, SaptArguments

GENERATORS = ["superni_t5", "long_t5", "superni_llama", "long_llama"]


def own_data(workdir, tasks, under="data"):
    """Split files of `tasks` in workdir/<under>/Long_Sequence and their pseudo samples where long_llama's
    preset reads them (workdir/generated_data), for pipelines that are written, not run."""
    write_task_files(workdir / under, "Long_Sequence", tasks)
    write_task_files(workdir / "generated_data" / "lora_gen_long_llama", "Long_Sequence", tasks, splits=("pseudo",))


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
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_generator_writes_a_pipeline_whose_commands_parse(tmp_path, capsys, paper_inputs, preset, method):
    script = generate_in_process(
        preset, "--method", method, "--output", str(tmp_path / "p.sh"), "--workdir", str(tmp_path), *paper_inputs,
        capsys=capsys,
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
    if method in ("sapt", "o_lora", "seq_lora", "replay", "inflora"):  # the methods that build on the last task
        assert previous[0] is None and all(previous[1:])
    else:
        assert previous == [None] * len(configs)


def test_paper_presets_carry_the_release_hyper_parameters(tmp_path, paper_inputs):
    generate("long_t5", "--output", str(tmp_path / "p.sh"), "--order", "6", *paper_inputs)
    first = json.loads(sorted((tmp_path / "p").glob("1-*.json"))[0].read_text())
    assert first["task"] == "yelp" and first["lora_r"] == 8 and first["kl_ratio"] == 0.2
    assert first["learning_rate"] == 3e-4 and first["num_train_epochs"] == 10 and first["bf16"] is True
    generate("superni_llama", "--output", str(tmp_path / "l.sh"), "--deepspeed", "zero2", *paper_inputs)
    config = json.loads(sorted((tmp_path / "l").glob("1-*.json"))[0].read_text())
    # The package's own file, absolute (the pipeline runs elsewhere); the checkout's configs/ links to it.
    packaged = Path(sapt.experiments.__file__).parent / "configs" / "ds_configs" / "zero2.json"
    assert config["deepspeed"] == str(packaged) and packaged.is_file() and config["kl_ratio"] == 1.0
    assert (REPO_ROOT / "configs" / "ds_configs" / "zero2.json").resolve() == packaged.resolve()
    assert config["save_strategy"] == "no"  # DeepSpeed's engine checkpoints are pickles: not written
    # Several processes per task: torch's launcher (torchrun) run by the generator's own interpreter.
    text = (tmp_path / "l.sh").read_text()
    assert '"$PYTHON" -m torch.distributed.run --nproc_per_node 4 -m sapt train_task' in text and "torchrun" not in text


def test_invalid_generator_arguments_exit_2():
    for args in (["--order", "9"], ["--method", "ewc"], ["--set", "novalue"], ["--gpus", "-1"]):
        done = subprocess.run([sys.executable, "gen_script_superni_t5.py", *args], capture_output=True, text=True, cwd=REPO_ROOT)
        assert done.returncode == 2 and "error" in done.stderr.splitlines()[-1]


def quick_pipeline(tmp_path, preset, *extra):
    script = generate(
        preset, "--quick", "--workdir", str(tmp_path), "--output", str(tmp_path / "quick.sh"),
        "--data_dir", str(BENCHMARK), "--gen_data_root", str(GENERATED),
        "--run_name", "quick", "--set", "num_train_epochs=1", "--set", "max_train_samples=16", *extra,
    )
    return script


def run_pipeline(script, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(["bash", script], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
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


@pytest.mark.slow
def test_quick_pipeline_runs_its_writers_python_whatever_is_on_path(tmp_path):
    """A virtual environment that is not activated: the pipeline is run with a PATH that lacks the
    interpreter's folder and whose `python` fails. It builds its tiny model, trains, and scores all the same."""
    interpreter = Path(sys.executable).parent.resolve()
    fake = tmp_path / "fake_bin"
    fake.mkdir()
    for name in ("python", "python3", "torchrun"):
        (fake / name).write_text("#!/bin/sh\necho 'the wrong python: the one on PATH' >&2\nexit 97\n")
        (fake / name).chmod(0o755)
    system = [d for d in ("/usr/local/bin", "/usr/bin", "/bin") if Path(d).resolve() != interpreter]
    path = os.pathsep.join([str(fake), *system])
    script = generate(
        "long_t5", "--quick", "--workdir", str(tmp_path), "--output", str(tmp_path / "quick.sh"),
        "--data_dir", str(BENCHMARK), "--gen_data_root", str(GENERATED), "--run_name", "quick",
        "--tasks", ",".join(LONG_TASKS), "--set", "num_train_epochs=1", "--set", "max_train_samples=8",
        "--set", "max_eval_samples=4", "--set", "max_predict_samples=4",
    )
    assert f"\nPYTHON={shlex.quote(sys.executable)}\n" in Path(script).read_text()
    env = {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(["/bin/bash", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "the wrong python" not in done.stderr and "AP   =" in done.stdout
    # Quick mode says what its numbers mean, last.
    assert done.stdout.rstrip().splitlines()[-1].startswith("[pipeline] quick mode: a tiny RANDOM model")
    assert (tmp_path / "tiny_models" / "t5" / "config.json").is_file()


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
    own_data(tmp_path, ["b_task", "a_task", "c_task"])
    write_model_folder(tmp_path / "models" / "smollm2-135m", "llama")
    script = generate_in_process(
        "long_llama", "--quick", "--tasks", "c_task,a_task", "--model_name_or_path", "models/smollm2-135m",
        "--data_dir", "data", "--workdir", str(tmp_path), "--output", str(tmp_path / "p.sh"), capsys=capsys,
    )
    text = open(script).read()
    assert "sapt.tiny" not in text and "STEPS=(1-c_task 2-a_task)" in text
    assert "quick mode: a few steps on a few examples per task" in text and "RANDOM" not in text
    configs = [json.loads(p.read_text()) for p in sorted((tmp_path / "p").glob("*.json"))]
    assert [c["task"] for c in configs] == ["c_task", "a_task"]
    assert all(c["model_name_or_path"] == "models/smollm2-135m" and c["task_order"] == "c_task,a_task" for c in configs)
    # Without a model, quick mode builds its tiny one first.
    script = generate_in_process("long_llama", "--quick", "--tasks", "a_task,b_task", "--data_dir", "data",
                                 "--workdir", str(tmp_path), "--output", str(tmp_path / "q.sh"), capsys=capsys)
    text = open(script).read()
    assert '"$PYTHON" -m sapt tiny --family llama --out tiny_models/llama' in text and "tiny RANDOM model" in text


@pytest.mark.parametrize("value, message", [
    ("a_task,nope", "no task folder named 'nope'"), ("a_task,a_task", "--tasks repeats a_task"), (",", "--tasks is empty"),
])
def test_own_task_list_errors_are_one_line(tmp_path, value, message):
    own_data(tmp_path, ["a_task"])
    done = subprocess.run(
        [sys.executable, "gen_script_long_llama.py", "--tasks", value, "--data_dir", "data", "--workdir", str(tmp_path),
         "--output", str(tmp_path / "p.sh")], capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert done.returncode == 2 and message in done.stderr.splitlines()[-1]
    assert not (tmp_path / "p.sh").exists()


def test_relative_paths_are_read_and_written_under_the_workdir(tmp_path, capsys, monkeypatch):
    """No --workdir: the current directory. A relative --workdir is taken from there; a relative --output,
    --data_dir and the default pipeline path from the workdir. Nothing names the package's checkout."""
    monkeypatch.chdir(tmp_path)
    own_data(tmp_path, ["a_task", "c_task"])
    script = generate_in_process("long_llama", "--quick", "--tasks", "a_task,c_task", "--data_dir", "data",
                                 "--run_name", "here", "--pseudo_data", "regenerate", capsys=capsys)
    assert script == str(tmp_path / "scripts" / "generated" / "here.sh")
    text = open(script).read()
    assert f"\ncd {tmp_path}\nPYTHON={shlex.quote(sys.executable)}\nRUN=here\nCONFIGS={tmp_path}/scripts/generated/here\n" in text
    pseudo = '"$PYTHON" -m sapt pseudo_data --model_name_or_path tiny_models/llama --data_dir data --tasks a_task --out '
    assert f"\n{pseudo}logs_and_outputs/here/generated_data/" in text  # the installed module, not a script
    # The interpreter may live in the checkout (a .venv there); nothing else may name it.
    assert '\n"$PYTHON" -m sapt score "$RUN"\n' in text
    assert str(REPO_ROOT) not in text.replace(shlex.quote(sys.executable), "")
    assert json.loads((tmp_path / "scripts" / "generated" / "here" / "1-a_task.json").read_text())["task"] == "a_task"

    # b_task exists only in sub/data: read against the workdir, the check passes; against the cwd it would not.
    own_data(tmp_path / "sub", ["b_task"])
    script = generate_in_process("long_llama", "--quick", "--tasks", "b_task", "--data_dir", "data",
                                 "--workdir", "sub", "--output", "p.sh", capsys=capsys)
    assert script == str(tmp_path / "sub" / "p.sh") and f"\ncd {tmp_path / 'sub'}\n" in open(script).read()
    assert (tmp_path / "sub" / "p" / "1-b_task.json").is_file()
    # The same task list, read in the current directory's data/
    assert pipeline_main("long_llama", ["--quick", "--tasks", "b_task", "--data_dir", "data"]) == 2
    assert "no task folder named 'b_task'" in capsys.readouterr().err


def test_evaluation_batch_follows_a_training_batch_set_on_the_command_line(tmp_path, capsys, paper_inputs):
    def first_config(*extra):
        generate_in_process("long_t5", "--output", str(tmp_path / "p.sh"), "--workdir", str(tmp_path), *paper_inputs,
                            *extra, capsys=capsys)
        return json.loads(sorted((tmp_path / "p").glob("1-*.json"))[0].read_text())

    assert first_config()["per_device_eval_batch_size"] == 32  # the preset's 16, doubled
    assert first_config("--set", "per_device_train_batch_size=4")["per_device_eval_batch_size"] == 8
    assert first_config("--set", "per_device_eval_batch_size=3")["per_device_eval_batch_size"] == 3


# ----------------------------------------------------------------------------------------------------
# --seeds: the experiment once per seed in one pipeline


def own_order_args(tmp_path, *extra, output="p.sh"):
    own_data(tmp_path, ["a_task", "c_task"])
    write_model_folder(tmp_path / "models" / "x", "llama")
    return ["--quick", "--tasks", "c_task,a_task", "--model_name_or_path", "models/x", "--data_dir", "data",
            "--workdir", str(tmp_path), "--output", str(tmp_path / output), *extra]


def test_default_pipeline_is_unchanged_by_seeds_support(tmp_path, capsys):
    """Without --seeds the pipeline is byte for byte what the generator wrote before --seeds existed (and
    the run lock, which came later)."""
    script = generate_in_process("long_llama", *own_order_args(tmp_path, "--single_run", "alone"), capsys=capsys)
    expected = f"""#!/usr/bin/env bash
# sapt on Long_Sequence / llama, order custom (2 tasks), quick mode
# Written by gen_script_long_llama.py. Run it again to continue where it stopped:
# tasks whose folder holds task_complete.json are skipped.
# Every step runs $PYTHON, the interpreter that wrote this file ($SAPT_LAUNCH, when set, runs the tasks).
set -euo pipefail
cd {tmp_path}
PYTHON={shlex.quote(sys.executable)}
RUN=sapt_long_llama_tasks_quick
CONFIGS={tmp_path}/p

# One pipeline per run: the rest runs holding the run's lock, or stops here naming its holder.
if [ "${{1:-}}" != --locked ]; then exec "$PYTHON" -m sapt run_lock logs_and_outputs/sapt_long_llama_tasks_quick/outputs/run.lock -- bash {tmp_path}/p.sh --locked; fi

STEPS=(1-c_task 2-a_task)
for STEP in "${{STEPS[@]}}"; do
  OUT="logs_and_outputs/$RUN/outputs/$STEP"
  if [ -f "$OUT/task_complete.json" ]; then echo "[pipeline] $STEP: complete, skipped"; continue; fi
  echo "[pipeline] $STEP: training"
  ${{SAPT_LAUNCH:-"$PYTHON" -m sapt train_task}} "$CONFIGS/$STEP.json"
done

"$PYTHON" -m sapt score "$RUN" alone

echo '[pipeline] quick mode: a few steps on a few examples per task: the scores show the harness at work, not numbers comparable to the paper'
"""
    assert open(script).read() == expected
    config = json.loads((tmp_path / "p" / "2-a_task.json").read_text())
    assert config["seed"] == 42 and config["output_dir"] == "logs_and_outputs/sapt_long_llama_tasks_quick/outputs/2-a_task"


def test_seeds_pipeline_runs_each_seed_as_its_own_run(tmp_path, capsys):
    script = generate_in_process("long_llama", *own_order_args(tmp_path, "--seeds", "3,1", "--single_run", "alone"),
                                 capsys=capsys)
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    base = "sapt_long_llama_tasks_quick"
    assert text.index(f"RUN={base}_seed3") < text.index(f"RUN={base}_seed1")  # in the order given
    assert text.count('-m sapt train_task} "$CONFIGS/$STEP.json"') == 2 and text.count('"$PYTHON" -m sapt score "$RUN" alone') == 2
    assert f'\n"$PYTHON" -m sapt score --aggregate {base}_seed3 {base}_seed1 --single alone\n' in text
    parser = HfArgumentParser((SaptArguments, Seq2SeqTrainingArguments))
    for seed in (3, 1):
        configs = sorted((tmp_path / "p" / f"seed{seed}").glob("*.json"))
        assert [p.name for p in configs] == ["1-c_task.json", "2-a_task.json"]
        for path in configs:
            config = json.loads(path.read_text())
            assert config["seed"] == seed and config["output_dir"].startswith(f"logs_and_outputs/{base}_seed{seed}/outputs/")
            _, training_args = parser.parse_dict({**RELEASE_DEFAULTS, **config})
            assert training_args.seed == seed
        # Each seed's configs are exactly what one run with that seed and that name gets.
        generate_in_process("long_llama", *own_order_args(tmp_path, "--seed", str(seed), "--run_name", f"{base}_seed{seed}",
                                                          output=f"one{seed}.sh"), capsys=capsys)
        assert [json.loads(p.read_text()) for p in configs] == [
            json.loads(p.read_text()) for p in sorted((tmp_path / f"one{seed}").glob("*.json"))
        ]


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "1,1"], "--seeds repeats 1"), (["--seeds", "1,x"], "--seeds expects non-negative integers"),
    (["--seeds", "1,2", "--seed", "3"], "not both"), (["--seeds", "1,2", "--set", "seed=3"], "not both"),
])
def test_bad_seeds_are_one_line_errors(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stop:
        pipeline_main("long_t5", [*extra, "--output", str(tmp_path / "p.sh")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p.sh").exists()


FAKE_TRAIN_TASK = """
import json, sys
from pathlib import Path
config = json.loads(Path(sys.argv[1]).read_text())
out = Path(config["output_dir"])
tasks = config["task_order"].split(",")
i = tasks.index(config["task"]) + 1
if config["seed"] == 3 and i == 2 and Path("stop_here").exists():
    sys.exit("stopped")  # an interruption in the middle of the first seed
out.mkdir(parents=True)
(out.parent / "task_order.txt").write_text(config["task_order"])
scores = {"predict_exact_match_for_" + t: 50.0 + config["seed"] * (j + 1) - 10.0 * (i - 1 - j) for j, t in enumerate(tasks[:i])}
(out / "all_results.json").write_text(json.dumps(scores))
(out / "task_args.json").write_text(json.dumps(config))
(out / "task_complete.json").write_text("{}")
"""


@pytest.mark.slow
def test_seeds_pipeline_continues_after_a_stop_and_aggregates(tmp_path, capsys):
    """Task steps replaced by a stand-in that writes results: the pipeline's own control flow, resume, scoring."""
    script = generate_in_process("long_llama", *own_order_args(tmp_path, "--seeds", "3,1"), capsys=capsys)
    (tmp_path / "fake_train_task.py").write_text(FAKE_TRAIN_TASK)
    env = {**os.environ, "SAPT_LAUNCH": f"{sys.executable} {tmp_path / 'fake_train_task.py'}"}
    (tmp_path / "stop_here").write_text("")
    stopped = subprocess.run(["bash", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert stopped.returncode != 0 and "stopped" in stopped.stderr
    (tmp_path / "stop_here").unlink()
    log = subprocess.run(["bash", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert log.returncode == 0, log.stderr[-2000:]
    assert log.stdout.count(": complete, skipped") == 1 and log.stdout.count(": training") == 3
    assert "[pipeline] 1-c_task: complete, skipped" in log.stdout.splitlines()[0]
    record = json.loads((tmp_path / "results" / "sapt_long_llama_tasks_quick_aggregate.json").read_text())
    # AP after task 2 of seed s: ((50 + s - 10) + (50 + 2 s)) / 2 = 45 + 1.5 s: 49.5 (seed 3) and 46.5 (seed 1).
    assert [r["metrics"]["AP"] for r in record["runs"]] == [49.5, 46.5] and [r["seed"] for r in record["runs"]] == [3, 1]
    assert record["statistics"]["AP"]["mean"] == 48.0
    assert record["statistics"]["AP"]["std"] == pytest.approx(math.sqrt(2 * 1.5**2), rel=1e-12)
    assert record["conditions"] == {"protocol": "paper", "metric": "exact_match", "model": "models/x"}
