"""One routing: the distribution ARM's KL and the own-block loss compare is the one the forward mixes the
blocks with, for the same inputs (sapt.router computes both from the same scores)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from datasets import Dataset

from conftest import make_sapt, sample_batch
from sapt.own_block import own_block_loss
from sapt.reflection import AttentiveReflection
from sapt.router import to_log_weights
from sapt.training.trainer import StepPosition

PAD = 0


class PaddedIds:
    """Pseudo rows of token ids of different lengths, right-padded with PAD (masked out)."""

    def __call__(self, examples):
        longest = max(len(ex["ids"]) for ex in examples)
        ids = torch.tensor([ex["ids"] + [PAD] * (longest - len(ex["ids"])) for ex in examples])
        return {"input_ids": ids, "attention_mask": ids.ne(PAD).long()}


def pseudo_rows() -> Dataset:
    generator = torch.Generator().manual_seed(7)
    lengths = [3, 6, 4, 5]
    return Dataset.from_dict({"ids": [torch.randint(4, 90, (n,), generator=generator).tolist() for n in lengths]})


def forward_routing(model, family: str, batch: dict) -> torch.Tensor:
    """The routing weights the model's forward mixes the blocks with for `batch`."""
    extra = {"decoder_input_ids": torch.zeros(len(batch["input_ids"]), 2, dtype=torch.long)} if family == "t5" else {}
    with torch.no_grad():
        model(**batch, **extra)
    return model.routing.weights


def router_outputs(model) -> list[torch.Tensor]:
    """Every score tensor the router returns from now on."""
    seen = []
    model.router.register_forward_hook(lambda module, inputs, output: seen.append(output.detach().clone()))
    return seen


def assert_not_uniform(weights: torch.Tensor) -> None:
    """Inputs for which the comparison could fail: weights far from uniform, and different per input."""
    assert (weights - 1 / weights.shape[1]).abs().max() > 0.05
    assert (weights - weights[:1]).abs().max() > 1e-3


def test_arm_kl_compares_the_forwards_routing_distribution(family, monkeypatch):
    model = make_sapt(family, 3)
    rows, collator = pseudo_rows(), PaddedIds()
    reflection = AttentiveReflection([rows], [[0.3, 0.7]], collator, batch_size=4, num_blocks=3)
    compared = []
    kl_div = F.kl_div

    def recording_kl_div(log_weights, target, **kwargs):
        compared.append((log_weights.detach().clone(), target.clone()))
        return kl_div(log_weights, target, **kwargs)

    monkeypatch.setattr(F, "kl_div", recording_kl_div)
    scores = router_outputs(model)
    reflection.loss(model, StepPosition(0, 0, 1, 0, 1))  # step 0 reads rows 0..3: the whole set, in order
    weights = forward_routing(model, family, collator([rows[i] for i in range(4)]))

    assert len(compared) == 1 and len(scores) == 2
    log_weights, target = compared[0]
    assert_not_uniform(weights)
    assert torch.equal(scores[0], scores[1])  # the KL's scores are the forward's, bit for bit
    assert (log_weights.exp() - weights).abs().max() <= 1e-7
    torch.testing.assert_close(target, torch.tensor([[0.3, 0.7, 0.0]]).expand(4, 3), atol=0, rtol=0)
    # Both pool the real tokens only: the shortest row, padded in the batch, routes the same alone.
    alone = forward_routing(model, family, collator([rows[0]]))
    torch.testing.assert_close(alone, weights[:1])


def test_own_block_loss_reads_the_forwards_routing_distribution(family):
    model = make_sapt(family, 3)
    batch = sample_batch(family, batch=4)
    scores = router_outputs(model)
    loss = own_block_loss(model, batch)
    with torch.no_grad():
        model(**batch)
    weights = model.routing.weights
    assert len(scores) == 2 and torch.equal(scores[0], scores[1])
    assert_not_uniform(weights)
    torch.testing.assert_close(loss.detach(), -weights[:, -1].log().mean(), atol=1e-6, rtol=0)


def test_one_block_has_weight_one_and_log_weight_zero():
    model = make_sapt("llama", 1)
    batch = sample_batch("llama")
    weights = model.routing_weights(batch["input_ids"], batch["attention_mask"], batch["labels"])
    log_weights = to_log_weights(model.routing_logits(batch["input_ids"], batch["attention_mask"], batch["labels"]))
    assert torch.equal(weights, torch.ones(3, 1)) and torch.equal(log_weights, torch.zeros(3, 1))
