"""Statistics over seeds (score.py --aggregate, --compare with groups) on run folders written here."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from sapt.experiments.aggregate import spread, t_quantile, welch

REPO = Path(__file__).resolve().parents[1]
TASKS = ["sst2", "agnews", "wic"]  # Long Sequence names: exact match
# t(0.975, df) in closed form, not from the scipy call the module makes: df 1 is the Cauchy quantile
# tan(pi (p - 1/2)), df 2 is (2p - 1) / sqrt(2 p (1 - p)). (The often-quoted 4.302652729911275 is off in
# the 10th digit: the exact value is 4.3026527297494638...)
T975 = {1: math.tan(math.pi * 0.475), 2: 0.95 / math.sqrt(2 * 0.975 * 0.025)}
TIGHT = dict(rel=1e-12, abs=1e-12)

# Three seeds of one experiment: score of task j (column) after task i (row).
SEEDS = {
    1: [[80.0], [70.0, 60.0], [50.0, 55.0, 90.0]],
    2: [[84.0], [80.0, 62.0], [60.0, 50.0, 70.0]],
    3: [[76.0], [78.0, 70.0], [72.0, 66.0, 66.0]],
}
SINGLE = [82.0, 64.0, 75.0]
# By hand from SEEDS: AP = mean of the last row; F.Ra = mean over j<T of (best a_kj before T) - a_Tj;
# BWT = mean over j<T of a_Tj - a_jj; FWT = mean over j of a_jj - single_j.
AP = {1: 65.0, 2: 60.0, 3: 68.0}
FRA = {1: (30.0 + 5.0) / 2, 2: (24.0 + 12.0) / 2, 3: (6.0 + 4.0) / 2}
BWT = {1: (-30.0 - 5.0) / 2, 2: (-24.0 - 12.0) / 2, 3: (-4.0 - 4.0) / 2}
FWT = {1: (-2.0 - 4.0 + 15.0) / 3, 2: (2.0 - 2.0 - 5.0) / 3, 3: (-6.0 + 6.0 - 9.0) / 3}


def _load_cli():
    spec = importlib.util.spec_from_file_location("score_cli_aggregate", REPO / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_cli()


def write_run(outputs: Path, rows, tasks=TASKS, task_args: dict | None = None, key="predict_exact_match_for_"):
    """A run's outputs/: task_order.txt and one folder per row with all_results.json (and task_args.json)."""
    outputs.mkdir(parents=True)
    (outputs / "task_order.txt").write_text(",".join(tasks) + "\n")
    for i, row in enumerate(rows, start=1):
        folder = outputs / f"{i}-{tasks[i - 1]}"
        folder.mkdir()
        (folder / "all_results.json").write_text(json.dumps({key + tasks[j]: v for j, v in enumerate(row)}))
        if task_args is not None:
            (folder / "task_args.json").write_text(json.dumps(task_args))
    return outputs


def write_single(outputs: Path, scores, task_args: dict):
    """A single-task run: folder i trained task i alone and holds only its score."""
    write_run(outputs, [[]] * len(TASKS), task_args=task_args)
    for i, (task, score) in enumerate(zip(TASKS, scores), start=1):
        (outputs / f"{i}-{task}" / "all_results.json").write_text(json.dumps({f"predict_exact_match_for_{task}": score}))


def args_of(seed, protocol="paper", model="models/smollm2-135m"):
    return {"protocol": protocol, "model_name_or_path": model, "seed": seed}


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "logs_and_outputs"
    for seed, rows in SEEDS.items():
        write_run(r / f"sapt_seed{seed}" / "outputs", rows, task_args=args_of(seed))
    write_single(r / "single" / "outputs", SINGLE, args_of(42))
    return r


def hand_mean_std(values):
    n = len(values)
    mean = math.fsum(values) / n
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def test_t_quantiles_match_the_closed_forms():
    assert T975[2] == pytest.approx(4.30265272974946, rel=1e-14)
    assert t_quantile(2) == pytest.approx(T975[2], rel=1e-12)
    assert t_quantile(1) == pytest.approx(T975[1], rel=1e-12)


def test_aggregate_over_three_seeds_against_hand_values(tmp_path, root, capsys):
    results = tmp_path / "results"
    rc = cli.main(["--aggregate", "sapt_seed*", "--single", "single", "--root", str(root), "--results_dir", str(results)])
    out = capsys.readouterr().out
    assert rc == 0
    record = json.loads((results / "sapt_aggregate.json").read_text())
    # Printed: the table (the .txt file), then the files written.
    assert out == (results / "sapt_aggregate.txt").read_text() + f"\nwrote {results}/sapt_aggregate.txt, {results}/sapt_aggregate.json\n"
    assert [r["run"] for r in record["runs"]] == ["sapt_seed1", "sapt_seed2", "sapt_seed3"]
    assert [r["seed"] for r in record["runs"]] == [1, 2, 3]
    assert record["conditions"] == {"protocol": "paper", "metric": "exact_match", "model": "models/smollm2-135m"}
    assert record["single_run"] == "single" and record["confidence"] == 0.95
    for name, by_seed in (("AP", AP), ("F.Ra", FRA), ("FWT", FWT), ("BWT", BWT)):
        values = [by_seed[s] for s in (1, 2, 3)]
        assert len(set(values)) == 3  # the seeds differ, so the spread is not trivially zero
        mean, std = hand_mean_std(values)
        half = T975[2] * std / math.sqrt(3)
        stat = record["statistics"][name]
        assert stat["n"] == 3
        assert stat["mean"] == pytest.approx(mean, **TIGHT)
        assert stat["std"] == pytest.approx(std, **TIGHT)
        assert stat["ci"] == pytest.approx([mean - half, mean + half], rel=1e-12)
        assert [r["metrics"][name] for r in record["runs"]] == pytest.approx(values, **TIGHT)
    ap_mean, ap_std = hand_mean_std(list(AP.values()))  # 64.33, 4.04
    half = T975[2] * ap_std / math.sqrt(3)
    ap_line = next(line for line in out.splitlines() if line.startswith("AP "))
    assert ap_line.split() == ["AP", "3", f"{ap_mean:.2f}", f"{ap_std:.2f}", f"[{ap_mean - half:.2f},", f"{ap_mean + half:.2f}]"]
    assert "protocol: paper; metric: exact_match; model: models/smollm2-135m" in out.splitlines()


def test_one_run_has_no_spread(tmp_path, root, capsys):
    assert cli.main(["--aggregate", "sapt_seed2", "--root", str(root), "--results_dir", str(tmp_path / "r")]) == 0
    assert "one run has no spread" in capsys.readouterr().out
    stat = json.loads((tmp_path / "r" / "sapt_aggregate.json").read_text())["statistics"]
    assert stat["AP"] == {"n": 1, "mean": 60.0, "std": None, "ci": None, "t_quantile": None}
    assert stat["FWT"]["mean"] is None  # no single-task run


def test_glob_expansion_natural_order_and_lists(tmp_path, capsys):
    root = tmp_path / "lo"
    for seed in (10, 2, 1):
        write_run(root / f"m_seed{seed}" / "outputs", SEEDS[1 + seed % 3], task_args=args_of(seed))
    (root / "m_seed_notes").mkdir()  # not a run (no outputs/): never matched
    results = tmp_path / "results"
    assert cli.main(["--aggregate", "m_seed*", "--root", str(root), "--results_dir", str(results)]) == 0
    record = json.loads((results / "m_aggregate.json").read_text())
    assert [r["run"] for r in record["runs"]] == ["m_seed1", "m_seed2", "m_seed10"]
    # A comma list, and a path pattern, name the same runs.
    assert cli.main(["--aggregate", "m_seed10,m_seed1", "--root", str(root), "--results_dir", str(results)]) == 0
    assert [r["run"] for r in json.loads((results / "m_aggregate.json").read_text())["runs"]] == ["m_seed10", "m_seed1"]
    assert cli.main(["--aggregate", str(root / "m_seed[12]"), "--root", str(tmp_path), "--results_dir", str(results)]) == 0
    assert [r["run"] for r in json.loads((results / "m_aggregate.json").read_text())["runs"]] == ["m_seed1", "m_seed2"]
    capsys.readouterr()


def one_line_error(capsys, argv, *needles):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("score.py: error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert captured.out == ""


@pytest.mark.parametrize("case", ["order", "incomplete", "protocol", "model", "metric_key", "pattern", "twice"])
def test_runs_that_do_not_match_give_one_line_errors(tmp_path, root, capsys, case):
    odd, needles = root / "sapt_seed9" / "outputs", []
    if case == "order":
        write_run(odd, SEEDS[1], tasks=["agnews", "sst2", "wic"], task_args=args_of(9))
        needles = ["sapt_seed9: tasks is 'agnews -> sst2 -> wic', sapt_seed1's is 'sst2 -> agnews -> wic'"]
    elif case == "incomplete":
        write_run(odd, SEEDS[1][:2], task_args=args_of(9))
        (odd / "task_order.txt").write_text(",".join(TASKS))
        needles = ["sapt_seed9: tasks is 'sst2 -> agnews', sapt_seed1's is 'sst2 -> agnews -> wic'"]
    elif case == "protocol":
        write_run(odd, SEEDS[1], task_args=args_of(9, protocol="clean"))
        needles = ["sapt_seed9: protocol is 'clean', sapt_seed1's is 'paper'; the runs of a group must share"]
    elif case == "model":
        write_run(odd, SEEDS[1], task_args=args_of(9, model="t5-large"))
        needles = ["sapt_seed9: model is 't5-large', sapt_seed1's is 'models/smollm2-135m'"]
    elif case == "metric_key":  # scored with another metric: the exact-match keys are absent
        write_run(odd, SEEDS[1], task_args=args_of(9), key="predict_eval_rougeL_for_")
        needles = [str(odd / "1-sst2" / "all_results.json"), "predict_exact_match_for_sst2"]
    argv = ["--aggregate", "sapt_seed*", "--root", str(root), "--results_dir", str(tmp_path / "results")]
    if case == "pattern":
        argv[1], needles = "nothing_*", ["pattern 'nothing_*' matches no run"]
    if case == "twice":
        argv[1:2], needles = ["sapt_seed*", "sapt_seed1"], ["run 'sapt_seed1' is named twice"]
    one_line_error(capsys, argv, *needles)
    assert not (tmp_path / "results").exists()


def welch_by_hand(a, b):
    ma, sa = hand_mean_std(a)
    mb, sb = hand_mean_std(b)
    va, vb = sa**2 / len(a), sb**2 / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return (mb - ma) / math.sqrt(va + vb), df


def p_by_integration(t_value, df, points=200_001):
    """Two-sided p = 1 - 2 * integral_0^|t| of the t density (Simpson's rule)."""
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    h = abs(t_value) / (points - 1)
    total = 0.0
    for k in range(points):
        weight = 1 if k in (0, points - 1) else (4 if k % 2 else 2)
        total += weight * (1 + (k * h) ** 2 / df) ** (-(df + 1) / 2)
    return 1 - 2 * norm * total * h / 3


def test_welch_against_hand_computation():
    a, b = [1.0, 2.0, 4.0], [3.0, 7.0]  # unequal sizes and variances: a non-integer df
    t_value, df = welch_by_hand(a, b)
    test = welch(a, b)
    assert df != round(df)
    assert test["t"] == pytest.approx(t_value, **TIGHT) and test["df"] == pytest.approx(df, **TIGHT)
    assert test["difference"] == pytest.approx(5.0 - 7.0 / 3.0, **TIGHT)
    assert test["p"] == pytest.approx(p_by_integration(t_value, df), abs=1e-9)
    assert welch([1.0, 1.0], [2.0, 2.0])["p"] is None  # no spread: undefined, not infinite
    assert spread([1.0, None])["mean"] is None


def test_compare_groups_welch_on_ap(tmp_path, root, capsys):
    # A second method: every final score 20 lower, so its AP has the same spread (df = 4 exactly).
    for seed, rows in SEEDS.items():
        write_run(root / f"seq_seed{seed}" / "outputs", rows[:2] + [[v - 20.0 for v in rows[2]]], task_args=args_of(seed))
    assert cli.main(["--compare", "sapt_seed*", "seq_seed1,seq_seed2,seq_seed3", "--root", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    a = list(AP.values())
    b = [v - 20.0 for v in a]
    t_value, df = welch_by_hand(a, b)
    assert df == pytest.approx(4.0, **TIGHT)
    xi = abs(t_value) / math.sqrt(4 + t_value**2)  # t distribution with 4 df in closed form
    p = 1 - xi * (1 + (1 - xi**2) / 2)
    assert p < 0.05
    test_line = next(line for line in out if line.startswith("AP seq_seed1,seq_seed2,seq_seed3 - sapt_seed*"))
    assert f"= -20.00 (Welch t = {t_value:.3f}, df = 4.00, p = {p:.4g}): exceeds the seeds' spread" in test_line
    assert "protocol: paper; metric: exact_match; model: models/smollm2-135m" in out
    row = next(line for line in out if line.startswith("sapt_seed* "))
    mean, std = hand_mean_std(a)
    assert f"{mean:.2f} ± {std:.2f}" in row
    # Groups that cannot be compared, or a group of one run, fail in one line.
    write_run(root / "other_seed1" / "outputs", [[1.0], [2.0, 3.0]], tasks=TASKS[:2], task_args=args_of(1))
    write_run(root / "other_seed2" / "outputs", [[1.0], [2.0, 3.0]], tasks=TASKS[:2], task_args=args_of(2))
    one_line_error(capsys, ["--compare", "sapt_seed*", "other_seed*", "--root", str(root)],
                   "other_seed1: tasks", "compared groups must share tasks, metric")
    one_line_error(capsys, ["--compare", "sapt_seed*", "seq_seed1", "--root", str(root)], "at least 2 runs per group")
    one_line_error(capsys, ["--compare", "sapt_seed*", "--root", str(root)], "at least two groups")


def test_compare_groups_within_the_spread(tmp_path, root, capsys):
    """Two groups whose AP differs by less than the seeds' spread: p above 0.05, said so."""
    for seed, rows in SEEDS.items():
        write_run(root / f"near_seed{seed}" / "outputs", rows[:2] + [[v - 1.0 for v in rows[2]]], task_args=args_of(seed))
    assert cli.main(["--compare", "sapt_seed*", "near_seed*", "--root", str(root)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("AP near_seed*"))
    assert "= -1.00" in line and "within the seeds' spread (p >= 0.05)" in line
