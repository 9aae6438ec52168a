"""A full disk loses nothing: a write that fails (ENOSPC) during a mid-task checkpoint or a task's final save
ends the step with one line naming the file, leaves the last complete state as it was (no half-written
file under a final name, no completion marker), and the same command then ends as an uninterrupted run."""

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.trainer_callback import TrainerState

from conftest import BENCHMARK, SUPERNI_TASKS
from sapt.run_files import COMPLETE_FILE, PREDICTIONS_DIR
from sapt.training.train_task import main
from sapt.utils import fileio
from sapt.utils.fileio import EXIT_WRITE

TASK = SUPERNI_TASKS[0]
# Seed-determined artifacts of a finished task folder, compared byte for byte.
ARTIFACTS = ["all_results.json", "block.safetensors", "router.safetensors", "routing_mean.json",
             "routing_weights.json", "sapt_config.json", "lineage.json", f"{PREDICTIONS_DIR}/{TASK}.jsonl"]
FULL_DISK = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---- the writers themselves ---------------------------------------------------------------------
def test_each_writer_on_a_full_disk_names_the_file_and_leaves_it_as_it_was(tmp_path, monkeypatch):
    old = {tmp_path / "a.json": b'{"old": 1}\n', tmp_path / "b.txt": b"old\n", tmp_path / "t.safetensors": b"old"}
    for path, content in old.items():
        path.write_bytes(content)

    def half_written(path):
        with open(path, "wb") as file:
            file.write(b'{"half')

    def full(path, *_):  # half of the file reaches the disk, then the write fails
        half_written(path)
        raise FULL_DISK

    def safetensors_full(tensors, filename, metadata=None):  # safetensors raises its own error type
        half_written(filename)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: full(self))
    monkeypatch.setattr(Path, "write_bytes", lambda self, *a, **k: full(self))
    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_full)
    writes = {
        tmp_path / "a.json": lambda: fileio.write_json_atomic(tmp_path / "a.json", {"new": 2}),
        tmp_path / "b.txt": lambda: fileio.write_files_atomic({tmp_path / "b.txt": b"new\n"}),
        tmp_path / "t.safetensors": lambda: fileio.save_tensors_atomic(tmp_path / "t.safetensors", {"x": torch.ones(2)}),
    }
    for path, write in writes.items():
        with pytest.raises(fileio.WriteError) as failure:
            write()
        assert str(failure.value).startswith(f"cannot write {path}: ") and "No space left on device" in str(failure.value)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in old)  # no temporary left


# ---- a task step ---------------------------------------------------------------------------------
def argv(model_dir, out: Path) -> list[str]:
    """8 examples, batch 4, 3 epochs: checkpoints after steps 2, 4, 6, the last one kept (as pipelines do)."""
    return [
        "--model_name_or_path", str(model_dir), "--data_dir", str(BENCHMARK), "--task_order", TASK, "--task", TASK,
        "--output_dir", str(out), "--max_train_samples", "8", "--max_eval_samples", "4", "--max_predict_samples", "4",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--num_train_epochs", "3",
        "--learning_rate", "1e-3", "--max_source_length", "64", "--generation_max_length", "4",
        "--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "1", "--seed", "5",
        "--disable_tqdm", "true",
    ]


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / f"1-{TASK}"
    assert main(argv(tiny_models["t5"], out)) == 0
    return out


def artifacts(folder: Path) -> dict:
    return {name: (folder / name).read_bytes() for name in ARTIFACTS}


def fail_atomic_write(monkeypatch, matches) -> list[Path]:
    """The first atomic write whose final path `matches` fails half-way, as on a full disk; returns
    [that path] once it has failed."""
    real, failed = fileio.atomic_path, []

    @contextmanager
    def atomic_path(path):
        with real(path) as tmp:
            yield tmp
            if not failed and matches(Path(path)):
                failed.append(Path(path))
                os.truncate(tmp, tmp.stat().st_size // 2)  # half of it reached the disk
                raise FULL_DISK

    monkeypatch.setattr(fileio, "atomic_path", atomic_path)
    return failed


def fail_trainer_state(monkeypatch, step: int) -> list[Path]:
    """The Trainer's own trainer_state.json (the last file of a checkpoint, not written atomically) of
    checkpoint `step` fails half-way."""
    real, failed = TrainerState.save_to_json, []

    def save_to_json(self, json_path):
        real(self, json_path)
        if not failed and Path(json_path).parent.name == f"checkpoint-{step}":
            failed.append(Path(json_path))
            os.truncate(json_path, os.path.getsize(json_path) // 2)
            raise FULL_DISK

    monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)
    return failed


FAULTS = {  # where the disk fills up: each installs its fault and returns the list the failed path goes into
    "checkpoint optimizer": lambda mp: fail_atomic_write(
        mp, lambda p: p.name == "optimizer.safetensors" and p.parent.name == "checkpoint-4"),
    "checkpoint trainer state": lambda mp: fail_trainer_state(mp, 4),
    "final block": lambda mp: fail_atomic_write(mp, lambda p: p.name == "block.safetensors"),
    "final router": lambda mp: fail_atomic_write(mp, lambda p: p.name == "router.safetensors"),
    "predictions": lambda mp: fail_atomic_write(mp, lambda p: p.parent.name == PREDICTIONS_DIR),
    "completion marker": lambda mp: fail_atomic_write(mp, lambda p: p.name == COMPLETE_FILE),
}


def assert_nothing_half_written(folder: Path) -> None:
    """Every file under a final name reads back whole; no temporary file is left."""
    for path in folder.rglob("*"):
        assert not path.name.endswith(".tmp"), path
        if path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".json":
            json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_full_disk_stops_the_step_in_one_line_and_the_same_command_resumes(
        fault, tiny_models, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / f"1-{TASK}"
    with monkeypatch.context() as patch:
        failed = FAULTS[fault](patch)
        assert main(argv(tiny_models["t5"], out)) == EXIT_WRITE
    err = capsys.readouterr().err
    assert failed, "the fault was never reached"
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    named = failed[0].parent if fault == "checkpoint trainer state" else failed[0]
    assert len(errors) == 1 and errors[0].startswith("sapt train_task: error: cannot write "), err[-3000:]
    assert str(named) in errors[0] and "No space left on device" in errors[0], errors
    assert "Traceback" not in err

    assert not (out / COMPLETE_FILE).exists()
    assert_nothing_half_written(out)
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    if fault.startswith("checkpoint"):  # the one being written is gone, the previous one stays whole
        assert checkpoints == ["checkpoint-2"] and (out / "checkpoint-2" / "trainer_state.json").is_file()
        assert not (out / "block.safetensors").exists()
    else:  # after training: the last checkpoint stays until the step completes
        assert checkpoints == ["checkpoint-6"]

    assert main(argv(tiny_models["t5"], out)) == 0  # space is back: the same command
    assert artifacts(out) == artifacts(uninterrupted)
    assert (out / COMPLETE_FILE).is_file() and not list(out.glob("checkpoint-*"))
    assert_nothing_half_written(out)
