"""SaptModel on decoder families other than LLaMA: tiny random Qwen2 and Mistral (grouped-query
attention, so v_proj maps 32 -> 16), and a family without q_proj/v_proj (GPT-2)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import VOCAB
from sapt.checkpoint import load_checkpoint, load_routing_mean, save_routing_mean, save_task_artifacts
from sapt.config import SaptConfig
from sapt.layer import SaptLinear
from sapt.model import SaptModel

LAYERS = 2
PAD, BOS, EOS = 3, 1, 2
# hidden 32 over 4 heads of 8; 2 KV heads: k_proj and v_proj map 32 -> 16.
SIZES = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=2, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, max_position_embeddings=256,
)
FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def make_backbone(family: str, seed: int = 0):
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(seed)
    return model_class(config_class(**SIZES)).eval()


@pytest.fixture(params=sorted(FAMILIES))
def decoder(request) -> str:
    return request.param


def batch(length: int = 8, rows: int = 3, seed: int = 0) -> dict:
    """Random ids >= 4 (no special tokens); the first half of every row is the prompt (label -100)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def randomize_current_block(model: SaptModel, generator: torch.Generator) -> None:
    """A random B (not the zero init), so the block changes the output (as conftest.make_sapt)."""
    for _, layer in model.sapt_layers():
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=generator) * 0.5


def make_family_sapt(family: str, seed: int = 0, backbone_dir=None, outputs=None) -> SaptModel:
    """Two tasks learned in sequence: task1's block frozen, task2's trainable. With `backbone_dir`, the
    backbone is first saved there as an HF folder (and recorded as the base model); with `outputs`,
    task1's artifacts are written to outputs/1-task1 as sapt.train_task writes them."""
    backbone = make_backbone(family, seed)
    name = f"tiny-{family}"
    if backbone_dir is not None:
        backbone.save_pretrained(backbone_dir)
        name = str(backbone_dir)
    model = SaptModel(backbone, SaptConfig.for_backbone(backbone, name, r=4, alpha=8))
    generator = torch.Generator().manual_seed(seed + 1)
    model.add_task("task1", seed=seed)
    randomize_current_block(model, generator)
    model.freeze_current_task()
    if outputs is not None:
        save_task(model, outputs / "1-task1", [])
    model.add_task("task2", seed=seed)
    randomize_current_block(model, generator)
    return model


def save_task(model: SaptModel, task_dir, earlier_dirs: list) -> None:
    """What sapt.train_task.run writes after a task (the model already frozen): the artifacts, with the
    earlier blocks' folders relative to this one, then the mean routing weights on some inputs."""
    earlier = [os.path.relpath(d.resolve(), task_dir.resolve()) for d in earlier_dirs]
    save_task_artifacts(model, task_dir, earlier)
    prompts = batch(seed=7)
    with torch.no_grad():
        mean = model.routing_weights(prompts["input_ids"], prompts["attention_mask"]).mean(0)
    save_routing_mean(task_dir, model.tasks, mean.tolist())


def train_step(model: SaptModel, inputs: dict) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2, weight_decay=0.0)
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def snapshot(model: SaptModel) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


# ---- 1. wrapping --------------------------------------------------------------------------------
def test_wraps_q_and_v_of_every_layer_and_freezes_the_backbone(decoder):
    model = make_family_sapt(decoder)
    layers = dict(model.sapt_layers())
    assert list(layers) == [f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj")]
    assert sum(isinstance(m, SaptLinear) for m in model.modules()) == 2 * LAYERS
    for i in range(LAYERS):
        q, v = layers[f"model.layers.{i}.self_attn.q_proj"], layers[f"model.layers.{i}.self_attn.v_proj"]
        assert (q.in_features, q.out_features) == (32, 32)
        assert (v.in_features, v.out_features) == (32, 16)  # grouped-query attention: d_out != d_in
        assert v.lora_A.shape == (4, 32) and v.lora_B.shape == (16, 4) and v.past_up.shape == (16, 4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or n.startswith("router.") for n in trainable)
    assert not any(p.requires_grad for n, p in model.base_model.named_parameters() if ".lora_" not in n)


# ---- 2. forward -----------------------------------------------------------------------------------
def test_blocks_change_the_logits_and_routing_is_a_distribution(decoder):
    model = make_family_sapt(decoder).eval()
    bare = make_backbone(decoder)  # the same random weights, unwrapped
    inputs = batch()
    with torch.no_grad():
        logits = model(**inputs).logits
        reference = bare(**inputs).logits
    assert logits.shape == reference.shape == (3, 8, VOCAB)
    assert not torch.allclose(logits, reference, atol=1e-3)
    weights = model.routing.weights
    assert weights.shape == (3, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    # With every B zero the wrapper adds nothing: the backbone's own logits, bit for bit.
    for _, layer in model.sapt_layers():
        layer.past_up.zero_()
        layer.lora_B.data.zero_()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


# ---- 3. generation ----------------------------------------------------------------------------
def test_beam_search_on_a_left_padded_batch_matches_each_prompt_alone(decoder):
    model = make_family_sapt(decoder).eval()
    prompts = [[5, 9, 17, 33], [6, 7, 8, 40, 50, 60, 70]]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    # min_new_tokens keeps EOS out, so every row has exactly 4 new tokens.
    settings = dict(max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False)
    together = model.generate(input_ids=ids, attention_mask=mask, **settings)
    routed_together = model.routing.weights  # set once per generate, from the prompts
    assert together.shape == (2, width + 4)
    continuations = []
    for row, prompt in enumerate(prompts):
        alone_ids = torch.tensor([prompt])
        alone = model.generate(input_ids=alone_ids, attention_mask=torch.ones_like(alone_ids), **settings)
        assert alone.shape == (1, len(prompt) + 4)
        assert together[row, width:].tolist() == alone[0, len(prompt):].tolist()
        # The padding does not enter the routing either.
        torch.testing.assert_close(routed_together[row], model.routing.weights[0])
        continuations.append(alone[0, len(prompt):].tolist())
    assert continuations[0] != continuations[1]  # a swap of rows would be seen


# ---- 4. training --------------------------------------------------------------------------------
def test_one_step_changes_only_the_current_block_key_and_query_network(decoder):
    model = make_family_sapt(decoder)
    before = snapshot(model)
    train_step(model, batch())
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    current = {f"base_model.{n}.lora_{m}" for n, _ in model.sapt_layers() for m in "AB"}
    query_net = {n for n in before if n.startswith("router.query_net.")}
    assert len(current) == 4 * LAYERS and len(query_net) == 4  # 2 linears + LayerNorm weight, bias
    assert changed == current | query_net | {"router.key"}
    # What stayed: the frozen block, the frozen key, every backbone weight.
    frozen = {n for n in before if "past_" in n}
    assert len(frozen) == 2 * 2 * LAYERS + 1 and "router.past_keys" in frozen
    assert any(n.startswith("base_model.") and ".lora_" not in n and "past_" not in n for n in before)


# ---- 5. artifacts -------------------------------------------------------------------------------
def test_saved_artifacts_restore_identical_logits(decoder, tmp_path, monkeypatch):
    monkeypatch.delenv("SAPT_BASE_MODEL", raising=False)
    outputs = tmp_path / "outputs"
    model = make_family_sapt(decoder, backbone_dir=tmp_path / "backbone", outputs=outputs)
    inputs = batch(seed=3)
    with torch.no_grad():
        untrained = model(**inputs).logits
    train_step(model, batch())
    model.freeze_current_task()
    save_task(model, outputs / "2-task2", [outputs / "1-task1"])
    with torch.no_grad():
        expected = model(**inputs).logits
    assert not torch.equal(expected, untrained)  # the step matters, so a stale save would be seen

    restored = load_checkpoint(outputs)  # the latest task folder; the backbone from its recorded path
    assert restored.tasks == ["task1", "task2"] and restored.num_blocks == 2
    assert type(restored.base_model) is FAMILIES[decoder][1] and not restored.training
    with torch.no_grad():
        assert torch.equal(restored(**inputs).logits, expected)
    mean = load_routing_mean(outputs / "2-task2")
    assert len(mean) == 2 and abs(sum(mean) - 1) < 1e-6


# ---- 6. a family without q_proj/v_proj ----------------------------------------------------------
def make_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=BOS, eos_token_id=EOS)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("target_modules", [[], ["c_attn"]], ids=["default", "c_attn"])
def test_family_without_targets_is_a_one_line_error(target_modules):
    backbone = make_gpt2()  # attention is one fused Conv1D, c_attn: no nn.Linear q_proj/v_proj
    config = SaptConfig.for_backbone(backbone, "tiny-gpt2", target_modules=target_modules)
    names = target_modules or ["q_proj", "v_proj"]
    assert config.target_modules == names
    with pytest.raises(ValueError) as error:
        SaptModel(backbone, config)
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in names) and "GPT2LMHeadModel" in message
    assert error.traceback[-1].path.name == "model.py"  # raised by SaptModel itself
