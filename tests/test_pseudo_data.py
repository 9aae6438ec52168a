"""Pseudo-data generation (docs/data.md): the generator learns, only its adapter trains, the backbone stays
as it was (the release froze its LoRA and trained nothing), and the written files are the benchmark's
format, resumable and reproducible."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from conftest import BENCHMARK, REPO_ROOT, SUPERNI_TASKS

from sapt.backbone import load_backbone, load_tokenizer
from sapt.training.data import SPLITS, load_pseudo_split, read_split_file
from sapt.tools.pseudo_data import (
    INP_TOKEN,
    GeneratorSettings,
    build_generator,
    generate_for_task,
    generate_pseudo_samples,
    generator_targets,
    main,
    pseudo_count,
    pseudo_task_json,
    split_sample,
    train_generator,
)
from sapt.tools.tiny import build_tiny_model

TASK = SUPERNI_TASKS[0]
# Tiny random models need a far larger step than the release's 1e-3 to learn in ~100 steps.
FAST = dict(batch_size=8, learning_rate=1e-2, target_length=96, log_every=20, sample_batch_size=8)
# A random backbone's final norm leaves logits within about ±1 (LLaMA's output init has std 0.02), and
# nothing behind that frozen norm can sharpen them. Scaling the norm gives the logit range of a
# trained LM; the backbone stays frozen.
FINAL_NORM_SCALE = {"t5": 3.0, "llama": 20.0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and two threads on a busy 2-core box stall badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _scaled_tiny(family: str, root) -> str:
    built = build_tiny_model(family, root / family, d_model=32)
    model = load_backbone(str(built))
    tokenizer = load_tokenizer(str(built), model.config.is_encoder_decoder)
    norm = model.decoder.final_layer_norm if family == "t5" else model.model.norm
    with torch.no_grad():
        norm.weight.fill_(FINAL_NORM_SCALE[family])
    out = root / f"{family}-scaled"
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pseudo-models")
    return {family: _scaled_tiny(family, root) for family in ("t5", "llama")}


def _train_slice(n: int = 32) -> list[str]:
    definition, instances = read_split_file(BENCHMARK / "SuperNI" / TASK / "train.json")
    return generator_targets(definition, instances[:n])


def _train_and_check(path: str, steps: int) -> tuple:
    settings = GeneratorSettings(steps=steps, **FAST)
    torch.manual_seed(0)
    backbone = load_backbone(path)
    tokenizer = load_tokenizer(path, backbone.config.is_encoder_decoder)
    model = build_generator(backbone, tokenizer, settings)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    losses = train_generator(model, tokenizer, _train_slice(), settings)

    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    assert last < math.log(len(tokenizer)), "no better than a uniform guess"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert "lora_A" in name or "lora_B" in name or "trainable_tokens_delta" in name, name
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
            assert torch.equal(param, frozen_before[name]), f"backbone weight {name} changed"
    logging.getLogger(__name__).info("loss: first 10 %.3f, last 10 %.3f", first, last)
    return model, tokenizer, settings, trainable, (first, last)


@pytest.mark.slow
def test_t5_generator_learns_and_only_the_adapter_trains(tiny_dirs):
    model, tokenizer, settings, trainable, (first, last) = _train_and_check(tiny_dirs["t5"], steps=120)
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(".q." in n or ".v." in n for n in lora)
    # 2 encoder self-attentions + 2 decoder layers x (self, cross) = 6 modules; A and B on q and v.
    assert len(lora) == 6 * 2 * 2
    assert [n for n in trainable if "trainable_tokens_delta" in n]  # tied: one delta serves both ends

    # A T5 this small rarely reaches `__inp__` after 120 steps (the LLaMA test below writes files);
    # here: sampling stops at its bound and keeps only well-formed pairs.
    pairs = generate_pseudo_samples(model, tokenizer, 2, settings)
    assert len(pairs) <= 2 and all(text and INP_TOKEN not in text and INP_TOKEN not in d for d, text in pairs)


def test_llama_generator_learns_with_trainable_output_rows(tiny_dirs):
    _, _, _, trainable, _ = _train_and_check(tiny_dirs["llama"], steps=60)
    deltas = sorted(n for n in trainable if "trainable_tokens_delta" in n)
    assert len(deltas) == 2 and any("lm_head" in n for n in deltas) and any("embed_tokens" in n for n in deltas)
    assert all(".q_proj." in n or ".v_proj." in n for n in trainable if "lora_" in n)


@pytest.mark.slow
def test_generate_for_task_writes_resumes_and_is_seeded(tiny_dirs, tmp_path):
    settings = GeneratorSettings(steps=40, seed=7, **FAST)
    runs = []
    for out in (tmp_path / "a", tmp_path / "b"):
        folder = generate_for_task(tiny_dirs["llama"], BENCHMARK, TASK, out, settings, max_train_samples=100)
        assert folder == out / "SuperNI" / TASK
        runs.append({split: (folder / f"{split}.json").read_bytes() for split in SPLITS})
    assert runs[0] == runs[1], "same seed, different output"
    assert runs[0]["train"] == runs[0]["dev"] == runs[0]["test"]

    data = json.loads(runs[0]["train"])
    assert data["Positive Examples"] == data["Negative Examples"] == []
    assert len(data["Definition"]) == 1 and isinstance(data["Definition"][0], str)
    assert all(inst["output"] == "" and inst["input"].strip() for inst in data["Instances"])
    pseudo = load_pseudo_split(tmp_path / "a", TASK)
    assert len(pseudo) == pseudo_count(100) == 2
    assert all(source.startswith("Definition: ") for source in pseudo["source"])

    stamps = {split: (tmp_path / "a" / "SuperNI" / TASK / f"{split}.json").stat().st_mtime_ns for split in SPLITS}
    assert generate_for_task(tiny_dirs["llama"], BENCHMARK, TASK, tmp_path / "a", settings) is None
    assert stamps == {s: (tmp_path / "a" / "SuperNI" / TASK / f"{s}.json").stat().st_mtime_ns for s in SPLITS}


def test_pseudo_count():
    assert [pseudo_count(n) for n in (1000, 14000, 250, 32, 1)] == [20, 280, 5, 1, 1]
    assert pseudo_count(1000, ratio=0.1) == 100


def test_pseudo_task_json_takes_the_most_common_definition():
    pairs = [("Rate it.", "a"), ("Say it.", "b"), ("Rate it.", "c")]
    data = pseudo_task_json("t", pairs, "Real.")
    assert data["Definition"] == ["Rate it."]
    assert data["Instances"] == [{"id": f"t-pseudo-{i}", "input": x, "output": ""} for i, x in enumerate("abc")]
    assert pseudo_task_json("t", [("", "a")], "Real.")["Definition"] == ["Real."]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Classify it.__inp__ a fine film ", ("Classify it.", "a fine film")),
        ("__inp__text", ("", "text")),
        ("Def__inp__first__inp__second", ("Def", "first")),
        ("Def__gen__ more__inp__ x__ans__", ("Def more", "x")),
        ("no marker at all", None),
        ("Def__inp__   ", None),
    ],
)
def test_split_sample(text, expected):
    assert split_sample(text) == expected


@pytest.mark.slow
def test_cli_unknown_task_is_one_line_exit_2(tmp_path):
    (tmp_path / "data" / "SuperNI").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "generate_pseudo_data.py"), "--model_name_or_path",
         str(tmp_path / "no-model"), "--data_dir", str(tmp_path / "data"), "--tasks", "task_nope",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sapt pseudo_data: error: ") and "task_nope" in lines[0]
    assert not (tmp_path / "out").exists()


def test_malformed_train_file_is_exit_2(tmp_path, capsys):
    task_dir = tmp_path / "data" / "SuperNI" / "task_bad"
    task_dir.mkdir(parents=True)
    (task_dir / "train.json").write_text("{not json")
    code = main(["--model_name_or_path", str(tmp_path / "no-model"), "--data_dir", str(tmp_path / "data"),
                 "--tasks", "task_bad", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sapt pseudo_data: error: ") and "malformed JSON" in err[0]
