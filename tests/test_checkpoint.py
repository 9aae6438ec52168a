"""Task artifacts round trip: save -> load_checkpoint gives identical logits."""

import json

import pytest
import torch

from conftest import BACKBONES, make_sapt, sample_batch
from sapt.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_routing_mean,
    restore_model,
    save_routing_mean,
    save_task_artifacts,
)


def save_sequence(model, outputs_dir):
    """Write the model as if each of its tasks had been trained in its own numbered folder."""
    tasks = model.tasks
    for position, task in enumerate(tasks, start=1):
        folder = outputs_dir / f"{position}-{task}"
        # Block j of task `position` is stored in folder j: save a view of the model truncated to it.
        partial = make_sapt_prefix(model, position)
        dirs = [f"../{j}-{tasks[j - 1]}" for j in range(1, position)]
        save_task_artifacts(partial, folder, dirs)
        save_routing_mean(folder, tasks[:position], [1.0 / position] * position)
    return outputs_dir / f"{len(tasks)}-{tasks[-1]}"


def make_sapt_prefix(model, count):
    """The same model restricted to its first `count` blocks and keys (shares tensors)."""
    import copy

    prefix = copy.deepcopy(model)
    for _, layer in prefix.sapt_layers():
        A, B = layer.stacked_blocks()
        layer.lora_A = layer.lora_B = None
        layer.set_frozen_blocks(A[:count].detach().clone(), B[:count].detach().clone())
    if prefix.router is not None:
        keys = prefix.router.keys()[:count].detach().clone()
        prefix.router.key = None
        prefix.router.past_keys = keys
    prefix.sapt_config.tasks = model.tasks[:count]
    return prefix


def test_save_then_load_gives_identical_logits(family, tmp_path):
    model = make_sapt(family, 3).eval()
    model.freeze_current_task()
    last = save_sequence(model, tmp_path / "outputs")
    loaded = load_checkpoint(tmp_path / "outputs", backbone=BACKBONES[family](0))
    assert not loaded.training
    assert loaded.tasks == ["task1", "task2", "task3"] and loaded.num_blocks == 3
    batch = sample_batch(family)
    with torch.no_grad():
        expected = model(**batch).logits
        actual = loaded(**batch).logits
    assert torch.equal(actual, expected)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if not n.startswith("base_model."))
    # Loading the task folder itself gives the same model as loading the run's outputs folder.
    assert torch.equal(load_checkpoint(last, backbone=BACKBONES[family](0))(**batch).logits, expected)


def test_intermediate_task_folder_loads_the_model_after_that_task(tmp_path):
    model = make_sapt("t5", 3).eval()
    model.freeze_current_task()
    save_sequence(model, tmp_path / "outputs")
    after_two = load_checkpoint(tmp_path / "outputs" / "2-task2", backbone=BACKBONES["t5"](0))
    reference = make_sapt_prefix(model, 2)
    batch = sample_batch("t5")
    with torch.no_grad():
        assert torch.equal(after_two(**batch).logits, reference(**batch).logits)


def test_routing_mean_is_stored_newest_first(tmp_path):
    save_routing_mean(tmp_path, ["a", "b", "c"], [0.5, 0.3, 0.2])
    data = json.loads((tmp_path / "routing_mean.json").read_text())
    assert data == {"tasks": ["c", "b", "a"], "weights": [0.2, 0.3, 0.5]}
    assert load_routing_mean(tmp_path) == [0.5, 0.3, 0.2]


def test_missing_block_file_is_named(tmp_path):
    model = make_sapt("llama", 2).eval()
    model.freeze_current_task()
    save_sequence(model, tmp_path / "outputs")
    (tmp_path / "outputs" / "1-task1" / "block.safetensors").unlink()
    with pytest.raises(CheckpointError, match="1-task1/block.safetensors: file is missing"):
        load_checkpoint(tmp_path / "outputs", backbone=BACKBONES["llama"](0))


def test_block_from_another_backbone_is_refused(tmp_path):
    model = make_sapt("llama", 1).eval()
    model.freeze_current_task()
    save_sequence(model, tmp_path / "outputs")
    with pytest.raises(CheckpointError, match="made for a llama backbone"):
        restore_model(BACKBONES["t5"](0), tmp_path / "outputs" / "1-task1")
    # Same family, other depth: the block's projections do not match.
    from transformers import LlamaConfig, LlamaForCausalLM

    deeper = LlamaForCausalLM(LlamaConfig(**{**BACKBONES["llama"](0).config.to_dict(), "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="does not fit this backbone"):
        restore_model(deeper, tmp_path / "outputs" / "1-task1")
