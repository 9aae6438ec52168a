"""score.py end to end: report text, JSON, PNGs, errors (one line, exit 2, no files), --compare."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCORE = REPO / "score.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIGHT = dict(rel=1e-12, abs=1e-12)

SUPERNI = [
    "task363_sst2_polarity_classification",
    "task875_emotion_classification",
    "task1687_sentiment140_classification",
]
HAND = [[80.25], [85.0, 60.5], [75.0, 52.5, 90.0]]
SINGLE = [85.0, 55.5, 92.0]


def _load_cli():
    spec = importlib.util.spec_from_file_location("score_cli", SCORE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_cli()


def _key(metric: str, task: str) -> str:
    return ("predict_eval_rougeL_for_" if metric == "rougeL" else "predict_exact_match_for_") + task


def make_run(outputs: Path, tasks, rows, metric="rougeL", order=None) -> Path:
    """A run folder in the release's layout (overall keys too); the unpicked metric holds decoy 1.0s."""
    other = "exact_match" if metric == "rougeL" else "rougeL"
    outputs.mkdir(parents=True)
    (outputs / "task_order.txt").write_text(",".join(order or tasks) + "\n")
    for i, row in enumerate(rows, start=1):
        folder = outputs / f"{i}-{tasks[i - 1]}"
        folder.mkdir()
        data = {"epoch": 1.0, "predict_exact_match": 12.0, "predict_rougeL": 13.0}
        for j, value in enumerate(row):
            data[_key(metric, tasks[j])] = value
            data[_key(other, tasks[j])] = 1.0
        (folder / "all_results.json").write_text(json.dumps(data))
    return outputs


def make_single(outputs: Path, tasks, scores, metric="rougeL") -> Path:
    outputs.mkdir(parents=True)
    (outputs / "task_order.txt").write_text(",".join(tasks))
    for i, (task, value) in enumerate(zip(tasks, scores), start=1):
        (outputs / f"{i}-{task}").mkdir()
        (outputs / f"{i}-{task}" / "all_results.json").write_text(json.dumps({_key(metric, task): value}))
    return outputs


def run_cli(tmp_path, *args):
    """score.py as a user runs it, in tmp_path so relative results/ lands there."""
    return subprocess.run(
        [sys.executable, str(SCORE), *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "logs_and_outputs"
    make_run(r / "seq" / "outputs", SUPERNI, HAND)
    make_single(r / "alone" / "outputs", SUPERNI, SINGLE)
    return r


def test_hand_run_report_and_files(tmp_path, root, capsys):
    results = tmp_path / "results"
    rc = cli.main(["seq", "alone", "--root", str(root), "--results_dir", str(results)])
    out = capsys.readouterr().out
    assert rc == 0

    ap = (75.0 + 52.5 + 90.0) / 3  # 72.5
    fra = ((max(80.25, 85.0) - 75.0) + (60.5 - 52.5)) / 2  # (10.0 + 8.0) / 2 = 9.0
    fwt = ((80.25 - 85.0) + (60.5 - 55.5) + (90.0 - 92.0)) / 3  # -1.75 / 3
    bwt = ((75.0 - 80.25) + (52.5 - 60.5)) / 2  # -13.25 / 2 = -6.625
    bwt_release = ((75.0 - 80.25) + (52.5 - 60.5)) / 3
    fwt_release = ((80.25 - 50.94) + (60.5 - 50.94) + (90.0 - 50.94)) / 3

    record = json.loads((results / "seq.json").read_text())
    m = record["metrics"]
    assert record["task_names"] == SUPERNI and record["metric"] == "rougeL" and m["T"] == 3
    assert m["AP"] == pytest.approx(ap, **TIGHT)
    assert m["F.Ra"] == pytest.approx(fra, **TIGHT)
    assert m["FWT"] == pytest.approx(fwt, **TIGHT)
    assert m["BWT"] == pytest.approx(bwt, **TIGHT)
    rel = record["release_compatible_only"]
    assert rel["bwt_release"] == pytest.approx(bwt_release, **TIGHT)
    assert rel["fwt_release"] == pytest.approx(fwt_release, **TIGHT)
    assert record["matrix"][0] == [80.25, None, None]

    # Printed text: matrix rows with 2 decimals, abbreviated columns, metrics; the .txt file is the same; then
    # the files written.
    assert out == (results / "seq.txt").read_text() + f"\nwrote {results}/seq.txt, {results}/seq.json, {results}/seq_matrix.png\n"
    assert "after task 1" in out and "80.25" in out and "task1687" in out
    assert "AP   = 72.50" in out and "F.Ra = 9.00" in out and "FWT  = -0.58" in out
    assert "BWT  = -6.6" in out and "release-compatible only" in out
    assert "fwt_release = " not in out and "fwt_release, the release's FWT against a constant 50.94" in out
    assert (results / "seq_matrix.png").read_bytes()[:8] == PNG_MAGIC
    assert not (results / "seq_routing.png").exists()


def test_routing_heatmap(tmp_path, root, capsys):
    last = root / "seq" / "outputs" / f"3-{SUPERNI[2]}"
    weights = {t: [0.7, 0.2, 0.1] for t in SUPERNI}
    (last / "routing_weights.json").write_text(json.dumps({"tasks": SUPERNI, "mean_weights": weights}))
    results = tmp_path / "results"
    assert cli.main([str(root / "seq"), "--results_dir", str(results)]) == 0  # run dir given as a path
    capsys.readouterr()
    assert (results / "seq_routing.png").read_bytes()[:8] == PNG_MAGIC
    assert (results / "seq_matrix.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((results / "seq.json").read_text())["metrics"]["FWT"] is None


def test_t1_and_long_tasks(tmp_path, capsys):
    outputs = make_run(tmp_path / "one" / "outputs", ["dbpedia"], [[70.0]], "exact_match")
    results = tmp_path / "results"
    assert cli.main([str(outputs), "--results_dir", str(results)]) == 0  # the outputs dir itself
    out = capsys.readouterr().out
    assert "metric: exact_match" in out and "AP   = 70.00" in out and "F.Ra = n/a" in out and "BWT  = n/a" in out
    m = json.loads((results / "one.json").read_text())["metrics"]
    assert m["F.Ra"] is None and m["BWT"] is None and m["T"] == 1


def test_incomplete_run_warns(tmp_path, capsys):
    root = tmp_path / "lo"
    make_run(root / "part" / "outputs", SUPERNI, HAND[:2], order=SUPERNI)
    results = tmp_path / "results"
    assert cli.main(["part", "--root", str(root), "--results_dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "incomplete" in out and "2 of 3" in out
    record = json.loads((results / "part.json").read_text())
    assert record["complete"] is False and record["metrics"]["T"] == 2


def test_garbled_json_one_line_error_exit_2(tmp_path, root):
    bad = root / "seq" / "outputs" / f"2-{SUPERNI[1]}" / "all_results.json"
    bad.write_text("{not json")
    proc = run_cli(tmp_path, "seq", "--root", str(root))
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("score.py: error: ") and str(bad) in lines[0]
    assert "malformed JSON" in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "results").exists()


def test_unknown_run_and_bad_flag_exit_2(tmp_path, root):
    for args in (["nope", "--root", str(root)], ["seq", "--metric", "bleu", "--root", str(root)], []):
        proc = run_cli(tmp_path, *args)
        assert proc.returncode == 2, args
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("score.py: error: ")
    assert not (tmp_path / "results").exists()


def test_module_and_top_level_script_are_one_command(tmp_path, root):
    """Pipelines call `python -m sapt score`, users `python score.py`: same output, same files, byte for byte."""
    outputs = {}
    for name, command in (("script", [str(SCORE)]), ("module", ["-m", "sapt", "score"])):
        folder = tmp_path / name
        folder.mkdir()
        proc = subprocess.run([sys.executable, *command, "seq", "alone", "--root", str(root)], cwd=folder,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        files = {p.name: p.read_bytes() for p in (folder / "results").iterdir()}
        outputs[name] = (proc.stdout, files)
    assert sorted(outputs["module"][1]) == ["seq.json", "seq.txt", "seq_matrix.png"]
    assert "AP   = " in outputs["module"][0] and outputs["module"] == outputs["script"]


def test_compare_prints_both_runs(tmp_path, root):
    make_run(root / "other" / "outputs", SUPERNI[:2], [[70.0], [65.0, 60.0]])
    proc = run_cli(tmp_path, "--root", str(root), "--compare", "seq", "other")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["run", "metric", "AP", "F.Ra", "FWT", "BWT", "T"]
    seq = next(line for line in lines if line.startswith("seq ")).split()
    other = next(line for line in lines if line.startswith("other ")).split()
    assert seq == ["seq", "rougeL", "72.50", "9.00", "n/a", "-6.62", "3"]
    # other: AP (65+60)/2 = 62.5; F.Ra 70-65 = 5; BWT 65-70 = -5.
    assert other == ["other", "rougeL", "62.50", "5.00", "n/a", "-5.00", "2"]


def test_bad_routing_file_fails_without_partial_output(tmp_path, root, capsys):
    last = root / "seq" / "outputs" / f"3-{SUPERNI[2]}"
    (last / "routing_weights.json").write_text(json.dumps({"tasks": SUPERNI, "mean_weights": {"x": [0.5]}}))
    results = tmp_path / "results"
    assert cli.main(["seq", "--root", str(root), "--results_dir", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("score.py: error: ") and "routing_weights.json" in err and len(err.splitlines()) == 1
    assert not results.exists()


# ----------------------------------------------------------------------------------------------------
# Conditions: protocol, metric and model name every table and JSON record


def _write_task_json(outputs: Path, name: str, per_folder: dict) -> None:
    for folder, data in per_folder.items():
        (outputs / folder / name).write_text(json.dumps(data))


def test_conditions_line_in_text_and_json(tmp_path, root, capsys):
    outputs = root / "seq" / "outputs"
    folders = [f"{i}-{t}" for i, t in enumerate(SUPERNI, start=1)]
    args = {"protocol": "clean", "model_name_or_path": "models/t5-small", "seed": 7}
    _write_task_json(outputs, "task_args.json", {f: args for f in folders})
    # sapt_config.json names another path: task_args.json, what the step ran with, takes precedence.
    _write_task_json(outputs, "sapt_config.json", {f: {"base_model_name_or_path": "/elsewhere/t5"} for f in folders})
    results = tmp_path / "results"
    assert cli.main(["seq", "--root", str(root), "--results_dir", str(results)]) == 0
    line = "protocol: clean; metric: rougeL; model: models/t5-small"
    assert line in capsys.readouterr().out.splitlines()
    record = json.loads((results / "seq.json").read_text())
    assert record["conditions"] == {"protocol": "clean", "metric": "rougeL", "model": "models/t5-small"}


def test_conditions_of_older_and_mixed_folders(tmp_path, root, capsys):
    """No task_args.json: protocol unknown (not guessed), model from sapt_config.json; disagreeing folders: mixed."""
    outputs = root / "seq" / "outputs"
    folders = [f"{i}-{t}" for i, t in enumerate(SUPERNI, start=1)]
    _write_task_json(outputs, "sapt_config.json", {f: {"base_model_name_or_path": "/m/t5-large"} for f in folders})
    results = tmp_path / "results"
    assert cli.main(["seq", "--root", str(root), "--results_dir", str(results)]) == 0
    assert "protocol: unknown (no task_args.json); metric: rougeL; model: /m/t5-large" in capsys.readouterr().out
    assert json.loads((results / "seq.json").read_text())["conditions"]["protocol"] == "unknown (no task_args.json)"

    _write_task_json(outputs, "task_args.json", {folders[2]: {"protocol": "paper", "model_name_or_path": "/m/t5-large"}})
    assert cli.main(["seq", "--root", str(root), "--results_dir", str(results)]) == 0
    expected = (f"protocol: mixed (unknown (no task_args.json) in {folders[0]}, {folders[1]}; paper in {folders[2]}); "
                "metric: rougeL; model: /m/t5-large")
    assert expected in capsys.readouterr().out.splitlines()

    # A malformed task_args.json is a one-line error naming it, and no report is written.
    (outputs / folders[0] / "task_args.json").write_text("[1, 2")
    assert cli.main(["seq", "--root", str(root), "--results_dir", str(tmp_path / "fresh")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("score.py: error: ")
    assert str(outputs / folders[0] / "task_args.json") in err and "malformed JSON" in err
    assert not (tmp_path / "fresh").exists()


def test_compare_names_the_conditions(tmp_path, root, capsys):
    outputs = make_run(root / "other" / "outputs", SUPERNI[:2], [[70.0], [65.0, 60.0]])
    assert cli.main(["--root", str(root), "--compare", "seq", "other"]) == 0
    unknown = "protocol: unknown (no task_args.json); metric: rougeL; model: unknown (no task_args.json or sapt_config.json)"
    assert capsys.readouterr().out.splitlines()[-1] == unknown  # shared by both runs: said once
    args = {"protocol": "paper", "model_name_or_path": "m"}
    _write_task_json(outputs, "task_args.json", {f"{i}-{t}": args for i, t in enumerate(SUPERNI[:2], start=1)})
    assert cli.main(["--root", str(root), "--compare", "seq", "other"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == [
f"seq: {unknown}", "other: protocol: paper; metric: rougeL; model: m"]
