"""Routing accuracy (sapt.experiments.routing_analysis) and its report in score.py, on small folders written here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from sapt.experiments.cl_metrics import ScoreError
from sapt.experiments.routing_analysis import EVALUATION_FILE, NOT_STORED, evaluation_name, routing_accuracy

REPO = Path(__file__).resolve().parents[1]
TASKS = ["sst2", "agnews"]
# Each input's routing weights (oldest block first) in each row's predictions.
ROUTING = {
    (1, "sst2"): [[1.0], [1.0], [1.0]],
    (2, "sst2"): [[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]],  # the tie is no hit
    (2, "agnews"): [[0.2, 0.8], [0.9, 0.1], [0.1, 0.9], [0.3, 0.7]],
}


def load_score():
    spec = importlib.util.spec_from_file_location("score_cli", REPO / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(outputs: Path, with_routing: bool = True) -> Path:
    outputs.mkdir(parents=True)
    (outputs / "task_order.txt").write_text(",".join(TASKS))
    for position, task in enumerate(TASKS, start=1):
        row = outputs / f"{position}-{task}"
        (row / "predictions").mkdir(parents=True)
        results = {}
        for seen in TASKS[:position]:
            results[f"predict_exact_match_for_{seen}"] = 50.0
            results[f"predict_eval_rougeL_for_{seen}"] = 50.0
            records = []
            for index, weights in enumerate(ROUTING[(position, seen)]):
                record = {"index": index, "target": "a", "prediction": "a"}
                if with_routing:
                    record["routing"] = weights
                records.append(json.dumps(record))
            (row / "predictions" / f"{seen}.jsonl").write_text("\n".join(records) + "\n")
        (row / "all_results.json").write_text(json.dumps(results))
    return outputs


def hand_count() -> np.ndarray:
    """Counted by hand from ROUTING: row 1 has one block (every input a hit); row 2, sst2: only
    [0.7, 0.3] puts most on block 1 (the tie does not count); agnews: 3 of 4 on block 2."""
    return np.array([[100.0, np.nan], [100.0 / 3, 75.0]])


def test_routing_accuracy_equals_a_hand_count(tmp_path):
    accuracy = routing_accuracy(write_run(tmp_path / "outputs"), TASKS)
    np.testing.assert_array_equal(accuracy, hand_count())
    # Where a first-maximum argmax would count the tie as a hit, the strict count differs.
    naive = np.mean([np.argmax(w) == 0 for w in ROUTING[(2, "sst2")]]) * 100
    assert naive != accuracy[1, 0]


def test_score_reports_routing_accuracy_in_text_json_and_a_figure(tmp_path, capsys):
    outputs = write_run(tmp_path / "run" / "outputs")
    results = tmp_path / "results"
    assert load_score().main([str(outputs.parent), "--results_dir", str(results)]) == 0
    text = capsys.readouterr().out
    section = text[text.index("routing accuracy (%"):].splitlines()
    assert section[2].split() == ["after", "task", "1", "100.00", "-"]
    assert section[3].split() == ["after", "task", "2", "33.33", "75.00"]
    record = json.loads((results / "run.json").read_text())
    assert record["routing_accuracy"] == {"stored": True, "matrix": [[100.0, None], [100.0 / 3, 75.0]]}
    assert record["routing"] is None
    assert (results / "run_routing_accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_runs_without_per_input_routing_say_not_stored(tmp_path, capsys):
    score = load_score()
    results = tmp_path / "results"
    outputs = write_run(tmp_path / "run" / "outputs")
    assert score.main([str(outputs.parent), "--results_dir", str(results)]) == 0  # leaves a figure
    older = write_run(tmp_path / "older" / "run" / "outputs", with_routing=False)
    assert routing_accuracy(older, TASKS) is None
    capsys.readouterr()
    assert score.main([str(older.parent), "--results_dir", str(results)]) == 0
    assert NOT_STORED in capsys.readouterr().out
    assert json.loads((results / "run.json").read_text())["routing_accuracy"] == {"stored": False}
    assert not (results / "run_routing_accuracy.png").exists()  # the stale figure is gone


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"index": 0, "routing": [0.5]}', "must be 2 finite numbers"),
        ('{"index": 0}', "1 of 3 records lack 'routing'"),
        ("not json", "line 3: malformed JSON"),
    ],
)
def test_bad_routing_records_are_one_line_errors(tmp_path, line, problem):
    outputs = write_run(tmp_path / "outputs")
    path = outputs / "2-agnews" / "predictions" / "sst2.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + [line]) + "\n")
    with pytest.raises(ScoreError, match=problem) as caught:
        routing_accuracy(outputs, TASKS)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_a_re_evaluation_is_named_by_its_run_and_routing(tmp_path):
    outputs = write_run(tmp_path / "outputs")
    assert evaluation_name(outputs) is None
    (outputs / EVALUATION_FILE).write_text(json.dumps({"routing": "oracle", "run_name": "cl_real_sapt"}))
    assert evaluation_name(outputs) == "cl_real_sapt [oracle routing: own block only, reads the task id]"
    (outputs / EVALUATION_FILE).write_text(json.dumps({"routing": "best"}))
    with pytest.raises(ScoreError, match=EVALUATION_FILE):
        evaluation_name(outputs)
