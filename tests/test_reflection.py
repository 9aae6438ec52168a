"""ARM: targets, the KL term and where its gradient goes."""

import pytest
import torch
from datasets import Dataset

from conftest import make_sapt
from sapt.reflection import AttentiveReflection, arm_target


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


def test_kl_equals_hand_computation_and_cycles_batches():
    model = make_sapt("t5", 3)
    sets = [pseudo_set(1), pseudo_set(2)]
    means = [[1.0], [0.4, 0.6]]
    reflection = AttentiveReflection(sets, means, IdCollator(), batch_size=2, num_blocks=3)
    expected = 0.0
    for dataset, mean in zip(sets, means):
        ids = torch.tensor(dataset["ids"][:2])
        log_p = model.routing_logits(ids, torch.ones_like(ids)).log_softmax(-1)
        target = torch.tensor(mean + [0.0] * (3 - len(mean)))
        kl = sum(t * (torch.log(t) - lp) for t, lp in zip(target, log_p.T) if t > 0) / 2
        expected = expected + kl.sum()
    torch.testing.assert_close(reflection.loss(model), expected)
    # Batches cycle: 5 rows in batches of 2 (2, 2, 1) -> the fourth call is the first batch again.
    second = reflection.loss(model)
    reflection.loss(model)
    torch.testing.assert_close(reflection.loss(model), torch.as_tensor(expected))
    assert second.item() != expected.item()


def test_kl_gradient_reaches_only_query_net_and_current_key():
    model = make_sapt("llama", 3)
    model.train()
    reflection = AttentiveReflection([pseudo_set(1), pseudo_set(2)], [[1.0], [0.5, 0.5]], IdCollator(), 2, 3)
    reflection.loss(model).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "router.key" in with_grad
    assert with_grad <= {"router.key"} | {n for n, _ in model.named_parameters() if n.startswith("router.query_net.")}
    assert any(n.startswith("router.query_net.") for n in with_grad)
