"""Two processes (torchrun / accelerate launch, gloo on the CPU) take the same steps as one process
with the same global batch: equal saved blocks, router, ā and metrics."""

import sys

from conftest import requires_benchmark
from launch import assert_same_task, no_dropout_copy, run_task, torchrun


@requires_benchmark()
def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_models, tmp_path):
    model = no_dropout_copy(tiny_models["t5"], tmp_path / "t5")
    for position in (1, 2):  # task 2 adds the router and ARM to what must agree
        two, _ = run_task(torchrun(2, 29531), model, "t5", tmp_path / "two", position, 4)
        one, _ = run_task([sys.executable], model, "t5", tmp_path / "one", position, 8)
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
    launched, _ = run_task(accelerate, model, "t5", tmp_path / "accelerate", 1, 4)
    single, _ = run_task([sys.executable], model, "t5", tmp_path / "one", 1, 8)
    assert_same_task(launched, single)
