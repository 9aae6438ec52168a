"""Benchmarks as data (sapt.benchmark_spec, docs/benchmarks.md): the shipped specs choose today's metric for
every task, a benchmark of one's own (a folder with its benchmark.json) is loaded and scored by its spec's
metric, and a bad spec is a one-line error naming its file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, write_task_files
from sapt.benchmark_spec import SPEC_FILE, BenchmarkError, benchmark, benchmark_by_task_name, shipped_benchmarks
from sapt.experiments.cl_metrics import read_run, read_single_run, task_metrics
from sapt.tools.synthetic import SYNTHETIC_TASKS
from sapt.training.data import DataError, benchmark_of, find_task, load_split, task_names
from sapt.training.metrics import compute_metrics

ORDERS = json.loads((REPO_ROOT / "configs" / "orders.json").read_text())


def old_rule(task: str) -> str:
    """The scorer's rule before the specs, written out again: ROUGE-L for SuperNI-looking names, else EM."""
    return "rougeL" if re.match(r"task\d+_", task) else "exact_match"


def shipped_tasks() -> dict[str, list[str]]:
    """Every task of both shipped benchmarks: the paper's orders and the synthetic stand-ins."""
    tasks = {name: sorted({t for order in ORDERS[name].values() for t in order}) for name in ("SuperNI", "Long_Sequence")}
    for task in SYNTHETIC_TASKS:
        tasks[task.benchmark].append(task.name)
    return tasks


def write_run(outputs: Path, tasks: list[str], rows: list[dict], data_dir: Path | None) -> Path:
    """A sequential run's outputs: all_results.json per step, and task_args.json naming data_dir if given."""
    outputs.mkdir(parents=True)
    (outputs / "task_order.txt").write_text(",".join(tasks))
    for position, (task, results) in enumerate(zip(tasks, rows), start=1):
        folder = outputs / f"{position}-{task}"
        folder.mkdir()
        (folder / "all_results.json").write_text(json.dumps(results))
        if data_dir is not None:
            (folder / "task_args.json").write_text(json.dumps({"data_dir": str(data_dir), "task": task}))
    return outputs


def test_the_shipped_specs_choose_todays_metric_for_every_task(tmp_path):
    tasks = shipped_tasks()
    assert len(tasks["SuperNI"]) == 15 + 4 and len(tasks["Long_Sequence"]) == 15 + 4
    every = [t for names in tasks.values() for t in names]
    for name, names in tasks.items():
        write_task_files(tmp_path / "data", name, names)
    for task in every:  # data loading: the benchmark whose folder holds the task
        assert benchmark_of(tmp_path / "data", task).metric == old_rule(task), task
    assert {old_rule(t) for t in every} == {"rougeL", "exact_match"}
    # Scoring: a run that records its data folder, and one in the release's layout that records none.
    recorded = task_metrics(write_run(tmp_path / "a", every, [{}] * len(every), tmp_path / "data"), every)
    unrecorded = task_metrics(write_run(tmp_path / "b", every, [{}] * len(every), None), every)
    assert recorded == unrecorded == {t: old_rule(t) for t in every}


def test_the_shipped_specs_hold_the_releases_prompts():
    superni, long = benchmark("SuperNI"), benchmark("Long_Sequence")
    assert superni.format_prompt("Do X.", "hi") == "Definition: Do X.\n\nNow complete the following example -\nInput: hi\nOutput: "
    assert superni.format_prompt("", "hi") == "Definition: \n\nNow complete the following example -\nInput: hi\nOutput: "
    assert long.format_prompt("Pick.", "hi") == "Pick.\nhi\nOutput: "
    assert long.format_prompt("", "hi") == "hi\nOutput: "  # copa: no definition
    assert list(shipped_benchmarks()) == ["SuperNI", "Long_Sequence"]


# ---- a benchmark of one's own --------------------------------------------------------------------
MYBENCH = {
    "metric": "rougeL",
    "prompt": "Task: {definition}\nQuestion: {input}\nAnswer: ",
    "task_names": "^[a-z]+_(qa|cls)$",
    "task_name_example": "alpha_qa",
    "list_outputs": "draw_one",
}
REFERENCES = {"alpha_qa": ["the cat sat on the mat", "a dog ran in the park"], "beta_cls": ["very good film", "bad"]}
# Close but not equal: ROUGE-L gives partial credit where exact match gives none.
PREDICTIONS = {"alpha_qa": ["the cat sat on a mat", "a dog ran in the park"], "beta_cls": ["a very good film", "bad"]}


@pytest.fixture
def mybench(tmp_path) -> Path:
    """A two-task benchmark in the release's format under tmp_path/data/MyBench, with its own spec."""
    root = tmp_path / "data" / "MyBench"
    root.mkdir(parents=True)
    (root / SPEC_FILE).write_text(json.dumps(MYBENCH))
    for task, references in REFERENCES.items():
        (root / task).mkdir()
        instances = [{"input": f"{task} question {i}", "output": [ref]} for i, ref in enumerate(references)]
        for split in ("train", "dev", "test"):
            (root / task / f"{split}.json").write_text(json.dumps({"Definition": [f" Answer {task}. "], "Instances": instances}))
    return tmp_path / "data"


def test_a_benchmark_of_ones_own_is_loaded_by_its_spec(mybench):
    assert find_task(mybench, "alpha_qa") == ("MyBench", mybench / "MyBench" / "alpha_qa")
    assert find_task(mybench / "MyBench", "beta_cls") == ("MyBench", mybench / "MyBench" / "beta_cls")  # the folder itself
    assert task_names(mybench) == ["alpha_qa", "beta_cls"]
    assert benchmark_of(mybench, "beta_cls").metric == "rougeL"  # what selects the model on dev (train_task)
    test = load_split(mybench, "alpha_qa", "test")
    assert test["source"] == [f"Task: Answer alpha_qa.\nQuestion: alpha_qa question {i}\nAnswer: " for i in range(2)]
    assert test["target"] == REFERENCES["alpha_qa"]
    with pytest.raises(DataError, match=r"no task folder named 'gamma_qa' under SuperNI or Long_Sequence or MyBench"):
        find_task(mybench, "gamma_qa")


def test_a_benchmark_of_ones_own_is_scored_by_its_spec(mybench, tmp_path):
    tasks = list(REFERENCES)
    scores = {t: compute_metrics(PREDICTIONS[t], REFERENCES[t]) for t in tasks}
    assert all(scores[t]["rougeL"] != scores[t]["exact_match"] for t in tasks)  # so the metric shows

    def results(seen):
        return {f"predict_{'eval_rougeL' if m == 'rougeL' else m}_for_{t}": scores[t][m]
                for t in seen for m in ("rougeL", "exact_match")}

    outputs = write_run(tmp_path / "run" / "outputs", tasks, [results(tasks[:1]), results(tasks)], mybench)
    names, matrix, metric = read_run(outputs)
    assert names == tasks and metric == "rougeL"
    assert matrix[1].tolist() == [scores["alpha_qa"]["rougeL"], scores["beta_cls"]["rougeL"]]
    _, by_em, _ = read_run(outputs, "exact_match")
    assert by_em[1].tolist() != matrix[1].tolist()
    assert read_single_run(outputs) == {"alpha_qa": scores["alpha_qa"]["rougeL"], "beta_cls": scores["beta_cls"]["rougeL"]}

    # score.py's record names the keys it read
    done = subprocess.run([sys.executable, str(REPO_ROOT / "score.py"), str(outputs), "--results_dir", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert record["metric"] == "rougeL"
    assert record["metric_keys"] == {t: f"predict_eval_rougeL_for_{t}" for t in tasks}

    # Without the recorded data folder (the release's layout) the names alone decide: these fit
    # Long_Sequence's, so exact match; the recorded data_dir is what made the scores above ROUGE-L.
    for task_args in outputs.glob("*/task_args.json"):
        task_args.unlink()
    assert read_run(outputs)[2] == "exact_match" and benchmark_by_task_name("alpha_qa").name == "Long_Sequence"


def test_a_relative_data_dir_is_read_from_the_current_folder(mybench, tmp_path, monkeypatch):
    outputs = write_run(tmp_path / "run" / "outputs", ["alpha_qa"], [{}], Path("data"))
    monkeypatch.chdir(tmp_path)
    assert task_metrics(outputs, ["alpha_qa"]) == {"alpha_qa": "rougeL"}
    monkeypatch.chdir(tmp_path / "run")  # elsewhere the recorded folder is not there: the name decides
    assert task_metrics(outputs, ["alpha_qa"]) == {"alpha_qa": "exact_match"}


# ---- bad specs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        ({"metric": None}, "missing field(s) metric"),
        ({"metric": "bleu"}, "unknown metric 'bleu' (one of rougeL, exact_match)"),
        ({"promt": "x"}, "unknown field(s) promt"),
        ({"prompt": "Q: {definition}"}, "prompt lacks the {input} placeholder"),
        ({"prompt": "{input} {label}"}, "prompt uses unknown placeholder(s) label"),
        ({"prompt": "{input"}, "prompt is not a valid template"),
        ({"task_names": "("}, "task_names is not a valid regular expression"),
        ({"task_name_example": "Alpha"}, "task_name_example 'Alpha' does not fit task_names"),
        ({"list_outputs": "first"}, "unknown list_outputs 'first' (one of draw_one)"),
        ({"metric": 1}, "metric must be a non-empty string"),
    ],
)
def test_a_malformed_spec_is_one_line_naming_its_file(mybench, change, message):
    spec = {key: value for key, value in {**MYBENCH, **change}.items() if value is not None}
    path = mybench / "MyBench" / SPEC_FILE
    path.write_text(json.dumps(spec))
    with pytest.raises(DataError) as err:
        load_split(mybench, "alpha_qa", "test")
    assert str(err.value).startswith(f"{path}: MyBench: {message}") and "\n" not in str(err.value)


def test_unknown_benchmarks_and_unreadable_specs(mybench, tmp_path):
    with pytest.raises(BenchmarkError, match=r"^unknown benchmark 'Nope' \(shipped: SuperNI, Long_Sequence\)$"):
        benchmark("Nope")
    assert benchmark("MyBench", mybench).metric == "rougeL"
    path = mybench / "MyBench" / SPEC_FILE
    path.write_text("{")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: malformed JSON"):
        find_task(mybench, "alpha_qa")
    shipped_name = tmp_path / "data" / "SuperNI"
    write_task_files(tmp_path / "data", "SuperNI", ["task1_x"])
    (shipped_name / SPEC_FILE).write_text(json.dumps(MYBENCH))
    path.write_text(json.dumps(MYBENCH))
    with pytest.raises(DataError, match="SuperNI is a shipped benchmark; its spec is .*benchmarks.json$"):
        find_task(mybench, "task1_x")


@pytest.mark.slow
def test_a_task_step_on_a_benchmark_of_ones_own_selects_and_is_scored_by_its_metric(mybench, tmp_path):
    """train_task end to end on MyBench (tiny T5): dev selection by the spec's ROUGE-L, and score.py reads it."""
    from sapt.tools.tiny import build_tiny_model

    model = build_tiny_model("t5", tmp_path / "tiny", data_dir=mybench, d_model=32)
    outputs = tmp_path / "run" / "outputs"
    config = tmp_path / "1-alpha_qa.json"
    config.write_text(json.dumps({
        "model_name_or_path": str(model), "data_dir": str(mybench), "task_order": "alpha_qa", "task": "alpha_qa",
        "output_dir": str(outputs / "1-alpha_qa"), "num_train_epochs": 1, "eval_every_epochs": 1,
        "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "max_source_length": 64,
        "generation_max_length": 4, "lora_r": 2, "seed": 7, "disable_tqdm": True,
    }))
    done = subprocess.run([sys.executable, "-m", "sapt", "train_task", str(config)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((outputs / "1-alpha_qa" / "all_results.json").read_text())
    assert "best_eval_rougeL" in results and "best_eval_exact_match" not in results
    assert read_run(outputs)[2] == "rougeL"


def test_pseudo_samples_of_a_benchmark_of_ones_own_carry_its_spec(mybench, tmp_path, monkeypatch):
    """The generator stubbed (its learning is tests/test_pseudo_data.py's): what generate_for_task writes for
    MyBench is found by the pseudo-data loader and prompted with MyBench's template."""
    from types import SimpleNamespace

    from sapt.tools import pseudo_data
    from sapt.training.data import load_pseudo_split

    stub = SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=True), to=lambda device: None)
    monkeypatch.setattr(pseudo_data, "load_backbone", lambda *args, **kwargs: stub)
    monkeypatch.setattr(pseudo_data, "load_tokenizer", lambda *args: None)
    monkeypatch.setattr(pseudo_data, "build_generator", lambda *args: stub)
    monkeypatch.setattr(pseudo_data, "train_generator", lambda *args: [])
    monkeypatch.setattr(pseudo_data, "generate_pseudo_samples", lambda *args: [("Answer it.", "a made-up question")])
    gen = tmp_path / "gen"
    folder = pseudo_data.generate_for_task("unused", mybench, "alpha_qa", gen, pseudo_data.GeneratorSettings())
    assert folder == gen / "MyBench" / "alpha_qa"
    assert (gen / "MyBench" / SPEC_FILE).read_bytes() == (mybench / "MyBench" / SPEC_FILE).read_bytes()
    assert load_pseudo_split(gen, "alpha_qa")["source"] == ["Task: Answer it.\nQuestion: a made-up question\nAnswer: "]
