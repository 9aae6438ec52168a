"""bench/cl_real.py on a tiny LLaMA: the smoke run end to end (2 tasks, a few steps), its table and JSON."""

import json
import subprocess
import sys

import pytest

from conftest import BENCHMARK, GENERATED, LONG_TASKS, REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "cl_real.py"
METHODS = ["sapt", "seq_lora", "mtl"]
TASKS = LONG_TASKS


@pytest.mark.slow
def test_smoke_run_prints_the_table_and_writes_json(tmp_path, tiny_models):
    out = tmp_path / "table.json"
    command = [
        sys.executable, str(SCRIPT), "--smoke", "--quiet", "--model_name_or_path", str(tiny_models["llama"]),
        "--tasks", ",".join(TASKS), "--methods", ",".join(METHODS), "--data_dir", str(BENCHMARK),
        "--gen_data_root", str(GENERATED), "--workdir", str(tmp_path / "work"), "--out", str(out),
    ]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[:5] == ["method", "single", *METHODS]
    assert "mean routing weight" in proc.stdout

    table = json.loads(out.read_text())
    assert table["_conditions"]["tasks"] == TASKS and table["_conditions"]["smoke"] is True
    assert sorted(table["single"]["scores"]) == sorted(TASKS)
    for method in METHODS:
        row = table[method]
        assert row["seconds"] > 0 and 0 <= row["AP"] <= 100
        assert len(row["matrix"]) == 2
    for method in ("sapt", "seq_lora"):  # sequential: every row scored, FWT against the single runs
        row = table[method]
        assert row["F.Ra"] is not None and row["BWT"] is not None and row["FWT"] is not None
        diagonal = [row["matrix"][i][i] for i in range(2)]
        assert row["FWT"] == pytest.approx(sum(d - table["single"]["scores"][t] for d, t in zip(diagonal, TASKS)) / 2)
    assert table["mtl"]["F.Ra"] is None  # one joint step: AP only
    routing = table["sapt"]["routing"]
    assert len(routing) == 2 and all(len(r) == 2 and sum(r) == pytest.approx(1, abs=1e-5) for r in routing)
    assert table["seq_lora"]["routing"] is None

    # Finished runs are not redone: a second call only reads them back.
    stamp = (tmp_path / "work" / "logs_and_outputs" / "cl_real_sapt" / "outputs" / f"2-{TASKS[1]}" / "all_results.json").stat().st_mtime_ns
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(out.read_text())["sapt"]["AP"] == table["sapt"]["AP"]
    assert (tmp_path / "work" / "logs_and_outputs" / "cl_real_sapt" / "outputs" / f"2-{TASKS[1]}" / "all_results.json").stat().st_mtime_ns == stamp


def test_missing_model_folder_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model_name_or_path", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("cl_real.py: error:") and "make model" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_default_tasks_follow_the_synthetic_benchmark_when_the_release_is_missing(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import cl_real

    assert cl_real.default_tasks(str(tmp_path)) == cl_real.DEFAULT_TASKS  # no SYNTHETIC.json: the released tasks
    (tmp_path / "SYNTHETIC.json").write_text(json.dumps({"orders": {"Long_Sequence": ["synth_a", "synth_b"]}}))
    assert cl_real.default_tasks(str(tmp_path)) == ["synth_a", "synth_b"]
