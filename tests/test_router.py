"""The router alone (docs/methods.md): named temperatures, key initialisation, masked max-pooling and the
scores s_j(x) = <k_j, q(x)> / tau, each against a computation written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_llama
from sapt.config import SaptConfig, release_temperature
from sapt.model import SaptModel, task_generator
from sapt.router import Router, max_pool

D = 50  # d, 2d and d/2 have distinct square roots, none of them 1


# ---- temperatures -------------------------------------------------------------------------------
def config_with(temperature, hidden_size=D) -> SaptConfig:
    return SaptConfig(base_model_name_or_path="x", model_type="llama", is_encoder_decoder=False,
                      hidden_size=hidden_size, temperature=temperature)


@pytest.mark.parametrize("name, value", [
    ("sqrt_d", math.sqrt(D)), ("sqrt_2d", math.sqrt(2 * D)), ("sqrt_half_d", math.sqrt(D / 2)), ("one", 1.0),
    (2.5, 2.5),
])
def test_named_temperatures(name, value):
    assert config_with(name).temperature_value() == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("bad", ["sqrt", 0, -1.0])
def test_unknown_or_non_positive_temperature_is_refused(bad):
    with pytest.raises(ValueError):
        config_with(bad)


def test_release_flag_maps_to_the_named_temperature_of_each_family():
    # T5 scripts: 1 -> sqrt(d), anything else -> sqrt(2d); LLaMA: 1 -> sqrt(d), 2 -> sqrt(d/2), else 1.
    t5 = {flag: release_temperature(flag, is_encoder_decoder=True) for flag in (1, 2, 3)}
    llama = {flag: release_temperature(flag, is_encoder_decoder=False) for flag in (1, 2, 3)}
    assert t5 == {1: "sqrt_d", 2: "sqrt_2d", 3: "sqrt_2d"}
    assert llama == {1: "sqrt_d", 2: "sqrt_half_d", 3: "one"}


# ---- the query network and the scores -----------------------------------------------------------
def test_query_network_layout_follows_the_spec():
    router = Router(D)
    down, up, act, norm = router.query_net
    assert isinstance(down, nn.Linear) and (down.in_features, down.out_features, down.bias) == (D, 100, None)
    assert isinstance(up, nn.Linear) and (up.in_features, up.out_features, up.bias) == (100, D, None)
    assert isinstance(act, nn.SiLU)
    assert isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.normalized_shape == (D,)
    assert router.num_keys == 0 and router.keys().shape == (0, D)


@pytest.mark.parametrize("temperature", ["sqrt_d", "sqrt_2d", "sqrt_half_d", "one"])
def test_scores_equal_the_hand_computation(temperature):
    tau = config_with(temperature).temperature_value()
    torch.manual_seed(0)
    router = Router(D, query_dim=7, temperature=tau)
    norm = router.query_net[3]
    with torch.no_grad():  # an affine LayerNorm that is not the identity, so skipping it would show
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    for _ in range(3):
        router.freeze_key()
        router.add_key()
    pooled = torch.randn(4, D)

    w_down, w_up = router.query_net[0].weight, router.query_net[1].weight  # (7, D), (D, 7)
    hidden = F.silu(pooled @ w_down.T @ w_up.T)
    mean = hidden.mean(-1, keepdim=True)
    variance = hidden.var(-1, unbiased=False, keepdim=True)
    query = (hidden - mean) / torch.sqrt(variance + norm.eps) * norm.weight + norm.bias
    keys = torch.cat([router.past_keys, router.key[None]])  # oldest first
    expected = torch.stack([torch.stack([query[b].dot(keys[j]) for j in range(3)]) for b in range(4)]) / tau

    torch.testing.assert_close(router(pooled), expected)
    untempered = expected * tau
    if tau != 1.0:
        assert not torch.allclose(router(pooled), untempered)


# ---- keys ---------------------------------------------------------------------------------------
def test_key_is_uniform_in_minus_one_one_drawn_from_the_given_generator():
    router = Router(4096)
    router.add_key(torch.Generator().manual_seed(5))
    expected = torch.empty(4096).uniform_(-1, 1, generator=torch.Generator().manual_seed(5))
    key = router.key.detach()
    assert torch.equal(key, expected)
    assert key.min() >= -1 and key.max() < 1 and key.min() < -0.99 and key.max() > 0.99
    assert abs(key.mean().item()) < 0.05  # 5 standard errors of the mean of U(-1, 1) over 4096 draws
    assert isinstance(router.key, nn.Parameter) and router.key.requires_grad


def test_frozen_keys_stack_oldest_first_as_buffers():
    router = Router(8)
    drawn = []
    for seed in range(3):
        router.freeze_key()
        router.add_key(torch.Generator().manual_seed(seed))
        drawn.append(router.key.detach().clone())
    with pytest.raises(RuntimeError):
        router.add_key()  # the current key must be frozen first
    assert torch.equal(router.keys(), torch.stack(drawn)) and router.num_keys == 3
    router.freeze_key()
    assert router.key is None and torch.equal(router.past_keys, torch.stack(drawn))
    assert "past_keys" in dict(router.named_buffers()) and not router.past_keys.requires_grad
    assert [n for n, _ in router.named_parameters() if not n.startswith("query_net.")] == []


def test_a_task_draws_its_block_then_its_key_from_its_own_stream():
    """SaptModel.add_task: the A of every wrapped layer in module order, then the key, all from
    task_generator(seed, position)."""
    backbone = make_llama()
    model = SaptModel(backbone, SaptConfig.for_backbone(backbone, "tiny-llama", r=4, alpha=8))
    model.add_task("first", seed=11)
    model.freeze_current_task()
    model.add_task("second", seed=11)

    stream = task_generator(11, 1)
    for _, layer in model.sapt_layers():
        expected_A = torch.empty(4, layer.in_features)
        nn.init.kaiming_uniform_(expected_A, a=math.sqrt(5), generator=stream)
        assert torch.equal(layer.lora_A.detach(), expected_A)
        assert not layer.lora_B.any()
    expected_key = torch.empty(model.sapt_config.hidden_size).uniform_(-1, 1, generator=stream)
    assert torch.equal(model.router.key.detach(), expected_key)
    assert not torch.equal(model.router.past_keys[0], expected_key)  # the first task drew its own


# ---- masked max-pooling -------------------------------------------------------------------------
def hand_max_pool(embeddings, mask):
    """Per row, the element-wise maximum over the positions whose mask is 1."""
    rows = []
    for row, keep in zip(embeddings, mask):
        kept = [row[position] for position in range(len(keep)) if keep[position] == 1]
        pooled = kept[0]
        for vector in kept[1:]:
            pooled = torch.maximum(pooled, vector)
        rows.append(pooled)
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_max_pool_equals_the_hand_computation(dtype):
    generator = torch.Generator().manual_seed(0)
    # Negative everywhere: a pool that filled masked positions with 0 (or ignored the mask) would differ.
    embeddings = (-1 - torch.rand(3, 6, 5, generator=generator)).to(dtype)
    embeddings[1, 0] = 10.0  # a large value on a padding position
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 0, 1]])  # right, left, scattered
    pooled = max_pool(embeddings, mask)
    assert pooled.dtype == dtype
    assert torch.equal(pooled, hand_max_pool(embeddings, mask))
    assert (pooled < 0).all()  # the padded 10.0 is ignored
    # Without a mask (the release's pooling) every position counts.
    assert torch.equal(max_pool(embeddings, None), hand_max_pool(embeddings, torch.ones_like(mask)))
    assert pooled[1].max() < max_pool(embeddings, None)[1].max()
