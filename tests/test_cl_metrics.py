"""CL metrics on hand-computed examples, and reading result folders in our and the release's layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sapt.experiments.cl_metrics import (
    ScoreError,
    average_performance,
    backward_transfer,
    forgetting_rate,
    forward_transfer,
    task_metrics,
    read_run,
    read_single_run,
    summarize,
)

TIGHT = dict(rel=1e-12, abs=1e-12)

SUPERNI = [
    "task363_sst2_polarity_classification",
    "task875_emotion_classification",
    "task1687_sentiment140_classification",
]
# ROUGE-L after task i (rows) on task j (columns); the hand arithmetic below is done on these numbers.
HAND = [
    [80.25],
    [85.0, 60.5],
    [75.0, 52.5, 90.0],
]
SINGLE = [85.0, 55.5, 92.0]


def _prefix(metric: str) -> str:
    return "predict_eval_rougeL_for_" if metric == "rougeL" else "predict_exact_match_for_"


def make_run(outputs: Path, tasks, rows, metric="rougeL", extra=None, order=None) -> Path:
    """A run folder; the metric not meant to be picked holds decoy 1.0s so a wrong pick shows."""
    other = "exact_match" if metric == "rougeL" else "rougeL"
    outputs.mkdir(parents=True)
    (outputs / "task_order.txt").write_text(",".join(order or tasks) + "\n")
    for i, row in enumerate(rows, start=1):
        folder = outputs / f"{i}-{tasks[i - 1]}"
        folder.mkdir()
        data = dict(extra or {})
        for j, value in enumerate(row):
            data[_prefix(metric) + tasks[j]] = value
            data[_prefix(other) + tasks[j]] = 1.0
        (folder / "all_results.json").write_text(json.dumps(data))
    return outputs


def make_single(outputs: Path, tasks, scores, metric="rougeL") -> Path:
    """Single-task run: folder i holds only task i's own score."""
    outputs.mkdir(parents=True)
    (outputs / "task_order.txt").write_text(",".join(tasks))
    for i, (task, value) in enumerate(zip(tasks, scores), start=1):
        folder = outputs / f"{i}-{task}"
        folder.mkdir()
        (folder / "all_results.json").write_text(json.dumps({_prefix(metric) + task: value}))
    return outputs


# ----------------------------------------------------------------------------------------------------
# Metrics by hand


def test_hand_computed_metrics():
    # AP: last row mean.
    ap = (75.0 + 52.5 + 90.0) / 3  # = 217.5 / 3 = 72.5
    # F.Ra: task 1 peaked at max(80.25, 85.0) = 85.0 before the last step, ends at 75.0 -> 10.0;
    #       task 2 peaked at max(60.5) = 60.5, ends at 52.5 -> 8.0. Averaged over T-1 = 2 tasks.
    fra = ((85.0 - 75.0) + (60.5 - 52.5)) / 2  # = 9.0
    # FWT: diagonal minus single-task scores, averaged over T = 3.
    fwt = ((80.25 - 85.0) + (60.5 - 55.5) + (90.0 - 92.0)) / 3  # = (-4.75 + 5.0 - 2.0) / 3 = -1.75 / 3
    # BWT: last row minus diagonal over the first T-1 tasks, averaged over T-1 = 2.
    bwt = ((75.0 - 80.25) + (52.5 - 60.5)) / 2  # = (-5.25 - 8.0) / 2 = -6.625
    # Release forms: BWT's sum divided by T; FWT against the constant 50.94.
    bwt_release = ((75.0 - 80.25) + (52.5 - 60.5)) / 3  # = -13.25 / 3
    fwt_release = ((80.25 - 50.94) + (60.5 - 50.94) + (90.0 - 50.94)) / 3  # = 77.93 / 3

    assert ap == pytest.approx(72.5, **TIGHT) and fra == pytest.approx(9.0, **TIGHT)
    assert average_performance(HAND) == pytest.approx(ap, **TIGHT)
    assert forgetting_rate(HAND) == pytest.approx(fra, **TIGHT)
    assert forward_transfer(HAND, SINGLE) == pytest.approx(fwt, **TIGHT)
    assert backward_transfer(HAND) == pytest.approx(bwt, **TIGHT)

    s = summarize(HAND, SINGLE)
    assert s["T"] == 3
    assert s["AP"] == pytest.approx(ap, **TIGHT)
    assert s["F.Ra"] == pytest.approx(fra, **TIGHT)
    assert s["FWT"] == pytest.approx(fwt, **TIGHT)
    assert s["BWT"] == pytest.approx(bwt, **TIGHT)
    assert s["bwt_release"] == pytest.approx(bwt_release, **TIGHT)
    assert s["fwt_release"] == pytest.approx(fwt_release, **TIGHT)
    assert summarize(HAND)["FWT"] is None


def test_numpy_matrix_with_nan_and_future_scores_ignored():
    arr = np.array([[80.25, np.nan, np.nan], [85.0, 60.5, 99.0], [75.0, 52.5, 90.0]])  # 99.0: unseen task
    assert summarize(arr) == summarize(HAND)


def test_t1_has_no_forgetting_or_bwt():
    s = summarize([[70.0]], [65.0])
    assert s["AP"] == pytest.approx(70.0, **TIGHT)
    assert s["F.Ra"] is None and s["BWT"] is None
    assert s["FWT"] == pytest.approx(5.0, **TIGHT)
    assert s["bwt_release"] == 0.0
    assert s["fwt_release"] == pytest.approx(70.0 - 50.94, **TIGHT)


def test_bad_matrices_rejected():
    with pytest.raises(ValueError):
        average_performance([[1.0], [2.0, float("nan")]])  # a seen task without a score
    with pytest.raises(ValueError):
        average_performance([])
    with pytest.raises(ValueError):
        forward_transfer(HAND, [1.0, 2.0])


def test_metric_choice_of_a_run_that_records_no_data_folder(tmp_path):
    # The release's layout (no task_args.json): each task by the first shipped benchmark whose names it fits.
    outputs = tmp_path / "o"
    outputs.mkdir()
    names = ["task363_sst2_polarity_classification", "dbpedia", "task_without_number"]
    assert task_metrics(outputs, names) == dict(zip(names, ["rougeL", "exact_match", "exact_match"]))
    assert task_metrics(outputs, ["dbpedia"], "rougeL") == {"dbpedia": "rougeL"}
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        task_metrics(outputs, ["dbpedia"], "bleu")
    with pytest.raises(ScoreError, match="cannot tell the benchmark of task 'Alpha-QA'.*pass --metric"):
        task_metrics(outputs, ["Alpha-QA"])


# ----------------------------------------------------------------------------------------------------
# Reading runs


def test_read_hand_run(tmp_path):
    outputs = make_run(tmp_path / "run" / "outputs", SUPERNI, HAND)
    tasks, matrix, metric = read_run(outputs)
    assert tasks == SUPERNI and metric == "rougeL"
    assert matrix.shape == (3, 3) and np.isnan(matrix[0, 1])
    assert matrix[2].tolist() == [75.0, 52.5, 90.0]
    single = read_single_run(make_single(tmp_path / "single" / "outputs", SUPERNI, SINGLE))
    assert single == dict(zip(SUPERNI, SINGLE))


RELEASE_EXTRA = {
    "epoch": 1.0,
    "predict_exact_match": 33.3,
    "predict_rougeL": 44.4,
    "predict_eval_rougeL": 44.4,
    "predict_loss": 0.5,
    "predict_runtime": 12.3,
    "predict_samples": 1000,
}


def test_release_layout_superni_picks_rougel(tmp_path):
    outputs = make_run(tmp_path / "o", SUPERNI, HAND, "rougeL", RELEASE_EXTRA)
    tasks, matrix, metric = read_run(outputs)
    assert metric == "rougeL"
    assert summarize(matrix)["AP"] == pytest.approx(72.5, **TIGHT)


def test_release_layout_long_picks_exact_match(tmp_path):
    long_tasks = ["dbpedia", "amazon"]
    outputs = make_run(tmp_path / "o", long_tasks, [[98.0], [96.0, 55.0]], "exact_match", RELEASE_EXTRA)
    tasks, matrix, metric = read_run(outputs)
    assert tasks == long_tasks and metric == "exact_match"
    assert summarize(matrix)["AP"] == pytest.approx((96.0 + 55.0) / 2, **TIGHT)
    # The override reads the other keys (the decoys here).
    _, forced, forced_name = read_run(outputs, "rougeL")
    assert forced_name == "rougeL" and forced[1].tolist() == [1.0, 1.0]


def test_mixed_benchmarks_report_mixed(tmp_path):
    # auto picks per task: EM for dbpedia, ROUGE-L for the SuperNI task (decoys hold the other metric).
    tasks = ["dbpedia", "task363_sst2_polarity_classification"]
    outputs = tmp_path / "o"
    outputs.mkdir()
    (outputs / "task_order.txt").write_text(",".join(tasks))
    rows = [{"predict_exact_match_for_dbpedia": 90.0, "predict_eval_rougeL_for_dbpedia": 1.0},
            {"predict_exact_match_for_dbpedia": 80.0, "predict_eval_rougeL_for_dbpedia": 1.0,
             "predict_exact_match_for_" + tasks[1]: 1.0, "predict_eval_rougeL_for_" + tasks[1]: 70.0}]
    for i, data in enumerate(rows, start=1):
        (outputs / f"{i}-{tasks[i - 1]}").mkdir()
        (outputs / f"{i}-{tasks[i - 1]}" / "all_results.json").write_text(json.dumps(data))
    _, matrix, metric = read_run(outputs)
    assert metric == "mixed" and matrix[1].tolist() == [80.0, 70.0]


def test_t1_run(tmp_path):
    outputs = make_run(tmp_path / "o", ["dbpedia"], [[70.0]], "exact_match")
    tasks, matrix, _ = read_run(outputs)
    s = summarize(matrix)
    assert tasks == ["dbpedia"] and s["T"] == 1 and s["F.Ra"] is None and s["BWT"] is None


def test_incomplete_run_scores_prefix_and_warns(tmp_path, caplog):
    outputs = make_run(tmp_path / "o", SUPERNI, HAND[:2], order=SUPERNI)
    notes: list[str] = []
    tasks, matrix, _ = read_run(outputs, warnings_out=notes)
    assert tasks == SUPERNI[:2] and matrix.shape == (2, 2)
    assert len(notes) == 1 and "incomplete" in notes[0] and "2 of 3" in notes[0]
    with caplog.at_level("WARNING"):
        read_run(outputs)
    assert any("incomplete" in r.getMessage() for r in caplog.records)


def test_gap_scores_only_before_it(tmp_path):
    outputs = make_run(tmp_path / "o", SUPERNI, HAND)
    (outputs / f"2-{SUPERNI[1]}" / "all_results.json").unlink()  # task 2 never finished
    notes: list[str] = []
    tasks, matrix, _ = read_run(outputs, warnings_out=notes)
    assert tasks == SUPERNI[:1] and matrix.tolist() == [[80.25]]
    assert f"3-{SUPERNI[2]}" in notes[0]


def _one_line_error(excinfo, fragment: str):
    message = str(excinfo.value)
    assert "\n" not in message and fragment in message, message


def test_missing_dir(tmp_path):
    with pytest.raises(ScoreError) as e:
        read_run(tmp_path / "nope")
    _one_line_error(e, "nope")


@pytest.mark.parametrize(
    "content, fragment",
    [(None, "missing task order"), ("", "empty"), ("a,b\nc\n", "one comma-separated line"),
     ("a,,b", "empty task name"), ("a,a", "twice"), (b"\xff\xfe\x00", "cannot read")],
)
def test_bad_task_order(tmp_path, content, fragment):
    outputs = tmp_path / "o"
    outputs.mkdir()
    if isinstance(content, bytes):
        (outputs / "task_order.txt").write_bytes(content)
    elif content is not None:
        (outputs / "task_order.txt").write_text(content)
    with pytest.raises(ScoreError) as e:
        read_run(outputs)
    _one_line_error(e, "task_order.txt")
    _one_line_error(e, fragment)


def test_malformed_json(tmp_path):
    outputs = make_run(tmp_path / "o", SUPERNI, HAND)
    (outputs / f"2-{SUPERNI[1]}" / "all_results.json").write_text('{"predict_eval_rougeL_for_x": 1,')
    with pytest.raises(ScoreError) as e:
        read_run(outputs)
    _one_line_error(e, f"2-{SUPERNI[1]}")
    _one_line_error(e, "malformed JSON")


def test_missing_key(tmp_path):
    outputs = make_run(tmp_path / "o", SUPERNI, HAND)
    path = outputs / f"3-{SUPERNI[2]}" / "all_results.json"
    data = json.loads(path.read_text())
    del data["predict_eval_rougeL_for_" + SUPERNI[0]]
    path.write_text(json.dumps(data))
    with pytest.raises(ScoreError) as e:
        read_run(outputs)
    _one_line_error(e, str(path))
    _one_line_error(e, "predict_eval_rougeL_for_" + SUPERNI[0])


def test_non_numeric_score_and_wrong_folder(tmp_path):
    outputs = make_run(tmp_path / "o", ["dbpedia"], [["high"]], "exact_match")
    with pytest.raises(ScoreError, match="not a finite number"):
        read_run(outputs)
    other = make_run(tmp_path / "p", ["dbpedia", "amazon"], [[1.0]], "exact_match")
    (other / "2-yahoo").mkdir()
    with pytest.raises(ScoreError, match="does not match"):
        read_run(other)


def test_single_run_alignment_is_by_name(tmp_path):
    reversed_single = make_single(tmp_path / "s", SUPERNI[::-1], SINGLE[::-1])
    single = read_single_run(reversed_single)
    assert [single[t] for t in SUPERNI] == SINGLE
    assert not math.isnan(forward_transfer(HAND, [single[t] for t in SUPERNI]))
