"""`python -m sapt export`: SAPT blocks as stock PEFT adapters, checked against the SAPT model's own logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BACKBONES, REPO_ROOT, make_sapt, sample_batch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from sapt.experiments import evaluate
from sapt.tools import export
from sapt.run_files import RESULTS_FILE, TASK_ARGS_FILE, TASK_ORDER_FILE
from sapt.checkpoint import restore_model, save_routing_mean, save_task_artifacts

TASKS = ("task1", "task2", "task3")
# ā of each task over blocks 1..i, oldest first; none after the first is one-hot.
ROUTING_MEANS = {1: [1.0], 2: [0.3, 0.7], 3: [0.2, 0.5, 0.3]}
TOLERANCE = 1e-5


def write_run(family: str, outputs: Path) -> Path:
    """A three-task SAPT run's folders, written by the checkpoint module (no training)."""
    for index, task in enumerate(TASKS, start=1):
        model = make_sapt(family, index)
        task_dir = outputs / f"{index}-{task}"
        save_task_artifacts(model, task_dir, [f"../{j}-{old}" for j, old in enumerate(TASKS[: index - 1], start=1)])
        save_routing_mean(task_dir, model.tasks, ROUTING_MEANS[index])
    (outputs / TASK_ORDER_FILE).write_text(",".join(TASKS))
    return outputs


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def exported(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"export_{family}")
    outputs = write_run(family, root / "run" / "outputs")
    out = export.export_run(str(outputs), root / "adapters")
    return family, outputs, out


def sapt_logits(family: str, outputs: Path, weights: list[float]) -> torch.Tensor:
    """The SAPT model after the last task, with every input's routing forced to `weights` (oldest first)."""
    model = restore_model(BACKBONES[family](0), outputs / f"{len(TASKS)}-{TASKS[-1]}").eval()
    batch = sample_batch(family)
    # The model sets its routing in forward; the backbone alone reads whatever the routing state holds.
    model.routing.weights = torch.tensor([weights]).expand(batch["input_ids"].shape[0], -1)
    with torch.no_grad():
        return _run(model.base_model, family, batch)


def peft_logits(family: str, adapter: Path) -> tuple[torch.Tensor, set[str]]:
    """Logits of the stock backbone with the adapter loaded by peft, and the modules peft wrapped."""
    model = PeftModel.from_pretrained(BACKBONES[family](0), str(adapter)).eval()
    wrapped = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        return _run(model, family, sample_batch(family)), wrapped


def _run(model, family: str, batch: dict) -> torch.Tensor:
    if family == "t5":  # the decoder reads the labels shifted right
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def one_hot(index: int) -> list[float]:
    return [1.0 if j == index else 0.0 for j in range(len(TASKS))]


def padded(weights: list[float]) -> list[float]:
    return weights + [0.0] * (len(TASKS) - len(weights))


def wrapped_modules(family: str) -> set[str]:
    return {name for name, _ in make_sapt(family, 1).sapt_layers()}


def test_block_adapters_equal_one_hot_routing(exported):
    family, outputs, out = exported
    references = [sapt_logits(family, outputs, one_hot(i)) for i in range(len(TASKS))]
    # The blocks differ from each other, so an adapter holding the wrong block (or none) would fail.
    for i in range(len(TASKS)):
        for j in range(i):
            assert (references[i] - references[j]).abs().max() > 1e-2
    for i, task in enumerate(TASKS):
        logits, wrapped = peft_logits(family, out / export.BLOCKS_DIR / f"{i + 1}-{task}")
        assert wrapped == wrapped_modules(family)
        assert (logits - references[i]).abs().max() <= TOLERANCE


def test_fixed_adapters_equal_routing_fixed_to_the_mean(exported):
    family, outputs, out = exported
    for index, task in enumerate(TASKS, start=1):
        mean = ROUTING_MEANS[index]
        reference = sapt_logits(family, outputs, padded(mean))
        if index > 1:  # a mixture, distinct from its largest block alone
            assert max(mean) < 1.0
            largest = sapt_logits(family, outputs, one_hot(mean.index(max(mean))))
            assert (reference - largest).abs().max() > 1e-2
        logits, wrapped = peft_logits(family, out / export.FIXED_DIR / f"{index}-{task}")
        assert wrapped == wrapped_modules(family)
        assert (logits - reference).abs().max() <= TOLERANCE
        config = json.loads((out / export.FIXED_DIR / f"{index}-{task}" / "adapter_config.json").read_text())
        assert (config["r"], config["task_type"]) == (4 * index, "SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM")


def test_readme_names_every_folder(exported):
    _, _, out = exported
    readme = (out / export.README_FILE).read_text()
    folders = sorted(f"{kind}/{p.name}" for kind in (export.BLOCKS_DIR, export.FIXED_DIR) for p in (out / kind).iterdir())
    assert len(folders) == 2 * len(TASKS)
    for folder in folders:
        assert f"`{folder}`" in readme
    assert "PeftModel.from_pretrained(base" in readme


def test_a_task_folder_exports_up_to_that_task(exported, tmp_path):
    _, outputs, _ = exported
    out = export.export_run(str(outputs / "2-task2"), tmp_path / "two")
    for kind in (export.BLOCKS_DIR, export.FIXED_DIR):
        assert sorted(p.name for p in (out / kind).iterdir()) == ["1-task1", "2-task2"]


def test_a_run_name_is_looked_up_under_root(exported, tmp_path):
    _, outputs, _ = exported
    out = export.export_run("run", tmp_path / "by_name", root=outputs.parent.parent)
    assert sorted(p.name for p in (out / export.FIXED_DIR).iterdir()) == [f"{i}-{t}" for i, t in enumerate(TASKS, 1)]


# ---- measured AP in the README ----------------------------------------------------------------------
LEARNED = [[40.0], [30.0, 50.0], [20.0, 40.0, 90.0]]  # score matrix rows: after task 1, 2, 3
ORACLE = [[45.0], [45.0, 55.0], [60.0, 70.0, 80.0]]


def write_results(outputs: Path, rows: list[list[float]]) -> None:
    outputs.mkdir(parents=True, exist_ok=True)
    (outputs / TASK_ORDER_FILE).write_text(",".join(TASKS))
    for index, row in enumerate(rows, start=1):
        scores = {f"predict_exact_match_for_{task}": s for task, s in zip(TASKS, row)}
        (outputs / f"{index}-{TASKS[index - 1]}").mkdir(exist_ok=True)
        (outputs / f"{index}-{TASKS[index - 1]}" / RESULTS_FILE).write_text(json.dumps(scores))


@pytest.fixture
def scored_run(tmp_path):
    outputs = write_run("llama", tmp_path / "run" / "outputs")
    write_results(outputs, LEARNED)
    write_results(tmp_path / "run" / evaluate.EVALUATIONS_DIR / "oracle" / "outputs", ORACLE)
    return outputs


def ap_cell(readme: str, label_start: str) -> str:
    row = next(line for line in readme.splitlines() if line.startswith(f"| {label_start}"))
    return row.split("|")[2].strip()


def test_readme_reports_measured_ap_and_the_command_for_the_rest(scored_run, tmp_path):
    readme = (export.export_run(str(scored_run), tmp_path / "all") / export.README_FILE).read_text()
    assert ap_cell(readme, "SAPT") == f"{(20 + 40 + 90) / 3:.2f}"  # the last row's mean
    assert ap_cell(readme, "own block") == f"{(60 + 70 + 80) / 3:.2f}"
    assert ap_cell(readme, "fixed") == "not measured"
    run_dir = scored_run.parent.resolve()
    assert f"`python -m sapt evaluate {run_dir} --routing mean --config PIPELINE_DIR`" in readme

    # Up to task 2: the AP of the second row; with task_args.json recorded the command needs no --config.
    for task_dir in scored_run.glob("*-task*"):
        (task_dir / TASK_ARGS_FILE).write_text("{}")
    readme = (export.export_run(str(scored_run / "2-task2"), tmp_path / "two") / export.README_FILE).read_text()
    assert ap_cell(readme, "SAPT") == f"{(30 + 50) / 2:.2f}"
    assert ap_cell(readme, "own block") == f"{(45 + 55) / 2:.2f}"
    assert f"`python -m sapt evaluate {run_dir} --routing mean`" in readme


def test_measure_evaluates_only_the_missing_routings(scored_run, tmp_path, monkeypatch):
    calls = []

    def evaluate_run(run, routing, config_dir=None):  # stands for the real one: writes one routing's rows
        calls.append((Path(run), routing, config_dir))
        written = Path(run) / evaluate.EVALUATIONS_DIR / routing / "outputs"
        write_results(written, [[10.0], [10.0, 20.0], [30.0, 30.0, 60.0]])
        return written

    monkeypatch.setattr(evaluate, "evaluate_run", evaluate_run)
    out = export.export_run(str(scored_run), tmp_path / "measured", measure=True, config_dir="steps")
    readme = (out / export.README_FILE).read_text()
    assert calls == [(scored_run.parent.resolve(), "mean", "steps")]
    assert ap_cell(readme, "fixed") == f"{(30 + 30 + 60) / 3:.2f}"
    assert ap_cell(readme, "own block") == f"{(60 + 70 + 80) / 3:.2f}"


# ---- errors -----------------------------------------------------------------------------------------
def test_a_failed_measurement_is_one_line_and_writes_nothing(scored_run, tmp_path, capsys, monkeypatch):
    def evaluate_run(run, routing, config_dir=None):
        raise evaluate.EvaluateError(f"{run}/outputs/1-task1/task_args.json: task arguments file is missing")

    monkeypatch.setattr(evaluate, "evaluate_run", evaluate_run)
    assert export.main([str(scored_run), "--out", str(tmp_path / "out"), "--measure"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    missing = scored_run.parent.resolve() / "outputs" / "1-task1" / "task_args.json"
    assert err == [f"sapt export: error: --measure, routing mean: {missing}: task arguments file is missing"]
    assert not (tmp_path / "out").exists()


def test_missing_run_is_one_line_and_writes_nothing(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "outputs"
    assert export.main([str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]
    assert not (tmp_path / "out").exists()


def test_missing_routing_mean_names_the_file(tmp_path, capsys):
    outputs = write_run("llama", tmp_path / "run" / "outputs")
    (outputs / "2-task2" / "routing_mean.json").unlink()
    assert export.main([str(outputs), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(outputs / "2-task2" / "routing_mean.json") in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output, no staging folder left


def test_a_method_without_routing_is_refused(tmp_path, capsys):
    task_dir = tmp_path / "run" / "outputs" / "1-task1"
    save_task_artifacts(make_sapt("llama", 1, method="o_lora"), task_dir, [])
    assert export.main([str(task_dir.parent), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method 'o_lora'" in err[0] and str(task_dir / "sapt_config.json") in err[0]


@pytest.mark.slow
def test_non_empty_out_is_refused_by_the_command(tmp_path):
    outputs = write_run("llama", tmp_path / "run" / "outputs")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "sapt", "export", str(outputs), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"sapt export: error: {out}: output folder is not empty; choose a new one"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]
