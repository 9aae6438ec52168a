"""A method's hooks in a real task step (sapt.training.method_hooks, train_task): InfLoRA through `--method inflora`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import BENCHMARK, SUPERNI_TASKS, make_sapt
from sapt.inflora import ROW_NORM, SUBSPACE_FILE
from sapt.run_files import COMPLETE_FILE
from sapt.training.method_hooks import FROZEN_BLOCK_FILE, FrozenBlockTensors, training_batches
from sapt.training.train_task import main

TASKS = SUPERNI_TASKS


def inflora_argv(model_dir, outputs, position, *extra) -> list[str]:
    task = TASKS[position - 1]
    argv = [
        "--model_name_or_path", str(model_dir), "--data_dir", str(BENCHMARK), "--method", "inflora",
        "--task_order", ",".join(TASKS), "--task", task, "--output_dir", str(outputs / f"{position}-{task}"),
        "--max_train_samples", "8", "--max_eval_samples", "4", "--max_predict_samples", "4",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--num_train_epochs", "1",
        "--learning_rate", "1e-2", "--max_source_length", "64", "--generation_max_length", "3", "--lora_r", "2",
        "--disable_tqdm", "true", *extra,
    ]
    if position > 1:
        argv += ["--previous_task_dir", str(outputs / f"{position - 1}-{TASKS[position - 2]}")]
    return argv


@pytest.fixture(scope="module")
def inflora_run(tiny_models, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("inflora") / "outputs"
    for position in (1, 2):
        assert main(inflora_argv(tiny_models["t5"], outputs, position)) == 0
    return outputs


def test_training_batches_are_the_trainers_batches_in_order_capped():
    rows = [{"x": i} for i in range(10)]
    collate = lambda examples: [e["x"] for e in examples]  # noqa: E731
    assert list(training_batches(rows, collate, 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(training_batches(rows, collate, 4, limit=2)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(training_batches(rows, collate, 4, limit=9)) == list(training_batches(rows, collate, 4))


def test_frozen_block_tensors_round_trip_through_a_checkpoint_folder(tmp_path):
    model = make_sapt("t5", 2, method="inflora")
    for _, layer in model.sapt_layers():
        layer.lora_A.requires_grad_(False)  # as InfLoRA's before_training leaves it
    kept = FrozenBlockTensors(model)
    assert set(kept.tensors) == {n for n, _ in model.named_parameters() if n.endswith(".lora_A")}
    designed = {name: value.clone() for name, value in kept.tensors.items()}
    kept.save(tmp_path)
    with torch.no_grad():
        for _, layer in model.sapt_layers():
            layer.lora_A.mul_(3)  # what a second design would have written
    FrozenBlockTensors(make_sapt("t5", 1, method="inflora")).load(tmp_path / "elsewhere")  # no file: nothing happens
    kept.load(tmp_path)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in designed.items())
    trainable = make_sapt("t5", 2, method="inflora")  # nothing frozen: nothing kept, no file written
    FrozenBlockTensors(trainable).save(tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_each_inflora_task_writes_its_subspace_and_a_block_outside_the_earlier_one(inflora_run):
    first, second = (inflora_run / f"{i}-{t}" for i, t in enumerate(TASKS, start=1))
    assert (first / SUBSPACE_FILE).is_file() and (second / SUBSPACE_FILE).is_file()
    assert json.loads((second / COMPLETE_FILE).read_text())["method"] == "inflora"
    earlier = load_file(str(first / SUBSPACE_FILE))  # layer -> (d_in, k) basis after task 1
    block = load_file(str(second / "block.safetensors"))
    checked = 0
    for layer, basis in earlier.items():
        down = block[f"{layer}.lora_A"].double()  # (r, d_in), as trained: it never left the design
        assert (down @ basis).abs().max().item() < 1e-5, layer
        if basis.shape[1] + down.shape[0] <= basis.shape[0]:  # room for every row outside the subspace
            torch.testing.assert_close(down.norm(dim=1), torch.full((down.shape[0],), ROW_NORM, dtype=torch.float64))
            checked += 1
    assert checked > 0
    later = load_file(str(second / SUBSPACE_FILE))
    assert all(later[name].shape[1] >= basis.shape[1] for name, basis in earlier.items())


def test_a_resumed_task_keeps_the_block_it_started_with(tiny_models, tmp_path):
    """The checkpoint's copy of the designed A wins over the design run again on resume."""
    outputs = tmp_path / "outputs"
    argv = inflora_argv(tiny_models["t5"], outputs, 1, "--num_train_epochs", "2", "--save_strategy", "epoch",
                        "--keep_checkpoints", "true")
    assert main(argv) == 0
    folder = outputs / f"1-{TASKS[0]}"
    last = max(folder.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    kept = load_file(str(last / FROZEN_BLOCK_FILE))
    block = load_file(str(folder / "block.safetensors"))
    assert kept and all(torch.equal(block[name.removeprefix("base_model.")], value) for name, value in kept.items())
    # Stand in for a design that differs from what a redesign would give, then resume the finished step.
    save_file({name: value * 2 for name, value in kept.items()}, str(last / FROZEN_BLOCK_FILE))
    (folder / COMPLETE_FILE).unlink()
    assert main(argv) == 0
    again = load_file(str(folder / "block.safetensors"))
    assert all(torch.equal(again[name.removeprefix("base_model.")], value * 2) for name, value in kept.items())


def test_a_missing_subspace_of_the_earlier_task_is_one_line_before_anything_loads(tiny_models, inflora_run, tmp_path,
                                                                                   capsys):
    outputs = tmp_path / "outputs"
    first = outputs / f"1-{TASKS[0]}"
    shutil.copytree(inflora_run / first.name, first)
    (first / SUBSPACE_FILE).unlink()
    assert main(inflora_argv(tiny_models["t5"], outputs, 2)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"sapt train_task: error: {first / SUBSPACE_FILE}: file is missing"]
    assert not (outputs / f"2-{TASKS[1]}").exists()
