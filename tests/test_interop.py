"""Importing the official release's saved_weights folders (docs/interop.md), checked against the routing of docs/methods.md computed by hand."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BACKBONES, REPO_ROOT, VOCAB
from torch import nn

from sapt.tools import interop
from sapt.checkpoint import CheckpointError, load_checkpoint
from sapt.tools.safe_pickle import UnsafePickleError, load_numpy_pickle

ALPHA = 16.0
RANK = 2  # not the config default (4): the importer must read r from the tensors
QUERY_DIM = 100
TARGETS = {"t5": ("q", "v"), "llama": ("q_proj", "v_proj")}
NAMES = ("taskA", "taskB")


class NotATensor:
    """Stands for any custom object a malicious or foreign .pt file might hold."""


class RunsCommand:
    """Unpickling this runs a shell command: the attack a pickle loader must refuse."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@dataclass
class OfficialTask:
    saved_weights: Path
    lora_A: dict[str, torch.Tensor]  # this project's module name -> (r, d_in)
    lora_B: dict[str, torch.Tensor]  # -> (d_out, r)
    query_net: dict[str, torch.Tensor]  # "0.weight", "1.weight", "3.weight", "3.bias"
    keys: torch.Tensor  # (i, d), newest first
    mean: np.ndarray  # ā_i, newest first


@dataclass
class OfficialRun:
    family: str
    backbone_dir: Path
    tasks: list[OfficialTask]

    @property
    def dirs(self) -> list[Path]:
        return [task.saved_weights for task in self.tasks]


def wrapped_linears(backbone: nn.Module, family: str) -> list[tuple[str, nn.Linear]]:
    return [
        (name, module)
        for name, module in backbone.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS[family] and isinstance(module, nn.Linear)
    ]


def official_key(module: str) -> str:
    """encoder...SelfAttention.q -> encoder...SelfAttention.lora_q; ...self_attn.v_proj -> ...self_attn.lora_v."""
    parent, _, proj = module.rpartition(".")
    return f"{parent}.lora_{proj[0]}"


def write_official_task(saved_weights: Path, task: OfficialTask, decoys: dict[str, dict[str, torch.Tensor]]) -> None:
    saved_weights.mkdir(parents=True)
    lora_A = {f"{official_key(m)}.lora_A": t for m, t in task.lora_A.items()} | decoys["A"]
    lora_B = {f"{official_key(m)}.lora_B": t for m, t in task.lora_B.items()} | decoys["B"]
    torch.save(lora_A, saved_weights / "lora_weights_A.pt")
    torch.save(lora_B, saved_weights / "lora_weights_B.pt")
    torch.save(task.query_net, saved_weights / "trans_input.pt")
    torch.save(task.keys, saved_weights / "prompts_keys_till_now.pt")
    with open(saved_weights / "attention_weights.pkl", "wb") as handle:
        pickle.dump(task.mean, handle)


@pytest.fixture
def make_run(tmp_path):
    """Write a tiny backbone and k=2 official task folders for a family; return what was written."""

    def make(family: str) -> OfficialRun:
        backbone = BACKBONES[family](seed=0)
        backbone_dir = tmp_path / "backbone"
        backbone.save_pretrained(backbone_dir)
        gen = torch.Generator().manual_seed(1)
        d = backbone.get_input_embeddings().embedding_dim
        linears = wrapped_linears(backbone, family)
        keys_oldest_first = []
        tasks = []
        for index, name in enumerate(NAMES, start=1):
            keys_oldest_first.append(torch.rand(d, generator=gen) * 2 - 1)
            task = OfficialTask(
                saved_weights=tmp_path / "run" / f"{index}-{name}" / "saved_weights",
                lora_A={m: 0.3 * torch.randn(RANK, lin.in_features, generator=gen) for m, lin in linears},
                lora_B={m: 0.3 * torch.randn(lin.out_features, RANK, generator=gen) for m, lin in linears},
                query_net={
                    "0.weight": 0.2 * torch.randn(QUERY_DIM, d, generator=gen),
                    "1.weight": 0.2 * torch.randn(d, QUERY_DIM, generator=gen),
                    "3.weight": 1 + 0.1 * torch.randn(d, generator=gen),
                    "3.bias": 0.1 * torch.randn(d, generator=gen),
                },
                keys=torch.stack(keys_oldest_first[::-1]),
                mean=np.array([1.0]) if index == 1 else np.array([0.3, 0.7]),
            )
            if index == 1:  # a decoy that would not even fit: it must be skipped, not read
                decoys = {
                    "A": {"encoder.previous_lora_weights.0.lora_A": torch.ones(3)},
                    "B": {"model.previous_lora_weights.0.lora_B": torch.ones(3)},
                }
            else:  # the release's copies of older blocks
                old = tasks[0]
                decoys = {
                    "A": {f"previous_lora_weights.0.{official_key(m)}.lora_A": t for m, t in old.lora_A.items()},
                    "B": {f"previous_lora_weights.0.{official_key(m)}.lora_B": t for m, t in old.lora_B.items()},
                }
            write_official_task(task.saved_weights, task, decoys)
            tasks.append(task)
        return OfficialRun(family, backbone_dir, tasks)

    return make


def model_inputs(family: str) -> dict[str, torch.Tensor]:
    """An unpadded batch of two rows (no pad ids, no attention mask)."""
    gen = torch.Generator().manual_seed(2)
    inputs = {"input_ids": torch.randint(4, VOCAB, (2, 7), generator=gen)}
    if family == "t5":
        inputs["decoder_input_ids"] = torch.randint(4, VOCAB, (2, 5), generator=gen)
    return inputs


def reference_routing(backbone: nn.Module, run: OfficialRun, upto: int, input_ids: torch.Tensor) -> torch.Tensor:
    """The routing (docs/methods.md) by hand from the raw official tensors of task `upto`: (B, upto), newest first."""
    task = run.tasks[upto - 1]
    qn = task.query_net
    e = backbone.get_input_embeddings()(input_ids).amax(dim=1)  # (B, d)
    h = e @ qn["0.weight"].T @ qn["1.weight"].T
    h = h * torch.sigmoid(h)  # SiLU
    mean = h.mean(dim=-1, keepdim=True)
    var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)
    q = (h - mean) / torch.sqrt(var + 1e-5) * qn["3.weight"] + qn["3.bias"]
    scores = q @ task.keys.T / math.sqrt(e.shape[-1])
    return scores.softmax(dim=-1)


@torch.no_grad()
def reference_logits(run: OfficialRun, upto: int, inputs: dict[str, torch.Tensor]):
    """Stock backbone + hooks adding sum_j a_j (alpha/r) B_j A_j x on every q/v projection.

    Returns (logits with the blocks, logits of the plain backbone, routing weights newest first)."""
    backbone = BACKBONES[run.family](seed=0)
    weights = reference_routing(backbone, run, upto, inputs["input_ids"])
    handles = []
    for name, linear in wrapped_linears(backbone, run.family):

        def add_blocks(module, args, output, name=name):
            x = args[0]
            extra = torch.zeros_like(output)
            for j in range(upto):  # j-th newest block belongs to task upto - j
                task = run.tasks[upto - 1 - j]
                a_j = weights[:, j].view(-1, *([1] * (x.dim() - 1)))
                extra = extra + a_j * (ALPHA / RANK) * (x @ task.lora_A[name].T @ task.lora_B[name].T)
            return output + extra

        handles.append(linear.register_forward_hook(add_blocks))
    logits = backbone(**inputs).logits
    for handle in handles:
        handle.remove()
    plain = backbone(**inputs).logits
    return logits, plain, weights


@torch.no_grad()
def imported_logits(path: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return load_checkpoint(path)(**inputs).logits


@pytest.fixture(autouse=True)
def _no_backbone_override(monkeypatch):
    monkeypatch.delenv("SAPT_BASE_MODEL", raising=False)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    env.pop("SAPT_BASE_MODEL", None)
    return subprocess.run(
        [sys.executable, "-m", "sapt", "interop", "import-official", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120,
    )


# ---- the import reproduces the release's forward ------------------------------------------------
@pytest.mark.slow
def test_import_matches_spec_reference(make_run, family, tmp_path):
    run = make_run(family)
    out = interop.import_official(family, run.backbone_dir, run.dirs, tmp_path / "out", lora_alpha=ALPHA)

    assert sorted(p.name for p in out.iterdir()) == ["1-taskA", "2-taskB", "task_order.txt"]
    assert (out / "task_order.txt").read_text().strip() == "taskA,taskB"
    config = json.loads((out / "2-taskB" / "sapt_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.abspath(run.backbone_dir)
    assert (config["r"], config["alpha"], config["tasks"]) == (RANK, ALPHA, list(NAMES))
    lineage = json.loads((out / "2-taskB" / "lineage.json").read_text())["blocks"]
    assert [b["dir"] for b in lineage] == ["../1-taskA", "."]
    routing_mean = json.loads((out / "2-taskB" / "routing_mean.json").read_text())
    assert routing_mean == {"tasks": ["taskB", "taskA"], "weights": [0.3, 0.7]}

    inputs = model_inputs(family)
    expected, plain, weights = reference_logits(run, 2, inputs)
    assert (weights - 0.5).abs().max() > 0.05, "routing should not be trivially uniform"
    assert (expected - plain).abs().max() > 1e-2, "the blocks should change the logits"
    model = load_checkpoint(out)
    assert model.tasks == list(NAMES) and model.num_blocks == 2
    with torch.no_grad():
        torch.testing.assert_close(model.routing_weights(inputs["input_ids"]), weights.flip(-1), atol=1e-6, rtol=0)
        assert torch.allclose(model(**inputs).logits, expected, atol=1e-5)

    # Task 1's folder of the same import is the one-block model.
    expected_first, _, _ = reference_logits(run, 1, inputs)
    assert torch.allclose(imported_logits(out / "1-taskA", inputs), expected_first, atol=1e-5)

    if family != "t5":  # one CLI run is enough: it calls the same function (keeps the file fast)
        return
    # The CLI writes the same artifacts.
    cli_out = tmp_path / "cli_out"
    result = run_cli(
        "--family", family, "--backbone", str(run.backbone_dir), "--saved-weights", *map(str, run.dirs),
        "--out", str(cli_out), "--lora-alpha", str(ALPHA), "--task-names", "first,second",
    )
    assert result.returncode == 0, result.stderr
    assert (cli_out / "task_order.txt").read_text().strip() == "first,second"
    assert torch.allclose(imported_logits(cli_out / "2-second", inputs), expected, atol=1e-5)


def test_import_first_folder_only(make_run, family, tmp_path):
    run = make_run(family)
    out = interop.import_official(family, run.backbone_dir, run.dirs[:1], tmp_path / "out", lora_alpha=ALPHA)
    model = load_checkpoint(out)
    assert model.num_blocks == 1 and model.tasks == ["taskA"]
    inputs = model_inputs(family)
    expected, plain, _ = reference_logits(run, 1, inputs)
    assert (expected - plain).abs().max() > 1e-2
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, expected, atol=1e-5)


def test_task_names_fall_back_to_numbers(make_run, tmp_path):
    run = make_run("llama")
    plain_dirs = []
    for index, source in enumerate(run.dirs, start=1):
        target = tmp_path / f"weights_{index}" / "saved_weights"
        target.parent.mkdir()
        source.rename(target)
        plain_dirs.append(target)
    (tmp_path / "out").mkdir()  # an existing empty folder is fine
    out = interop.import_official("llama", run.backbone_dir, plain_dirs, tmp_path / "out")
    assert (out / "task_order.txt").read_text().strip() == "task1,task2"
    assert load_checkpoint(out).sapt_config.alpha == 32.0


# ---- refusing bad input -------------------------------------------------------------------------
def _edit_pt(path: Path, edit) -> None:
    torch.save(edit(torch.load(path, weights_only=True)), path)


def _edit_own_block(edit, first_only: bool = True):
    """Apply `edit(key, tensor) -> {key: tensor}` to the task's own block entries (the first one only, by
    default: encoder.block.0...lora_q); the previous_lora_weights decoys stay as they are."""

    def apply(data: dict) -> dict:
        own = [key for key in data if "previous" not in key]
        targets = own[:1] if first_only else own
        out = {}
        for key, value in data.items():
            out.update(edit(key, value) if key in targets else {key: value})
        return out

    return apply


def _both_blocks(edit, first_only: bool = True):
    def corrupt(folder: Path) -> None:
        for name in ("lora_weights_A.pt", "lora_weights_B.pt"):
            _edit_pt(folder / name, _edit_own_block(edit, first_only))

    return corrupt


def rerank(key, value):
    """Rank 3 everywhere: A (3, d_in), B (d_out, 3)."""
    shape = (RANK + 1, value.shape[1]) if key.endswith("lora_A") else (value.shape[0], RANK + 1)
    return {key: torch.randn(shape)}


def drop(key, value):
    return {}


def rename(key, value):
    return {key.replace("block.0", "block.9"): value}


def _in(filename: str, corrupt):
    return lambda folder: corrupt(folder / filename)


def _write_pickle(obj):
    return lambda path: path.write_bytes(pickle.dumps(obj))


A_FILE, B_FILE = "lora_weights_A.pt", "lora_weights_B.pt"
WIDEN = _edit_own_block(lambda k, v: {k: torch.randn(v.shape[0], v.shape[1] + 1)})
SHORT_RANK = _edit_own_block(lambda k, v: {k: torch.randn(v.shape[0] + 1, v.shape[1])})

# case -> (file the message must name, corruption of task 2's folder, fragment of the message)
CORRUPTIONS = {
    "missing file": ("trans_input.pt", _in("trans_input.pt", lambda p: p.unlink()), "file is missing"),
    "wrong shape": (A_FILE, _in(A_FILE, lambda p: _edit_pt(p, WIDEN)), "expected (2, 32)"),
    "module missing": (A_FILE, _both_blocks(drop), "missing ['encoder.block.0.layer.0.SelfAttention.lora_q']"),
    "module unknown": (A_FILE, _both_blocks(rename), "unexpected ['encoder.block.9.layer.0.SelfAttention.lora_q']"),
    "A and B disagree": (B_FILE, _in(A_FILE, lambda p: _edit_pt(p, _edit_own_block(drop))), "differ"),
    "rank within a folder": (A_FILE, _in(A_FILE, lambda p: _edit_pt(p, SHORT_RANK)), "rank 3"),
    "rank across folders": (A_FILE, _both_blocks(rerank, first_only=False), "rank 3 differs from rank 2"),
    "keys count": ("prompts_keys_till_now.pt", _in("prompts_keys_till_now.pt", lambda p: _edit_pt(p, lambda k: k[:1])),
                   "expected (2, 32)"),
    "non-tensor .pt": ("trans_input.pt", _in("trans_input.pt", lambda p: torch.save(NotATensor(), p)), "NotATensor"),
    "object array": ("attention_weights.pkl",
                     _in("attention_weights.pkl", _write_pickle(np.array([0.5, "x"], dtype=object))), "object"),
    "not a distribution": ("attention_weights.pkl",
                           _in("attention_weights.pkl", _write_pickle(np.array([0.9, 0.9]))), "probability"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_input_is_one_line_error_naming_the_file(make_run, tmp_path, case):
    run = make_run("t5")
    filename, corrupt, fragment = CORRUPTIONS[case]
    corrupt(run.dirs[1])
    path = run.dirs[1] / filename
    with pytest.raises(CheckpointError) as info:
        interop.import_official("t5", run.backbone_dir, run.dirs, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and fragment in message, message
    assert not (tmp_path / "out").exists()


def test_malicious_pickle_runs_nothing(make_run, tmp_path):
    run = make_run("t5")
    marker = tmp_path / "pwned"
    path = run.dirs[1] / "attention_weights.pkl"
    path.write_bytes(pickle.dumps(RunsCommand(f"touch {marker}")))
    with pytest.raises(UnsafePickleError, match="refused global .*system") as info:
        load_numpy_pickle(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="refused global .*system"):
        interop.import_official("t5", run.backbone_dir, run.dirs, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_no_output(make_run, tmp_path, monkeypatch):
    run = make_run("t5")
    written = []

    def fail_on_second(task_dir, *args):
        written.append(task_dir)
        if len(written) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(interop, "save_routing_mean", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        interop.import_official("t5", run.backbone_dir, run.dirs, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_refuses_non_empty_output(make_run, tmp_path):
    run = make_run("t5")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not an empty folder"):
        interop.import_official("t5", run.backbone_dir, run.dirs, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_cli_error_exit_code_and_one_line(make_run, tmp_path):
    run = make_run("t5")
    missing = run.dirs[0] / "lora_weights_B.pt"
    missing.unlink()
    result = run_cli(
        "--family", "t5", "--backbone", str(run.backbone_dir), "--saved-weights", *map(str, run.dirs),
        "--out", str(tmp_path / "out"),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sapt interop: error: "), result.stderr
    assert str(missing) in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# ---- the restricted unpickler on its own ---------------------------------------------------------
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize(
    "array", [np.array([0.3, 0.7]), np.array([1, 2, 3], dtype=np.int32), np.eye(2, dtype=np.float32)]
)
def test_safe_pickle_reads_plain_arrays(tmp_path, protocol, array):
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(array, protocol=protocol))
    loaded = load_numpy_pickle(path)
    assert loaded.dtype == array.dtype and np.array_equal(loaded, array)


def test_safe_pickle_reads_numpy1_pickles_and_lists(tmp_path):
    path = tmp_path / "a.pkl"
    # numpy 1.x names its internals numpy.core.*; protocol 2 spells globals as text, so renaming is safe.
    data = pickle.dumps(np.array([0.25, 0.75]), protocol=2)
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert load_numpy_pickle(path).tolist() == [0.25, 0.75]
    path.write_bytes(pickle.dumps([0.25, 0.75]))
    assert load_numpy_pickle(path).tolist() == [0.25, 0.75]


@pytest.mark.parametrize(
    "obj, fragment",
    [
        (np.array([1.0, None], dtype=object), "refused dtype object"),
        (np.array([True, False]), "refused dtype bool"),
        ({"weights": [1.0]}, "found dict"),
        (["0.5", "0.5"], "found list"),
        (NotATensor(), "refused global"),
    ],
)
def test_safe_pickle_refuses_everything_else(tmp_path, obj, fragment):
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(UnsafePickleError, match=fragment) as info:
        load_numpy_pickle(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
