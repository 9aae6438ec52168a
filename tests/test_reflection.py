"""ARM: targets, the KL term and where its gradient goes."""

import pytest
import torch
from datasets import Dataset

from conftest import make_sapt
from sapt.reflection import AttentiveReflection, arm_target, window_rows
from sapt.training.trainer import StepPosition


def test_target_pads_newer_tasks_with_zeros():
    # ā of task 2 over (k1, k2), model now at task 4: blocks 3 and 4 are newer than task 2.
    torch.testing.assert_close(arm_target([0.3, 0.7], 4), torch.tensor([0.3, 0.7, 0.0, 0.0]))
    torch.testing.assert_close(arm_target([1.0], 3), torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError):
        arm_target([0.5, 0.5], 1)


class IdCollator:
    """Pseudo examples carry token ids directly (no tokenizer needed in these tests)."""

    def __call__(self, examples):
        ids = torch.tensor([ex["ids"] for ex in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "example_index": torch.zeros(len(ids))}


def pseudo_set(seed, rows=5):
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"ids": torch.randint(4, 90, (rows, 6), generator=generator).tolist()})


def position(step=0, micro_batch=0, accumulation_steps=1, rank=0, world_size=1):
    return StepPosition(step, micro_batch, accumulation_steps, rank, world_size)


def hand_kl(model, ids, mean, num_blocks):
    log_p = model.routing_logits(ids, torch.ones_like(ids)).log_softmax(-1)
    target = torch.tensor(mean + [0.0] * (num_blocks - len(mean)))
    return sum(t * (torch.log(t) - lp) for t, lp in zip(target, log_p.T) if t > 0).mean()


def test_kl_equals_hand_computation_on_the_steps_window():
    model = make_sapt("t5", 3)
    sets = [pseudo_set(1), pseudo_set(2)]
    means = [[1.0], [0.4, 0.6]]
    reflection = AttentiveReflection(sets, means, IdCollator(), batch_size=2, num_blocks=3)
    # Step 3 with batch 2 reads rows 6, 7 of the endless cycle: rows 1 and 2 of a 5-row set.
    expected = sum(hand_kl(model, torch.tensor([d["ids"][1], d["ids"][2]]), m, 3) for d, m in zip(sets, means))
    torch.testing.assert_close(reflection.loss(model, position(step=3)), expected)
    assert reflection.loss(model, position(step=0)).item() != pytest.approx(expected.item())


def test_window_rows_follow_micro_batch_then_process_and_wrap():
    assert window_rows(5, 2, position(step=3)) == [1, 2]
    # step 1 of a global batch of 2 × 2 processes × 2 micro-batches = rows 8..15 of the cycle (mod 10)
    slices = [window_rows(10, 2, position(1, m, 2, r, 2)) for m in range(2) for r in range(2)]
    assert slices == [[8, 9], [0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("layout", [(2, 1), (1, 2), (2, 2), (4, 1)])  # (processes, micro-batches) per step
def test_a_steps_term_is_the_same_however_the_step_is_split(layout):
    """Mean over the shares of (term / micro-batches) — what DDP averaging and accumulation make of it —
    equals one process reading the whole window."""
    world, micro_batches = layout
    model = make_sapt("llama", 3)
    sets = [pseudo_set(1, rows=7), pseudo_set(2, rows=6)]
    means = [[1.0], [0.3, 0.7]]
    global_batch = 8
    whole = AttentiveReflection(sets, means, IdCollator(), global_batch, 3)
    split = AttentiveReflection(sets, means, IdCollator(), global_batch // (world * micro_batches), 3)
    for step in (0, 1, 2):
        reference = whole.loss(model, position(step=step))
        shares = [
            split.loss(model, position(step, m, micro_batches, r, world)) / micro_batches
            for m in range(micro_batches) for r in range(world)
        ]
        combined = torch.stack(shares).sum() / world
        torch.testing.assert_close(combined, reference)
        assert len({round(s.item(), 6) for s in shares}) > 1  # the shares really read different rows


def test_kl_gradient_reaches_only_query_net_and_current_key():
    model = make_sapt("llama", 3)
    model.train()
    reflection = AttentiveReflection([pseudo_set(1), pseudo_set(2)], [[1.0], [0.5, 0.5]], IdCollator(), 2, 3)
    reflection.loss(model, position()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "router.key" in with_grad
    assert with_grad <= {"router.key"} | {n for n, _ in model.named_parameters() if n.startswith("router.query_net.")}
    assert any(n.startswith("router.query_net.") for n in with_grad)
