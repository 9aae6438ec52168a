"""The tiny-model builder: stock Auto classes load its output offline, and building is reproducible,
idempotent and atomic. Runs on the built-in corpus when the shared benchmark is absent."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from sapt.tools import tiny
from sapt.tools.tiny import SETTINGS_FILE, build_tiny_model

AUTO_MODEL = {"t5": AutoModelForSeq2SeqLM, "llama": AutoModelForCausalLM}
SPECIAL_IDS = {
    "t5": {"pad_token_id": 0, "eos_token_id": 1, "unk_token_id": 2},
    "llama": {"unk_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
}
TEXT = 'Definition: Classify the review\'s sentiment (positive/negative).\nInput: "Great film!" -- 10/10, 100%.'


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Both families built once with default settings (benchmark text if present, else built-in)."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / family) for family in tiny.FAMILIES}


def _load(family: str, path: Path):
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AUTO_MODEL[family].from_pretrained(path, local_files_only=True).eval()
    return tokenizer, model


def _small(family: str, out: Path, **kwargs) -> Path:
    """A quick build on the built-in corpus, for tests about the build itself rather than the benchmark."""
    kwargs.setdefault("data_dir", out.parent / "no-benchmark-here")
    return build_tiny_model(family, out, vocab_size=400, d_model=32, num_layers=1, **kwargs)


def test_layout_and_settings(built, family):
    out = built[family]
    names = {p.name for p in out.iterdir()}
    assert set(tiny.REQUIRED_FILES) | {SETTINGS_FILE} <= names
    record = json.loads((out / SETTINGS_FILE).read_text())
    assert record["settings"]["family"] == family
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_reload_with_auto_classes(built, family):
    tokenizer, model = _load(family, built[family])
    assert model.config.model_type == family
    assert model.config.vocab_size == len(tokenizer)
    # The reloaded tokenizer is the trained BPE, not a T5/LLaMA tokenizer picked from the model type.
    trained = Tokenizer.from_file(str(built[family] / "tokenizer.json"))
    assert tokenizer.get_vocab() == trained.get_vocab()
    assert tokenizer(TEXT)["input_ids"] == trained.encode(TEXT).ids


def test_special_token_ids(built, family):
    tokenizer, model = _load(family, built[family])
    for name, expected in SPECIAL_IDS[family].items():
        assert getattr(tokenizer, name) == expected, name
        if name != "unk_token_id":
            assert getattr(model.config, name) == expected, name
            assert getattr(model.generation_config, name) == expected, name
    if family == "t5":
        assert model.generation_config.decoder_start_token_id == 0
    assert tokenizer.padding_side == ("left" if family == "llama" else "right")


def test_tokenizer_round_trip_and_framing(built, family):
    tokenizer, _ = _load(family, built[family])
    ids = tokenizer(TEXT)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    if family == "t5":
        assert ids[-1] == tokenizer.eos_token_id and ids[0] != tokenizer.eos_token_id
    else:
        assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id
    unicode_text = "naïve café — 東京\ttab"
    assert tokenizer.decode(tokenizer(unicode_text)["input_ids"], skip_special_tokens=True) == unicode_text


def test_forward_loss_and_generate(built, family, caplog):
    tokenizer, model = _load(family, built[family])
    batch = tokenizer([TEXT, "Output: positive"], return_tensors="pt", padding=True)
    if family == "t5":
        labels = tokenizer(["positive", "negative sentiment"], return_tensors="pt", padding=True)["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
    else:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss
    assert math.isfinite(loss.item())

    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    finally:
        transformers.logging.disable_propagation()
    assert out.shape[0] == 2 and out.shape[1] >= (1 if family == "t5" else batch["input_ids"].shape[1])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_same_seed_same_weights(tmp_path, family):
    a = load_file(_small(family, tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(_small(family, tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(_small(family, tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    tokenizers = [(tmp_path / d / "tokenizer.json").read_text() for d in "abc"]
    assert tokenizers[0] == tokenizers[1] == tokenizers[2]


def test_second_call_is_a_noop(tmp_path, monkeypatch):
    out = _small("llama", tmp_path / "m")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def must_not_build(*args, **kwargs):
        raise AssertionError("a complete build with the same settings was built again")

    # The expensive steps are never reached (rather than timing the call, which a loaded machine slows).
    for step in ("train_tokenizer", "build_model", "pretrain"):
        monkeypatch.setattr(tiny, step, must_not_build)
    assert _small("llama", tmp_path / "m") == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder either
    with pytest.raises(AssertionError, match="built again"):  # the guard is live: other settings rebuild
        _small("llama", tmp_path / "m", seed=1)


def test_changed_settings_rebuild(tmp_path):
    out = _small("llama", tmp_path / "m", seed=0)
    before = load_file(out / "model.safetensors")
    _small("llama", out, seed=1)
    after = load_file(out / "model.safetensors")
    assert json.loads((out / SETTINGS_FILE).read_text())["settings"]["seed"] == 1
    assert not all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny.PreTrainedTokenizerFast, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        _small("t5", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_foreign_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        _small("t5", tmp_path / "m")
    assert (tmp_path / "m" / "notes.txt").read_text() == "keep me"


def test_builtin_corpus_fallback(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sapt.tools.tiny"):
        out = _small("t5", tmp_path / "m", data_dir=tmp_path / "missing")
    assert "built-in corpus" in caplog.text
    assert json.loads((out / SETTINGS_FILE).read_text())["settings"]["corpus"] == "builtin"
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.decode(tokenizer(TEXT)["input_ids"], skip_special_tokens=True) == TEXT


@pytest.mark.slow
def test_cli(tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "sapt", "tiny", "--family", "llama", "--out", str(out), "--data_dir",
         str(tmp_path / "missing"), "--vocab_size", "400", "--d_model", "32", "--layers", "1", "--seed", "5"],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )
    assert result.stdout.strip() == str(out.resolve())
    settings = json.loads((out / SETTINGS_FILE).read_text())["settings"]
    assert (settings["family"], settings["seed"], settings["d_model"], settings["num_layers"]) == ("llama", 5, 32, 1)
    assert AutoModelForCausalLM.from_pretrained(out, local_files_only=True).config.num_hidden_layers == 1


HELDOUT = [
    "Question: Why does the answer support a short summary of the dialogue?",
    "The team explains what happened next. Is it correct? Answer: yes.",
    "A movie asks about the relation between two entities.",
]


def test_no_pretraining_by_default(tmp_path):
    settings = json.loads((_small("t5", tmp_path / "m") / SETTINGS_FILE).read_text())["settings"]
    assert "pretraining" not in settings  # default builds keep the settings (and directories) they had


@pytest.mark.slow
def test_pretraining_lowers_heldout_loss_and_is_deterministic(tmp_path, family):
    plain = _small(family, tmp_path / "plain")
    a = _small(family, tmp_path / "a", pretrain_steps=40)
    b = _small(family, tmp_path / "b", pretrain_steps=40)
    settings = json.loads((a / SETTINGS_FILE).read_text())["settings"]
    assert settings["pretraining"]["steps"] == 40 and settings["pretraining"]["objective"] == "denoise"
    wa, wb, wp = (load_file(d / "model.safetensors") for d in (a, b, plain))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wp[k]) for k in wa)

    tokenizer, before = _load(family, plain)
    _, after = _load(family, a)
    loss_before = tiny.heldout_loss(before, tokenizer, HELDOUT, family)
    loss_after = tiny.heldout_loss(after, tokenizer, HELDOUT, family)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)


@pytest.mark.slow
def test_truncated_benchmark_file_is_a_one_line_error_and_writes_nothing(tmp_path):
    task = tmp_path / "bench" / "Long_Sequence" / "t1"
    task.mkdir(parents=True)
    (task / "train.json").write_text('{"Definition": ["x"], "Instances": [{"inp')
    done = subprocess.run(
        [sys.executable, "-m", "sapt", "tiny", "--family", "t5", "--out", str(tmp_path / "model"), "--data_dir", str(tmp_path / "bench")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sapt tiny: error: ") and str(task / "train.json") in last and "malformed JSON" in last
    assert "Traceback" not in done.stderr and not (tmp_path / "model").exists()
