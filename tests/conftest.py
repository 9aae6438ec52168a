"""Shared fixtures: tiny backbones built from a config (random weights, no tokenizer, no download)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
IN_CI = os.environ.get("CI", "").lower() == "true"
# SAPT_TESTS_SYNTHETIC=1 runs the integration tests on the synthetic benchmark even beside the release.
RELEASE_FOUND = (SHARED / "CL_Benchmark").is_dir() and os.environ.get("SAPT_TESTS_SYNTHETIC") != "1"
VOCAB = 96


def _data_root() -> Path:
    """The released benchmark beside the repo, else the seeded synthetic one (same format), so the
    integration tests run on a machine that has only the repo."""
    if RELEASE_FOUND:
        return SHARED
    from sapt.tools.synthetic import write_synthetic_benchmark

    root = REPO_ROOT / ".cache" / "synthetic_benchmark"
    write_synthetic_benchmark(root)  # leaves identical files untouched: cheap, safe to repeat
    return root


DATA_ROOT = _data_root()
BENCHMARK = DATA_ROOT / "CL_Benchmark"
GENERATED = DATA_ROOT / "generated_data"
if RELEASE_FOUND:  # two tasks of each benchmark that the integration tests train in order
    SUPERNI_TASKS = ["task363_sst2_polarity_classification", "task875_emotion_classification"]
    LONG_TASKS = ["sst2", "agnews"]
else:
    from sapt.tools.synthetic import SYNTHETIC_ORDERS

    SUPERNI_TASKS = SYNTHETIC_ORDERS["SuperNI"][:2]
    LONG_TASKS = SYNTHETIC_ORDERS["Long_Sequence"][:2]


def make_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(config).eval()


def make_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=3, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


BACKBONES = {"t5": make_t5, "llama": make_llama}


@pytest.fixture(params=sorted(BACKBONES))
def family(request) -> str:
    return request.param


def requires_release():
    """For tests of the released files themselves (not of code that merely reads a benchmark): skipped
    on a machine without them, but a failure under CI=true, where ../shared must be beside the repo."""
    if IN_CI and not RELEASE_FOUND:
        return pytest.mark.usefixtures("_fail_without_release")
    return pytest.mark.skipif(not RELEASE_FOUND, reason=f"released benchmark not found at {SHARED}")


@pytest.fixture
def _fail_without_release():
    pytest.fail(f"CI=true but the released benchmark is not at {SHARED / 'CL_Benchmark'}")


def make_sapt(family: str, num_tasks: int, seed: int = 0, **overrides):
    """A SaptModel with `num_tasks` blocks: the older ones frozen, the newest trainable; every B is
    random (not the zero init) so each block changes the output."""
    from sapt.config import SaptConfig
    from sapt.model import SaptModel

    backbone = BACKBONES[family](seed)
    config = SaptConfig.for_backbone(backbone, f"tiny-{family}", r=overrides.pop("r", 4), alpha=8, **overrides)
    model = SaptModel(backbone, config)
    generator = torch.Generator().manual_seed(seed + 1)
    for task in range(num_tasks):
        if task:
            model.freeze_current_task()
        model.add_task(f"task{task + 1}")
        for _, layer in model.sapt_layers():
            layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=generator) * 0.5
    return model


def stacked_layer(num_tasks: int, d_in: int, d_out: int, alpha: float = 8, r: int = 4):
    """A SaptLinear with `num_tasks` blocks (older ones frozen, the newest trainable), every B drawn
    from the global generator; returns (layer, its RoutingState)."""
    from torch import nn

    from sapt.layer import RoutingState, SaptLinear

    routing = RoutingState()
    layer = SaptLinear(nn.Linear(d_in, d_out), r=r, alpha=alpha, dropout=0.0, routing=routing)
    for _ in range(num_tasks):
        layer.freeze_block()
        layer.add_block()
        nn.init.normal_(layer.lora_B)
    return layer, routing


def sample_batch(family: str, batch: int = 3, length: int = 7, seed: int = 0):
    """Random token ids (ids >= 4 avoid the special tokens) with labels."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if family == "t5":
        labels = torch.randint(4, VOCAB, (batch, 5), generator=generator)
    else:
        labels = input_ids.clone()
        labels[:, : length // 2] = -100  # first half is the prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def write_task_files(data_dir: Path, benchmark: str, tasks, splits=("train", "dev", "test")) -> None:
    """One-instance split files of `tasks` under data_dir/benchmark: enough for the generators' checks,
    not for training."""
    for task in tasks:
        folder = data_dir / benchmark / task
        folder.mkdir(parents=True, exist_ok=True)
        for split in splits:
            instance = {"input": f"an input of {task}", "output": "" if split == "pseudo" else "yes"}
            name = "train" if split == "pseudo" else split  # pseudo samples sit where train would
            (folder / f"{name}.json").write_text(json.dumps({"Definition": [f"Do {task}."], "Instances": [instance]}))


def write_model_folder(folder: Path, model_type: str = "t5") -> Path:
    """A stand-in backbone folder (a config and a tokenizer file) for pipelines that are written, not run."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture(scope="session")
def paper_inputs(tmp_path_factory) -> list[str]:
    """Generator flags (--data_dir, --gen_data_root, --model_name_or_path) for writing, not running, the paper's
    pipelines: split files of every task of every order, pseudo samples for every preset, a stand-in model."""
    from sapt.experiments.pipeline import PACKAGE_CONFIGS

    root = tmp_path_factory.mktemp("paper_inputs")
    orders = json.loads((PACKAGE_CONFIGS / "orders.json").read_text())
    presets = json.loads((PACKAGE_CONFIGS / "presets.json").read_text())
    for benchmark, by_number in orders.items():
        if benchmark.startswith("_"):
            continue
        tasks = sorted({task for order in by_number.values() for task in order})
        write_task_files(root / "CL_Benchmark", benchmark, tasks)
        for preset in presets.values():
            if isinstance(preset, dict) and preset.get("benchmark") == benchmark:
                write_task_files(root / "generated_data" / preset["gen_data"], benchmark, tasks, splits=("pseudo",))
    model = write_model_folder(root / "model")
    return ["--data_dir", str(root / "CL_Benchmark"), "--gen_data_root", str(root / "generated_data"),
            "--model_name_or_path", str(model)]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny T5 and LLaMA folders in HF format, tokenizers trained on the benchmark text."""
    from sapt.tools.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / family, data_dir=BENCHMARK, d_model=32) for family in ("t5", "llama")}
