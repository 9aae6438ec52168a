"""A run survives being killed: pipelines continue mid-task, finished tasks stay untouched, results
equal an uninterrupted run of the same seed byte for byte, wherever the kills land (the chaos test);
SIGTERM saves and stops."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BENCHMARK, GENERATED, REPO_ROOT, SUPERNI_TASKS
from sapt.experiments.pipeline import main as pipeline_main


def write_pipeline(workdir: Path) -> Path:
    script = workdir / "quick.sh"
    argv = [
        "--quick", "--workdir", str(workdir), "--output", str(script), "--run_name", "q",
        "--data_dir", str(BENCHMARK), "--gen_data_root", str(GENERATED),
        "--set", "max_train_samples=8", "--set", "max_eval_samples=4", "--set", "max_predict_samples=4",
        "--set", "num_train_epochs=3",
    ]
    assert pipeline_main("superni_t5", argv) == 0
    return script


def run(script: Path) -> str:
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def outputs(workdir: Path) -> Path:
    return workdir / "logs_and_outputs" / "q" / "outputs"


def snapshot(folder: Path) -> dict:
    """Every file of a task folder that a seed determines, as bytes."""
    names = ["all_results.json", "block.safetensors", "router.safetensors", "routing_mean.json", "routing_weights.json"]
    files = {name: (folder / name).read_bytes() for name in names}
    files.update({f"predictions/{p.name}": p.read_bytes() for p in sorted((folder / "predictions").iterdir())})
    return files


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run(write_pipeline(workdir))
    return workdir


@pytest.mark.slow
def test_killed_pipeline_continues_and_ends_as_an_uninterrupted_run(uninterrupted, tmp_path):
    script = write_pipeline(tmp_path)
    process = subprocess.Popen(["bash", str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    second = outputs(tmp_path)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill as soon as task 2 has saved a checkpoint (after epoch 1 of 3)
        if list(second.glob("2-*/checkpoint-*/trainer_state.json")):
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    task2 = next(second.glob("2-*"))
    assert not (task2 / "task_complete.json").exists(), "the kill came too late to test a resume"
    first = next(second.glob("1-*"))
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}

    log = run(script)
    assert "1-task1572_samsum_summary: complete, skipped" in log
    assert f"resuming {SUPERNI_TASKS[0]} from" in log
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == stamps  # not retrained
    for folder in sorted(outputs(uninterrupted).iterdir()):
        if folder.is_dir():
            assert snapshot(second / folder.name) == snapshot(folder), folder.name
    assert not list(second.glob("*/checkpoint-*")), "checkpoints are removed once a task completes"


# Where the chaos test kills the pipeline, in the order the run reaches them: each is the rename into place
# of a file (tests/kill_switch), so the kill lands inside that file's write. A restart after each kill goes
# on from the last complete state, so the next point is still ahead. Each pipeline trains 3 epochs of
# one step each: checkpoint-1..3.
KILL_POINTS = [
    ("task 1: a checkpoint's optimizer state", "*/outputs/1-*/checkpoint-*/optimizer.safetensors"),
    ("task 1: its block (final save)", "*/outputs/1-*/block.safetensors"),
    ("task 1: a prediction file", "*/outputs/1-*/predictions/*.jsonl"),
    ("task 1: the completion marker", "*/outputs/1-*/task_complete.json"),
    ("task 2: the second checkpoint's RNG state", "*/outputs/2-*/checkpoint-2/rng_state_0.json"),
    ("task 2: its dev routing mean", "*/outputs/2-*/routing_mean.json"),
    ("task 2: the routing file", "*/outputs/2-*/routing_weights.json"),
    ("task 3: the last checkpoint's trainable tensors", "*/outputs/3-*/checkpoint-3/trainable.safetensors"),
    ("task 3: the router", "*/outputs/3-*/router.safetensors"),
    ("task 3: the run's task order", "*/outputs/task_order.txt"),
    ("task 3: the completion marker", "*/outputs/3-*/task_complete.json"),
    ("scoring: the run's score", "*/results/q.json"),
]
KILL_SWITCH = REPO_ROOT / "tests" / "kill_switch"


def run_state(workdir: Path) -> dict:
    """Every file of the run and its score, as bytes (the Trainer's timings aside)."""
    roots = [outputs(workdir), workdir / "results"]
    return {str(p.relative_to(workdir)): p.read_bytes() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "train_results.json"}


@pytest.mark.slow
def test_killed_at_every_kind_of_point_ends_as_an_uninterrupted_run(uninterrupted, tmp_path):
    script = write_pipeline(tmp_path)
    path = [str(KILL_SWITCH)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for what, pattern in KILL_POINTS:
        env = {**os.environ, "SAPT_TEST_KILL_AT": pattern, "PYTHONPATH": os.pathsep.join(path)}
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900, env=env,
                              start_new_session=True)
        assert done.returncode == -signal.SIGKILL, f"{what}: not reached\n{done.stderr[-3000:]}"
    run(script)
    assert run_state(tmp_path) == run_state(uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_says_how_to_continue(tiny_models, tmp_path):
    task = SUPERNI_TASKS[0]
    out = tmp_path / f"1-{task}"
    command = [
        sys.executable, "-m", "sapt", "train_task", "--model_name_or_path", str(tiny_models["t5"]),
        "--data_dir", str(BENCHMARK), "--task_order", task, "--task", task, "--output_dir", str(out),
        "--max_train_samples", "400", "--per_device_train_batch_size", "2", "--num_train_epochs", "1",
        "--max_eval_samples", "2", "--max_predict_samples", "2", "--max_source_length", "32",
        "--generation_max_length", "2", "--logging_steps", "1", "--disable_tqdm", "true",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
    lines = []
    for line in process.stdout:  # wait until training steps are being logged (sapt.training.trainer.LogMetrics)
        lines.append(line)
        if '"loss":' in line:
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in "".join(lines) and "run the same command again" in "".join(lines)
    assert list(out.glob("checkpoint-*/trainable.safetensors"))
    assert not (out / "task_complete.json").exists()
    # Optimizer, scheduler and RNG states too are safetensors + JSON: nothing in a checkpoint is a pickle.
    checkpoint = next(out.glob("checkpoint-*"))
    assert {"optimizer.safetensors", "scheduler.json", "rng_state_0.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert not [p.name for p in checkpoint.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl")]


def test_a_checkpoint_cut_short_is_not_resumed_from(tmp_path):
    from sapt.training.resume import latest_complete_checkpoint

    for step, state in ((2, "{}"), (4, '{"global_step": 4}\n'), (6, None), (8, '{"global_step": ')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:  # the Trainer writes it last, in place: a kill can leave it cut short
            (folder / "trainer_state.json").write_text(state)
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists() and not (tmp_path / "checkpoint-8").exists()
    assert latest_complete_checkpoint(tmp_path / "missing") is None
