"""Fuzzing the readers of user-supplied files: whatever the bytes, the outcome is a result or the
module's clean error class (DataError for benchmark files, CheckpointError for checkpoints), never
another exception. Bounded: every property runs a fixed, small number of examples."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import BACKBONES, make_sapt
from sapt.tools import interop
from sapt.checkpoint import CheckpointError, load_checkpoint, load_routing_mean, save_routing_mean, save_task_artifacts
from sapt.training.data import DataError, load_pseudo_split, load_split, read_split_file

# Fixed examples in CI (derandomized, so a run is reproducible); SAPT_FUZZ_EXAMPLES=N runs N random ones each.
CAMPAIGN = int(os.environ.get("SAPT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=CAMPAIGN or 60, derandomize=not CAMPAIGN, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FAST = settings(FUZZ, max_examples=CAMPAIGN or 120)

# ---- benchmark files ------------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
odd_text = st.sampled_from(["", " ", "ok", "\ud800", "a\udfffb", "\x00", "é", "𝄞"])  # incl. lone surrogates
field_values = odd_text | json_scalars | st.lists(odd_text | json_scalars, max_size=3) | json_values
instances = st.one_of(
    st.fixed_dictionaries({}, optional={"input": field_values, "output": field_values, "id": field_values}),
    st.fixed_dictionaries({"input": odd_text, "output": odd_text | st.lists(odd_text, max_size=3)}),
    json_values,
)
near_schema = st.fixed_dictionaries(
    {},
    optional={
        "Definition": field_values,
        "Instances": st.lists(instances, max_size=5) | json_values,
        "Positive Examples": json_values,
    },
)


def check_split(content: bytes, require_outputs: bool = True) -> None:
    """load_split on one file with these bytes: a dataset or a DataError naming the file."""
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "SuperNI" / "task1_x" / "train.json"
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
        try:
            if require_outputs:
                data = load_split(root, "task1_x", "train", seed=1)
            else:
                data = load_pseudo_split(root, "task1_x", seed=1)
        except DataError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            return
        assert len(data) >= 1 and all(isinstance(s, str) for s in data["source"])


def dump(value) -> bytes:
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


@FAST
@given(st.binary(max_size=300))
def test_random_bytes(content):
    check_split(content)


@FAST
@given(json_values)
def test_random_json_values(value):
    check_split(dump(value))


@FAST
@given(near_schema, st.booleans())
def test_structures_near_the_schema(value, require_outputs):
    check_split(dump(value), require_outputs)


VALID = dump(
    {"Definition": ["Say it."], "Instances": [{"input": f"q{i}", "output": ["a", "b"] if i % 2 else "c"} for i in range(4)]}
)


@FAST
@given(st.integers(0, len(VALID)), st.binary(max_size=8))
def test_truncated_and_extended_files(cut, tail):
    check_split(VALID[:cut] + (tail if cut < len(VALID) else b""))


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 100_000,  # deeper than the parser's recursion limit
        b'{"Instances": [{"input": "a", "output": ' + b"1" * 5000 + b"}]}",  # integer too long to convert
        "\ufeff".encode() + VALID,  # a byte-order mark
        b'{"Instances": [{"input": "\\ud800", "output": "x"}]}',  # a lone surrogate
        b'{"Definition": "\\udc00", "Instances": [{"input": "a", "output": "x"}]}',
        b'{"Instances": [{"input": "a", "output": NaN}]}',
        b"",
    ],
    ids=["deep", "long-int", "bom", "surrogate-input", "surrogate-definition", "nan", "empty"],
)
def test_known_nasty_files(content):
    check_split(content)


def test_split_path_is_a_folder(tmp_path):
    (tmp_path / "train.json").mkdir()
    with pytest.raises(DataError, match="found a folder"):
        read_split_file(tmp_path / "train.json")


# ---- official-format checkpoint folders ----------------------------------------------------------
FILES = ("lora_weights_A.pt", "lora_weights_B.pt", "trans_input.pt", "prompts_keys_till_now.pt", "attention_weights.pkl")
PT_FILES = FILES[:4]


def official_key(module: str) -> str:
    parent, _, proj = module.rpartition(".")
    return f"{parent}.lora_{proj[0]}"


# Built once: hundreds of fuzzed imports each wrap a fresh copy instead of building or reading a backbone.
BACKBONE = BACKBONES["t5"](seed=0)


def fresh_backbone():
    return copy.deepcopy(BACKBONE)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A tiny T5 backbone and one valid official saved_weights folder (task 1); while the module's tests
    run, the importer takes a copy of the built backbone instead of reading it from disk each time."""
    root = tmp_path_factory.mktemp("official")
    backbone = fresh_backbone()
    backbone.save_pretrained(root / "backbone")
    d = backbone.get_input_embeddings().embedding_dim
    gen = torch.Generator().manual_seed(0)
    linears = [(n, m) for n, m in backbone.named_modules() if n.rsplit(".", 1)[-1] in ("q", "v")]
    folder = root / "1-taskA" / "saved_weights"
    folder.mkdir(parents=True)
    torch.save({f"{official_key(n)}.lora_A": torch.randn(2, m.in_features, generator=gen) for n, m in linears},
               folder / "lora_weights_A.pt")
    torch.save({f"{official_key(n)}.lora_B": torch.randn(m.out_features, 2, generator=gen) for n, m in linears},
               folder / "lora_weights_B.pt")
    torch.save({"0.weight": torch.randn(100, d), "1.weight": torch.randn(d, 100), "3.weight": torch.ones(d),
                "3.bias": torch.zeros(d)}, folder / "trans_input.pt")
    torch.save(torch.rand(1, d) * 2 - 1, folder / "prompts_keys_till_now.pt")
    (folder / "attention_weights.pkl").write_bytes(pickle.dumps(np.array([1.0])))
    interop.import_official("t5", root / "backbone", [folder], root / "sanity")  # the unmodified folder imports
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interop, "load_backbone", lambda path: fresh_backbone())
        yield root / "backbone", folder


def check_import(official, mutate) -> None:
    """Copy the valid folder, damage it, import it: success or a one-line CheckpointError, no output."""
    backbone, folder = official
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "1-taskA" / "saved_weights"
        shutil.copytree(folder, source)
        mutate(source)
        out = Path(tmp) / "out"
        try:
            interop.import_official("t5", backbone, [source], out)
        except CheckpointError as err:
            assert "\n" not in str(err)
            assert not out.exists()
            return
        model = load_checkpoint(out, backbone=fresh_backbone())
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[5, 6, 7]]), decoder_input_ids=torch.tensor([[0, 5]])).logits
        assert torch.isfinite(logits).all()


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool,
          torch.complex64]


@st.composite
def tensors(draw, shape=None):
    shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 32, 100]), max_size=3)) if shape is None else shape
    dtype = draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from([0.0, 0.5, -1.0, math.nan, math.inf]))
    if dtype.is_floating_point or dtype.is_complex:
        tensor = torch.full(shape, fill, dtype=dtype)
    else:
        tensor = torch.ones(shape, dtype=dtype)
    layout = draw(st.sampled_from(["plain", "plain", "sparse", "view", "grad"]))
    if layout == "sparse" and tensor.dim() >= 1 and dtype != torch.bool:
        tensor = tensor.to_sparse()
    elif layout == "view" and tensor.dim() == 2:
        tensor = tensor.t()  # non-contiguous
    elif layout == "grad" and dtype.is_floating_point:
        tensor = tensor.requires_grad_()
    return tensor


plain_objects = st.recursive(
    json_scalars | tensors(),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    | st.dictionaries(st.integers(), inner, max_size=2),
    max_leaves=6,
)


@st.composite
def replaced_entry(draw, folder_file):
    """The real dict of a .pt file with one entry removed, renamed, or swapped for another tensor/object."""
    key_index = draw(st.integers(0, 1000))
    action = draw(st.sampled_from(["same_shape", "same_shape", "shape", "object", "drop", "rename", "extra"]))
    value = draw(tensors()) if action in ("shape", "extra") else draw(plain_objects)
    same_shape = draw(st.data())
    new_name = draw(st.sampled_from(["x", "0.weight", "encoder.block.0.layer.0.SelfAttention.lora_q.lora_B",
                                     "previous_lora_weights.0.x", "model.layers.0.self_attn.lora_v.lora_A"]))

    def mutate(source):
        path = source / folder_file
        data = torch.load(path, weights_only=True)
        if isinstance(data, torch.Tensor):
            if action == "same_shape":
                data = same_shape.draw(tensors(shape=list(data.shape)))
            else:
                data = value if action != "drop" else data[:0]
        else:
            keys = sorted(data)
            key = keys[key_index % len(keys)]
            if action == "same_shape":
                data[key] = same_shape.draw(tensors(shape=list(data[key].shape)))
            elif action == "drop":
                del data[key]
            elif action == "rename":
                data[new_name] = data.pop(key)
            elif action == "extra":
                data[new_name] = value
            else:
                data[key] = value
        torch.save(data, path)

    return mutate


@FUZZ
@given(st.data())
def test_garbled_bytes(official, data):
    name = data.draw(st.sampled_from(FILES))
    how = data.draw(st.sampled_from(["random", "truncate", "flip", "delete", "empty"]))
    size = (official[1] / name).stat().st_size
    if how == "random":
        content = data.draw(st.binary(max_size=512))
    elif how == "truncate":
        cut = data.draw(st.integers(0, size - 1))
    elif how == "flip":
        flips = data.draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), min_size=1, max_size=8))

    def mutate(source):
        path = source / name
        if how == "random":
            path.write_bytes(content)
        elif how == "truncate":
            path.write_bytes(path.read_bytes()[:cut])
        elif how == "flip":
            raw = bytearray(path.read_bytes())
            for at, value in flips:
                raw[at] = value
            path.write_bytes(bytes(raw))
        elif how == "delete":
            path.unlink()
        else:
            path.write_bytes(b"")

    check_import(official, mutate)


@FUZZ
@given(st.data())
def test_wrong_objects_in_pt_files(official, data):
    name = data.draw(st.sampled_from(PT_FILES))
    if data.draw(st.booleans()):
        mutate = data.draw(replaced_entry(name))
    else:
        obj = data.draw(plain_objects)

        def mutate(source):
            torch.save(obj, source / name)

    check_import(official, mutate)


GLOBALS = [("builtins", "len"), ("os", "getcwd"), ("torch", "ones"), ("numpy", "ones"), ("collections", "OrderedDict"),
           ("torch._utils", "_rebuild_tensor_v2"), ("numpy", "dtype"), ("numpy._core.multiarray", "_reconstruct")]


@st.composite
def garbage_pickles(draw) -> bytes:
    """Pickles of plain objects, numpy arrays of any dtype/shape, and hand-made opcode streams naming globals."""
    kind = draw(st.sampled_from(["plain", "array", "global"]))
    protocol = draw(st.integers(0, pickle.HIGHEST_PROTOCOL))
    if kind == "plain":
        return pickle.dumps(draw(json_values), protocol=protocol)
    if kind == "array":
        dtype = draw(st.sampled_from(["f8", "f4", "f2", "i4", "u1", "?", "c8", "U3", "O", "V4"]))
        shape = draw(st.lists(st.integers(0, 3), max_size=2))
        array = np.zeros(shape, dtype=dtype)
        if dtype[0] in "fiu" and array.size:
            values = [1, 0.5, -1, np.nan, np.inf] if dtype[0] == "f" else [0, 1, 2]
            array.flat[0] = draw(st.sampled_from(values))
        return pickle.dumps(array, protocol=protocol)
    module, name = draw(st.sampled_from(GLOBALS))
    args = draw(st.sampled_from([b"(t", b"(I1\nt", b"(S'x'\nt", b"(]t"]))
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n" + args + b"R."


@FUZZ
@given(st.sampled_from(FILES), garbage_pickles())
def test_garbage_pickles(official, name, content):
    def mutate(source):
        (source / name).write_bytes(content)

    check_import(official, mutate)


# ---- this project's own task folders --------------------------------------------------------------
@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task") / "1-task1"
    model = make_sapt("t5", 1)
    save_task_artifacts(model, folder, [])
    save_routing_mean(folder, ["task1"], [1.0])
    load_checkpoint(folder, backbone=fresh_backbone())  # sanity: the unmodified folder loads
    return folder


@FUZZ
@given(st.sampled_from(["lineage.json", "sapt_config.json", "routing_mean.json", "block.safetensors",
                        "router.safetensors"]),
       st.one_of(json_values.map(dump), near_schema.map(dump), st.binary(max_size=200)))
def test_damaged_task_folder(task_folder, name, content):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "1-task1"
        shutil.copytree(task_folder, folder)
        (folder / name).write_bytes(content)
        try:
            load_checkpoint(folder, backbone=fresh_backbone())
            weights = load_routing_mean(folder)
        except CheckpointError as err:
            assert "\n" not in str(err)
            return
        assert weights and abs(sum(weights) - 1) < 1e-3
        assume(False)  # a file that still loads tells nothing more
