"""bench/cl_behaviour.py: the smoke run end to end (1 seed, 2 tasks, a few steps, every method), and
its summary over several seeds."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "cl_behaviour.py"
METHODS = ("sapt", "seq_lora", "o_lora")


@pytest.mark.slow
def test_smoke_run_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "cl.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | AP | F.Ra | BWT | AP/F.Ra/BWT seed 0 |" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "±" in line]
    assert [row.split("|")[1].strip() for row in rows] == list(METHODS)

    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["seeds"] == [0]
    assert data["tasks"] == ["synth_animal", "synth_topic"]
    for method in METHODS:
        (run,) = data["runs"][method]
        assert run["tasks"] == data["tasks"] and run["metric"] == "exact_match"
        # The score matrix is what the run's folders hold, and each seed's numbers follow from it.
        outputs = tmp_path / "work" / "runs" / f"{method}_seed0" / "outputs"
        matrix = run["matrix"]
        assert [matrix[0][0], *matrix[1]] == scores_in_folders(outputs, data["tasks"])
        assert all(0 <= v <= 100 for v in (matrix[0][0], *matrix[1]))
        (a00, _), (a10, a11) = matrix
        by_hand = {"AP": (a10 + a11) / 2, "F.Ra": a00 - a10, "BWT": a10 - a00}  # two tasks
        summary = data["summary"][method]
        for metric, value in by_hand.items():
            assert summary[metric]["per_seed"] == [pytest.approx(value)]
            assert summary[metric]["mean"] == pytest.approx(value) and summary[metric]["std"] == 0.0
    # Each task went through sapt.train_task: its folder is complete, chained on the one before.
    outputs = tmp_path / "work" / "runs" / "sapt_seed0" / "outputs"
    assert (outputs / "task_order.txt").read_text().strip() == "synth_animal,synth_topic"
    assert (outputs / "2-synth_topic" / "task_complete.json").is_file()
    assert (outputs / "2-synth_topic" / "routing_mean.json").is_file()


def scores_in_folders(outputs, tasks) -> list[float]:
    """a_11, a_21, a_22: exact match of each task after each step, read from all_results.json."""
    first, second = (json.loads((outputs / f"{i}-{t}" / "all_results.json").read_text())
                     for i, t in enumerate(tasks, 1))
    key = "predict_exact_match_for_{}".format
    return [first[key(tasks[0])], second[key(tasks[0])], second[key(tasks[1])]]


def load_script():
    spec = importlib.util.spec_from_file_location("bench_cl_behaviour", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_several_seeds_give_their_mean_and_sample_std():
    script = load_script()
    seeds = [(10.0, None, None), (20.0, 3.0, -3.0), (45.0, 5.0, -5.0)]
    runs = [{"summary": {"AP": ap, "F.Ra": fra, "BWT": bwt}} for ap, fra, bwt in seeds]
    # AP: mean 25, sample variance ((-15)² + (-5)² + 20²) / 2 = 325; F.Ra: a seed without it is left out.
    assert script._mean(runs, "AP") == 25.0 and script._std(runs, "AP") == pytest.approx(325 ** 0.5)
    assert script._mean(runs, "F.Ra") == 4.0 and script._std(runs, "F.Ra") == pytest.approx(2 ** 0.5)
    assert script._mean(runs, "BWT") == -4.0
    line = script.table({"sapt": runs}, [0, 1, 2]).splitlines()[2]
    assert line.startswith("| sapt |  25.0 ± 18.0 |   4.0 ±  1.4 |  -4.0 ±  1.4 |")
    assert line.endswith("| 10.0/n/a/n/a | 20.0/3.0/-3.0 | 45.0/5.0/-5.0 |")


def test_rejects_unknown_method():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--methods", "sapt,ewc"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "ewc" in proc.stderr
