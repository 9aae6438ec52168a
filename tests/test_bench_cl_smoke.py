"""bench/cl_behaviour.py: the smoke run end to end (1 seed, 2 tasks, a few steps, every method)."""

import json
import subprocess
import sys

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "cl_behaviour.py"
METHODS = ("sapt", "seq_lora", "o_lora")


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
        summary = data["summary"][method]
        for metric in ("AP", "F.Ra", "BWT"):
            assert len(summary[metric]["per_seed"]) == 1
            assert summary[metric]["mean"] == summary[metric]["per_seed"][0]
            assert summary[metric]["std"] == 0.0
        (run,) = data["runs"][method]
        assert run["tasks"] == data["tasks"] and run["metric"] == "exact_match"
        matrix = run["matrix"]
        assert len(matrix) == 2 and all(0 <= v <= 100 for v in (matrix[0][0], *matrix[1]))
    # Each task went through sapt.train_task: its folder is complete, chained on the one before.
    outputs = tmp_path / "work" / "runs" / "sapt_seed0" / "outputs"
    assert (outputs / "task_order.txt").read_text().strip() == "synth_animal,synth_topic"
    assert (outputs / "2-synth_topic" / "task_complete.json").is_file()
    assert (outputs / "2-synth_topic" / "routing_mean.json").is_file()


def test_rejects_unknown_method():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--methods", "sapt,ewc"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "ewc" in proc.stderr
