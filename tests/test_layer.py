"""The batched mixing of SaptLinear against a plain per-task loop."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import stacked_layer
from sapt.layer import RoutingState, SaptLinear


def per_task_reference(layer: SaptLinear, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """W x + Σ_j a_j (alpha/r) B_j A_j x, one task at a time."""
    out = layer.base_layer(x)
    A, B = layer.stacked_blocks()
    for j in range(A.shape[0]):
        delta = x @ A[j].T @ B[j].T  # (batch, L, d_out)
        out = out + weights[:, j, None, None] * layer.scaling * delta
    return out


@pytest.mark.parametrize("num_tasks", [1, 2, 5, 15])
@pytest.mark.parametrize("d_in,d_out", [(16, 16), (16, 24)])
def test_batched_mixing_equals_per_task_loop(num_tasks, d_in, d_out):
    torch.manual_seed(num_tasks)
    layer, routing = stacked_layer(num_tasks, d_in, d_out)
    x = torch.randn(3, 5, d_in)
    routing.weights = torch.randn(3, num_tasks).softmax(-1)
    torch.testing.assert_close(layer(x), per_task_reference(layer, x, routing.weights), rtol=1e-5, atol=1e-5)


def test_new_block_starts_as_no_op_and_frozen_blocks_have_no_parameters():
    routing = RoutingState()
    base = nn.Linear(8, 8)
    layer = SaptLinear(base, r=2, alpha=4, dropout=0.0, routing=routing)
    layer.add_block()
    routing.weights = torch.ones(2, 1)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(layer(x), base(x))
    layer.freeze_block()
    assert layer.lora_A is None and layer.past_A.shape == (1, 2, 8)
    assert {n for n, _ in layer.named_parameters()} == {"base_layer.weight", "base_layer.bias"}


def test_beam_expansion_repeats_each_row():
    routing = RoutingState()
    routing.weights = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    expanded = routing.for_batch(4)
    torch.testing.assert_close(expanded, torch.tensor([[0.2, 0.8], [0.2, 0.8], [0.6, 0.4], [0.6, 0.4]]))
    with pytest.raises(RuntimeError):
        routing.for_batch(3)


def test_block_shape_mismatch_is_refused():
    layer = SaptLinear(nn.Linear(8, 6), r=2, alpha=4, dropout=0.0, routing=RoutingState())
    with pytest.raises(ValueError, match="do not fit"):
        layer.append_frozen_block(torch.zeros(2, 6), torch.zeros(8, 2))


def test_matrices_kept_for_a_routed_pass_without_gradient_follow_every_block_change():
    """Without gradient the stacked blocks are built once per routed pass (decoding reuses them); an
    optimizer step, a new block or a freeze must never be served from that store."""
    torch.manual_seed(0)
    routing = RoutingState()
    layer = SaptLinear(nn.Linear(8, 8), r=2, alpha=4, dropout=0.0, routing=routing)
    layer.add_block()
    nn.init.normal_(layer.lora_B)
    routing.weights = torch.ones(2, 1)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        first = layer(x)
        assert layer(x).equal(first) and len(routing.matrix_cache) == 1
        layer.lora_B.add_(1.0)  # what an optimizer step does, in place
        torch.testing.assert_close(layer(x), per_task_reference(layer, x, routing.weights))
        assert not layer(x).equal(first)
    layer.freeze_block()
    layer.add_block()
    nn.init.normal_(layer.lora_B)
    routing.weights = torch.tensor([[0.3, 0.7], [0.9, 0.1]])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), per_task_reference(layer, x, routing.weights))
    # With gradient the current block is read live, so its gradient reaches it.
    layer(x).sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("autocast", [False, True])
def test_training_gradients_equal_autograd_through_the_stacked_blocks(num_tasks, autocast):
    """The training path skips the frozen blocks' weight gradients; every gradient that matters (input,
    current block, routing weights) must equal plain autograd through the concatenated matrices."""
    torch.manual_seed(num_tasks)
    layer, routing = stacked_layer(num_tasks, 16, 24)
    x = torch.randn(3, 5, 16, requires_grad=True)
    logits = torch.randn(3, num_tasks, requires_grad=True)

    def reference():
        weights = logits.softmax(-1).repeat_interleave(layer.r, dim=1) * layer.scaling
        down, up = layer.matrices()
        hidden = F.linear(x, down.to(x.dtype)) * weights[:, None, :]
        return layer.base_layer(x) + F.linear(hidden, up.to(x.dtype))

    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    results = []
    for compute in (lambda: layer(x), reference):
        x.grad = logits.grad = layer.lora_A.grad = layer.lora_B.grad = None
        routing.weights = logits.softmax(-1)
        with context:
            out = compute()
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach().float(), x.grad, logits.grad, layer.lora_A.grad, layer.lora_B.grad])
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    for ours, theirs in zip(*results):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, **tolerance)
    assert layer.past_down.grad is None and not layer.past_down.requires_grad


@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_frozen_down_projection_still_trains_the_up_projection(x_needs_grad):
    """InfLoRA freezes the current block's A: B must get the gradient plain autograd gives through the
    concatenated matrices (float64: equal to rounding), A none."""
    torch.manual_seed(2)
    layer, routing = stacked_layer(3, 16, 24)
    layer.double()
    layer.lora_A.requires_grad_(False)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=x_needs_grad)
    routing.weights = torch.ones(3, 3, dtype=torch.float64)
    lora_B = layer.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(x_needs_grad)
    down = torch.cat([layer.past_down, layer.lora_A])
    hidden = F.linear(x_ref, down) * layer.scaling
    reference = layer.base_layer(x_ref) + F.linear(hidden, torch.cat([layer.past_up, lora_B], dim=1))
    out = layer(x)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
    (out * probe).sum().backward()
    (reference * probe).sum().backward()
    assert layer.lora_A.grad is None and layer.past_down.grad is None
    torch.testing.assert_close(layer.lora_B.grad, lora_B.grad, rtol=1e-12, atol=1e-12)
    assert layer.lora_B.grad.abs().sum() > 0
    if x_needs_grad:
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
