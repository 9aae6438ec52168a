"""N processes take the same optimizer step as one process with the same global batch, and so does
gradient accumulation, with the router and ARM (task 2): equal saved blocks, router, ā and metrics."""

import sys

import pytest

from launch import assert_same_task, distinct_prompts, no_dropout_copy, run_task, torchrun

GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def model(tiny_models, tmp_path_factory):
    return no_dropout_copy(tiny_models["t5"], tmp_path_factory.mktemp("t5") / "t5")


@pytest.fixture(scope="module")
def first_task(model, tmp_path_factory):
    """Task 1 trained by one process with the whole batch: the reference, and what every task-2 run builds on."""
    folder, _ = run_task([sys.executable], model, "t5", tmp_path_factory.mktemp("first"), 1, GLOBAL_BATCH)
    return folder


def test_the_runs_read_several_distinct_prompts_per_set(model):
    """Else pairing a prediction with the wrong index, or a pseudo row with the wrong process, could not show."""
    counts = distinct_prompts(model, "t5")
    assert all(count >= 2 for count in counts.values()), counts


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_first_task(model, first_task, tmp_path):
    two, _ = run_task(torchrun(2, 29531), model, "t5", tmp_path / "two", 1, GLOBAL_BATCH // 2)
    assert_same_task(two, first_task)
    assert not list((tmp_path / "two").rglob("*.tmp"))  # only rank 0 writes; nothing left half-written


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw_torch"])
def test_one_step_is_the_same_however_the_global_batch_is_split(model, first_task, tmp_path, optimizer):
    """Task 2 (router, ARM on task 1's pseudo rows): 1 × 8, 2 processes × 4, and 1 × 4 with 2 accumulation
    steps. ARM's pseudo rows are sharded like the training batch (sapt.reflection)."""
    def task2(name, launcher, per_device, accumulation=1):
        folder, _ = run_task(
            launcher, model, "t5", tmp_path / name, 2, per_device, "--max_eval_samples", "5",  # uneven 3/2 dev shards
            accumulation=accumulation, optimizer=optimizer, first_task_dir=first_task,
        )
        return folder

    whole = task2("whole", [sys.executable], GLOBAL_BATCH)
    assert_same_task(task2("two_processes", torchrun(2, 29533), GLOBAL_BATCH // 2), whole)
    assert_same_task(task2("accumulated", [sys.executable], GLOBAL_BATCH // 2, accumulation=2), whole)


@pytest.mark.slow
def test_accelerate_launch_works_the_same_way(model, first_task, tmp_path):
    accelerate = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29532",
    ]
    launched, _ = run_task(accelerate, model, "t5", tmp_path / "accelerate", 1, GLOBAL_BATCH // 2)
    assert_same_task(launched, first_task)
