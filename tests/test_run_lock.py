"""One writer per run: a second pipeline or task step on a run in use stops at once naming the first; the
pipeline's own task steps are let in; a lock left by a killed process is taken over with a warning."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import BENCHMARK, GENERATED, REPO_ROOT, SUPERNI_TASKS
from sapt.experiments.pipeline import main as pipeline_main
from sapt.utils.run_lock import ENDING_GRACE_S, EXIT_LOCKED, HOLDER_ENV, run_lock

HOST = socket.gethostname()


def lock_command(lock, *command, env=None):
    return subprocess.run([sys.executable, "-m", "sapt", "run_lock", str(lock), "--", *command],
                          capture_output=True, text=True, timeout=60, env=env)


def wait_for(condition, what, seconds=600):  # a loaded 2-core machine trains a quick task in minutes
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_refused(done, holder_pid, started):
    """Exit status EXIT_LOCKED, one line naming the holder: pid, host, start time."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == EXIT_LOCKED, done.stderr[-2000:]
    assert len(lines) == 1 and f"in use by pid {holder_pid} on {HOST} since {started}" in lines[0], lines


def test_a_second_holder_is_refused_at_once_and_a_descendant_is_let_in(tmp_path):
    lock = tmp_path / "outputs" / "run.lock"
    with run_lock(lock):
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == HOST
        start = time.time()
        assert_refused(lock_command(lock, "true"), os.getpid(), holder["started"])
        assert time.time() - start < 30
        # A child of the holder (the pipeline's task steps) names it in HOLDER_ENV and is let in.
        env = {**os.environ, HOLDER_ENV: f"1@elsewhere,{os.getpid()}@{HOST}"}
        assert lock_command(lock, "true", env=env).returncode == 0
        assert json.loads(lock.read_text()) == holder  # still the first holder's
    assert not lock.exists()  # removed by its holder when done
    assert lock_command(lock, "true").returncode == 0 and not lock.exists()
    # Folders made for the lock alone go with it; those the command wrote into stay.
    assert lock_command(tmp_path / "a" / "b" / "run.lock", "true").returncode == 0 and not (tmp_path / "a").exists()
    assert lock_command(tmp_path / "a" / "b" / "run.lock", "touch", str(tmp_path / "a" / "kept")).returncode == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["kept"]


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    lock = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-m", "sapt", "run_lock", str(lock), "--", "sleep", "600"],
                              start_new_session=True)
    wait_for(lambda: lock.is_file(), "the lock")
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid  # left behind
    with run_lock(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the lock left by pid {holder.pid} on {HOST}" in caplog.text
    assert not lock.exists()


@pytest.mark.slow
def test_the_children_of_a_holder_killed_alone_keep_the_run_locked_until_they_end(tmp_path):
    lock = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-m", "sapt", "run_lock", str(lock), "--", "sleep", "600"],
                              start_new_session=True)
    try:
        wait_for(lambda: lock.is_file(), "the lock")
        os.kill(holder.pid, signal.SIGKILL)  # its child, sleep, runs on
        holder.wait()
        start = time.time()
        refused = lock_command(lock, "true")
        assert refused.returncode == EXIT_LOCKED and time.time() - start >= ENDING_GRACE_S - 1
        assert f"in use by processes started by pid {holder.pid} on {HOST}" in refused.stderr
        # Once they end (within the grace a killed process group takes to go), the lock is taken over.
        waiting = subprocess.Popen([sys.executable, "-m", "sapt", "run_lock", str(lock), "--", "true"],
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(1)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
    assert waiting.wait(timeout=60) == 0
    assert f"taking over the lock left by pid {holder.pid}" in waiting.stderr.read()


@pytest.mark.slow
def test_a_lone_task_step_on_a_run_in_use_is_refused(tiny_models, tmp_path):
    task = SUPERNI_TASKS[0]
    outputs = tmp_path / "outputs"
    with run_lock(outputs / "run.lock"):
        started = json.loads((outputs / "run.lock").read_text())["started"]
        done = subprocess.run([
            sys.executable, "-m", "sapt", "train_task", "--model_name_or_path", str(tiny_models["t5"]),
            "--data_dir", str(BENCHMARK), "--task_order", task, "--task", task, "--output_dir", str(outputs / f"1-{task}"),
        ], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert_refused(done, os.getpid(), started)
    assert not (outputs / f"1-{task}").exists()


@pytest.mark.slow
def test_a_second_pipeline_is_refused_while_the_first_runs_its_steps(tmp_path):
    script = tmp_path / "quick.sh"
    assert pipeline_main("superni_t5", [
        "--quick", "--workdir", str(tmp_path), "--output", str(script), "--run_name", "q", "--data_dir", str(BENCHMARK),
        "--gen_data_root", str(GENERATED), "--set", "max_train_samples=8", "--set", "max_eval_samples=4",
        "--set", "max_predict_samples=4",
    ]) == 0
    outputs = tmp_path / "logs_and_outputs" / "q" / "outputs"
    lock = outputs / "run.lock"
    first = subprocess.Popen(["bash", str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        wait_for(lambda: lock.is_file(), "the first pipeline's lock")
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid  # the pipeline itself (exec'd into the lock holder)
        start = time.time()
        second = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
        assert_refused(second, first.pid, holder["started"])
        assert time.time() - start < 30
        config = sorted((tmp_path / "quick").glob("2-*.json"))[0]  # a lone step on the same run
        lone = subprocess.run([sys.executable, "-m", "sapt", "train_task", str(config)], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)
        assert_refused(lone, first.pid, holder["started"])
        # The first pipeline's own task step is let in: it trains and checkpoints.
        wait_for(lambda: list(outputs.glob("1-*/checkpoint-*/trainer_state.json")), "the first task's checkpoint")
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert lock.is_file()  # SIGKILL leaves it; the next holder takes it over
    taken = lock_command(lock, "true")
    assert taken.returncode == 0 and f"taking over the lock left by pid {first.pid}" in taken.stderr
