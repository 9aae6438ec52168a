"""InfLoRA (sapt.inflora): the designed down-projection, the subspace it avoids, and the hooks' files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import BACKBONES, VOCAB
from sapt.config import SaptConfig
from sapt.inflora import (
    ROW_NORM,
    SUBSPACE_FILE,
    InfLoRAError,
    InfLoRAHooks,
    design_down_projection,
    grown_basis,
    input_statistics,
    load_subspace,
    threshold_at,
)
from sapt.model import SaptModel

NUM_TASKS = 3
LENGTHS = (9, 6, 4)  # real tokens of each row; the rest is padding
SOURCE_LENGTH, TARGET_LENGTH = 9, 5  # different, so a captured input's length tells which side it came from


def summed_model(family: str) -> SaptModel:
    """A backbone with summed blocks (InfLoRA's blocks are summed with weight 1, like O-LoRA's)."""
    backbone = BACKBONES[family](0)
    return SaptModel(backbone, SaptConfig.for_backbone(backbone, f"tiny-{family}", r=4, alpha=8, method="o_lora"))


def padded_batches(family: str, count: int, seed: int, padding_id: int | None = None) -> list[dict]:
    """Batches with padding on the side each family pads (T5: right; LLaMA: left), labels padded with -100.
    `padding_id` None draws the padded positions' ids at random too (they must not matter)."""
    generator = torch.Generator().manual_seed(seed)
    padding_generator = torch.Generator().manual_seed(seed + 1000)
    positions = torch.arange(SOURCE_LENGTH)
    lengths = torch.tensor(LENGTHS)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(4, VOCAB, (len(LENGTHS), SOURCE_LENGTH), generator=generator)
        if family == "t5":
            real = positions[None] < lengths[:, None]
        else:
            real = positions[None] >= (SOURCE_LENGTH - lengths)[:, None]
        padding = torch.randint(4, VOCAB, input_ids.shape, generator=padding_generator) if padding_id is None else padding_id
        input_ids = torch.where(real, input_ids, padding)
        if family == "t5":
            labels = torch.randint(4, VOCAB, (len(LENGTHS), TARGET_LENGTH), generator=generator)
            labels[1, 3:] = -100
            labels[2, 2:] = -100
        else:
            labels = input_ids.masked_fill(~real, -100)
            labels[:, : SOURCE_LENGTH - 2] = -100  # the prompt
        batches.append({"input_ids": input_ids, "attention_mask": real.long(), "labels": labels})
    return batches


@torch.no_grad()
def captured_statistics(model: SaptModel, batches: list[dict], family: str) -> dict[str, torch.Tensor]:
    """C per layer computed another way: every layer's raw inputs kept, the real positions picked by the
    input's length (encoder side: attention mask; T5 decoder side: labels != -100), then XᵀX / n."""
    rows = {name: [] for name, _ in model.sapt_layers()}
    current = {}

    def keep(name):
        def hook(module, args, output):
            x = args[0]
            if family == "t5" and x.shape[1] == TARGET_LENGTH:
                mask = current["labels"] != -100
            else:
                assert x.shape[1] == SOURCE_LENGTH
                mask = current["attention_mask"].bool()
            rows[name].append(x[mask].double())

        return hook

    handles = [layer.register_forward_hook(keep(name)) for name, layer in model.sapt_layers()]
    model.eval()
    for batch in batches:
        current.update(batch)
        model(**batch)
    for handle in handles:
        handle.remove()
    result = {}
    for name, parts in rows.items():
        inputs = torch.cat(parts)
        result[name] = inputs.T @ inputs / inputs.shape[0]
    return result


def learn_first_task(model: SaptModel, hooks: InfLoRAHooks, family: str, folder) -> None:
    """Task 1 through the hooks; 'training' sets every B to random values."""
    model.add_task("task1")
    hooks.before_training(model, padded_batches(family, 2, seed=1), None, 0, NUM_TASKS)
    generator = torch.Generator().manual_seed(7)
    for _, layer in model.sapt_layers():
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=generator) * 0.5
    hooks.after_training(model, padded_batches(family, 2, seed=1), folder, 0, NUM_TASKS)
    model.freeze_current_task()
    model.add_task("task2")


def two_tasks(family: str, tmp_path):
    """The model right after before_training of task 2, the first task's folder, and C of task 2 as the
    hook saw it (computed independently)."""
    model, hooks = summed_model(family), InfLoRAHooks()
    first = tmp_path / "1-task1"
    learn_first_task(model, hooks, family, first)
    batches = padded_batches(family, 2, seed=2)
    statistics = captured_statistics(model, batches, family)  # the new block's B is 0: A does not matter yet
    hooks.before_training(model, batches, first, 1, NUM_TASKS)
    return model, hooks, first, statistics


# ---- (a) the defining property ------------------------------------------------------------------------
def test_designed_rows_avoid_the_earlier_subspace_and_span_the_top_projected_directions(family, tmp_path):
    model, _, first, statistics = two_tasks(family, tmp_path)
    bases = load_subspace(first / SUBSPACE_FILE, model)
    for name, layer in model.sapt_layers():
        A, M = layer.lora_A.detach().double(), bases[name]
        assert 0 < M.shape[1] <= layer.in_features - layer.r
        assert (A @ M).norm() / A.norm() < 1e-5, name
        torch.testing.assert_close(A @ A.T, ROW_NORM**2 * torch.eye(layer.r, dtype=torch.float64), atol=1e-6, rtol=0)
        # Independently: the left singular vectors of (I - M Mᵀ) C are the eigenvectors of (I - M Mᵀ) C Cᵀ (I - M Mᵀ).
        outside = torch.eye(layer.in_features, dtype=torch.float64) - M @ M.T
        C = statistics[name]
        values, vectors = torch.linalg.eigh(outside @ C @ C.T @ outside)
        top = vectors[:, -layer.r :]
        assert values[-layer.r] > 1.01 * values[-layer.r - 1]  # a gap: the top-r space is well defined
        torch.testing.assert_close(A.T @ A / ROW_NORM**2, top @ top.T, atol=1e-5, rtol=0)


def test_first_task_rows_are_the_top_eigenvectors_of_the_input_second_moment(family):
    model, hooks = summed_model(family), InfLoRAHooks()
    model.add_task("task1")
    batches = padded_batches(family, 2, seed=1)
    statistics = captured_statistics(model, batches, family)
    hooks.before_training(model, batches, None, 0, NUM_TASKS)
    for name, layer in model.sapt_layers():
        A = layer.lora_A.detach().double()
        _, vectors = torch.linalg.eigh(statistics[name])
        top = vectors[:, -layer.r :]
        torch.testing.assert_close(A.T @ A / ROW_NORM**2, top @ top.T, atol=1e-5, rtol=0)


def test_statistics_ignore_padding_positions(family):
    model = summed_model(family)
    model.add_task("task1")
    ours = input_statistics(model, padded_batches(family, 2, seed=3))
    other_padding = padded_batches(family, 2, seed=3, padding_id=2)
    torch.testing.assert_close(input_statistics(model, other_padding), ours, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(captured_statistics(model, other_padding, family), ours, rtol=1e-10, atol=1e-12)


# ---- (b) earlier tasks' outputs are unchanged --------------------------------------------------------
def test_training_the_new_block_leaves_outputs_on_the_earlier_subspace_unchanged(family, tmp_path):
    model, _, first, _ = two_tasks(family, tmp_path)
    bases = load_subspace(first / SUBSPACE_FILE, model)
    name, layer = list(model.sapt_layers())[-1]
    M = bases[name].float()
    generator = torch.Generator().manual_seed(11)
    inside = (torch.randn(2, 3, M.shape[1], generator=generator) @ M.T).contiguous()  # in span(M)
    outside = (layer.lora_A.detach()[:2] / ROW_NORM).reshape(2, 1, -1)  # designed directions, outside span(M)
    train_x = torch.randn(2, 3, layer.in_features, generator=generator)
    target = torch.randn(2, 3, layer.out_features, generator=generator)
    model.routing.weights = torch.ones(2, 2)
    with torch.no_grad():
        before_inside, before_outside = layer(inside), layer(outside)
    frozen_A = layer.lora_A.detach().clone()
    optimizer = torch.optim.Adam([p for _, p in model.trainable_parameters()], lr=0.05)
    for _ in range(5):
        loss = (layer(train_x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert layer.lora_A.equal(frozen_A) and layer.lora_B.abs().max() > 0.1
    with torch.no_grad():
        after_inside, after_outside = layer(inside), layer(outside)
    assert (after_inside - before_inside).abs().max() <= 1e-5 * before_inside.abs().max()
    assert (after_outside - before_outside).abs().max() > 1e-2


# ---- (c) the subspace update -------------------------------------------------------------------------
def test_threshold_rises_linearly_from_start_to_end():
    assert threshold_at(0, 15) == 0.995
    assert threshold_at(14, 15) == 0.995 + 0.005 * 14 / 15
    assert threshold_at(2, 4, start=0.95, end=1.0) == 0.975
    with pytest.raises(ValueError, match="outside a run of 4 tasks"):
        threshold_at(4, 4)


def test_basis_grows_by_the_energy_rule_on_a_known_spectrum():
    """C = diag(4, 2, 1, 1, 0, ...): squared singular values 16, 4, 1, 1 of 22. First task at 0.95: the
    shares' cumulative sums 16/22, 20/22 stay below it, 21/22 does not -> 2 directions. A later task with
    the same C: 20/22 is covered, one more direction brings 21/22 >= 0.95 -> 3."""
    d = 6
    rotation, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    C = rotation @ torch.diag(torch.tensor([4.0, 2, 1, 1, 0, 0], dtype=torch.float64)) @ rotation.T
    first = grown_basis(C, torch.zeros(d, 0, dtype=torch.float64), 0.95)
    assert first.shape == (d, 2)
    torch.testing.assert_close(first @ first.T, rotation[:, :2] @ rotation[:, :2].T, atol=1e-12, rtol=0)
    second = grown_basis(C, first, 0.95)
    assert second.shape == (d, 3) and second[:, :2].equal(first)
    torch.testing.assert_close(second.T @ second, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert grown_basis(C, second, 0.95).equal(second)  # already at the threshold: nothing added
    # Zero-energy directions are never added, even for a threshold the rounding may not reach.
    assert grown_basis(C, second, 1.0).shape == (d, 4)
    assert grown_basis(C, first, 0.5).equal(first)
    full = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    assert grown_basis(C, full, 0.99).equal(full)  # nothing left to add
    assert design_down_projection(C, full[:, :4], 3)[2:].count_nonzero() == 0  # 2 free dimensions for 3 rows


def test_saved_subspace_is_orthonormal_grows_and_round_trips(family, tmp_path):
    model, hooks, first, statistics = two_tasks(family, tmp_path)
    second = tmp_path / "2-task2"
    hooks.after_training(model, padded_batches(family, 2, seed=2), second, 1, NUM_TASKS)
    earlier, bases = load_subspace(first / SUBSPACE_FILE, model), load_subspace(second / SUBSPACE_FILE, model)
    assert set(bases) == {name for name, _ in model.sapt_layers()}
    grew = 0
    for name, M in bases.items():
        k = earlier[name].shape[1]
        assert M[:, :k].equal(earlier[name]) and M.shape[1] >= k
        grew += M.shape[1] > k
        torch.testing.assert_close(M.T @ M, torch.eye(M.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
    assert grew > 0
    from safetensors.torch import load_file, safe_open

    with safe_open(str(second / SUBSPACE_FILE), "pt") as handle:
        record = {"position": 1, "num_tasks": NUM_TASKS, "threshold": threshold_at(1, NUM_TASKS)}
        assert handle.metadata() == {"inflora": json.dumps(record)}
    assert all(load_file(str(second / SUBSPACE_FILE))[n].equal(M) for n, M in bases.items())


def test_missing_or_malformed_subspace_file_is_one_line_naming_it(tmp_path):
    model = summed_model("t5")
    model.add_task("task1")
    path = tmp_path / SUBSPACE_FILE
    for content, problem in [(None, "InfLoRA subspace file is missing"), (b"not safetensors", "unreadable safetensors file")]:
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(InfLoRAError) as caught:
            InfLoRAHooks().before_training(model, [], tmp_path, 1, NUM_TASKS)
        assert str(caught.value).startswith(f"{path}: {problem}") and "\n" not in str(caught.value)
    from sapt.utils.fileio import save_tensors_atomic

    layers = dict(model.sapt_layers())
    some = next(iter(layers))
    save_tensors_atomic(path, {some: torch.zeros(32, 1, dtype=torch.float64)})
    with pytest.raises(InfLoRAError, match="layers do not match the model"):
        load_subspace(path, model)
    save_tensors_atomic(path, {name: torch.zeros(33, 1, dtype=torch.float64) for name in layers})
    with pytest.raises(InfLoRAError, match=r"expected float64 \(32, k <= 32\)"):
        load_subspace(path, model)


def test_hooks_called_out_of_order_are_refused(tmp_path):
    model = summed_model("llama")
    model.add_task("task1")
    with pytest.raises(InfLoRAError, match="call before_training first"):
        InfLoRAHooks().after_training(model, [], tmp_path, 0, NUM_TASKS)
    with pytest.raises(InfLoRAError, match="position 1 given previous folder None"):
        InfLoRAHooks().before_training(model, [], None, 1, NUM_TASKS)
    with pytest.raises(InfLoRAError, match="position 0 given previous folder"):
        InfLoRAHooks().before_training(model, [], tmp_path, 0, NUM_TASKS)
    with pytest.raises(InfLoRAError, match="no input position reached"):
        InfLoRAHooks().before_training(model, [], None, 0, NUM_TASKS)


# ---- (d) lora_A frozen, lora_B trains ----------------------------------------------------------------
def test_only_lora_B_trains_and_gets_gradient(family, tmp_path):
    model, _, _, _ = two_tasks(family, tmp_path)
    assert {name.rsplit(".", 1)[-1] for name, _ in model.trainable_parameters()} == {"lora_B"}
    model.train()
    model(**padded_batches(family, 1, seed=5)[0]).loss.backward()
    for name, layer in model.sapt_layers():
        assert not layer.lora_A.requires_grad and layer.lora_A.grad is None, name
        assert layer.lora_B.grad is not None and layer.past_down.grad is None
    assert sum(layer.lora_B.grad.abs().sum() for _, layer in model.sapt_layers()) > 0


# ---- (e) determinism ---------------------------------------------------------------------------------
def test_same_inputs_give_identical_blocks_and_files(family, tmp_path):
    runs = []
    for run in ("a", "b"):
        model, hooks, first, _ = two_tasks(family, tmp_path / run)
        hooks.after_training(model, padded_batches(family, 2, seed=2), tmp_path / run / "2", 1, NUM_TASKS)
        runs.append(([layer.lora_A.detach().clone() for _, layer in model.sapt_layers()],
                     [(folder / SUBSPACE_FILE).read_bytes() for folder in (first, tmp_path / run / "2")]))
    (blocks_a, files_a), (blocks_b, files_b) = runs
    assert all(a.equal(b) for a, b in zip(blocks_a, blocks_b)) and files_a == files_b


def test_row_norm_matches_the_reference_code():
    assert ROW_NORM == 1 / math.sqrt(3)
