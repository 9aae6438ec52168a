"""Run the same quick pipelines with two versions of the code and compare what they write, byte for byte.

    python scripts/compare_outputs.py --old REV [--new PATH] [--cases sapt,o_lora,...] [--keep DIR]

For a restructure that must not change behaviour: REV (a commit, e.g. main before the change) is checked
out into a temporary worktree; each case's pipeline is generated and run once with REV's `src/` first on
PYTHONPATH and once with the new tree's (default: this checkout), in the same folder (moved aside in
between), so that no absolute path differs. Every file of the two runs' `logs_and_outputs/` and `results/`
is then compared; the only files left out are the Trainer's wall-clock timings (`train_results.json`)
and the generated shell script itself, which names the code tree it was written from. Exit 0 when every
case writes the same files with the same bytes; otherwise the differing files are listed, and exit 1.
Tiny random models and a handful of examples per task: a case takes a minute or two on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = ["max_train_samples=8", "max_eval_samples=4", "max_predict_samples=4", "num_train_epochs=2"]
# case name -> (generator preset, generator flags)
CASES = {
    "sapt": ("long_t5", ["--method", "sapt"]),
    "o_lora": ("long_t5", ["--method", "o_lora"]),
    "single": ("long_t5", ["--method", "single"]),
    "seq_lora": ("long_t5", ["--method", "seq_lora"]),
    "replay": ("long_t5", ["--method", "replay"]),
    "mtl": ("long_t5", ["--method", "mtl"]),
    "sapt_llama": ("superni_llama", ["--method", "sapt"]),
    "sapt_clean": ("superni_t5", ["--method", "sapt", "--protocol", "clean"]),
    # The release's schedule needs more micro-batches per epoch than its accumulation steps.
    "sapt_release": ("long_t5", ["--method", "sapt", "--release_exact", "--set", "max_train_samples=24"]),
    "sapt_release_llama": ("long_llama", ["--method", "sapt", "--release_exact", "--set", "max_train_samples=24"]),
}
SKIPPED = {"train_results.json"}  # wall-clock timings of the Trainer


def run_case(tree: Path, preset: str, flags: list[str], workdir: Path, data: Path) -> None:
    """Generate and run one pipeline with the code of `tree`, in `workdir`."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    script = workdir / "pipeline.sh"
    overrides = [arg for pair in SAMPLES for arg in ("--set", pair)]
    generate = [sys.executable, str(tree / f"gen_script_{preset}.py"), "--quick", "--run_name", "cmp",
                "--workdir", str(workdir), "--output", str(script), "--data_dir", str(data / "CL_Benchmark"),
                "--gen_data_root", str(data / "generated_data"), *overrides, *flags]  # a case's --set wins
    for command in (generate, ["bash", str(script)]):
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{tree}: {' '.join(command[:3])} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def digests(workdir: Path) -> dict[str, str]:
    files = {}
    for root in (workdir / "logs_and_outputs", workdir / "results"):
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name not in SKIPPED:
                files[str(path.relative_to(workdir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def compare(old: dict[str, str], new: dict[str, str]) -> list[str]:
    problems = [f"only in old: {name}" for name in sorted(old.keys() - new.keys())]
    problems += [f"only in new: {name}" for name in sorted(new.keys() - old.keys())]
    problems += [f"differs: {name}" for name in sorted(old.keys() & new.keys()) if old[name] != new[name]]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="The commit to compare against (e.g. main).")
    parser.add_argument("--new", default=str(REPO), help="The checkout holding the new code.")
    parser.add_argument("--cases", default=",".join(CASES), help="Comma-separated cases: " + ", ".join(CASES))
    parser.add_argument("--data", default=str(REPO.parent / "shared"),
                        help="A folder holding CL_Benchmark/ and generated_data/.")
    parser.add_argument("--keep", default=None, help="Keep both runs' folders here (default: a removed temp dir).")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; use {', '.join(CASES)}")
    base = Path(args.keep or tempfile.mkdtemp(prefix="compare_outputs_")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    old_tree = base / "old_tree"
    if not old_tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_tree), args.old], check=True,
                       capture_output=True)
    failed = 0
    try:
        for case in cases:
            preset, flags = CASES[case]
            sides = {}
            for side, tree in (("old", old_tree), ("new", Path(args.new).resolve())):
                workdir, kept = base / "run" / case, base / side / case
                shutil.rmtree(workdir, ignore_errors=True)
                workdir.mkdir(parents=True)
                run_case(tree, preset, flags, workdir, Path(args.data))
                sides[side] = digests(workdir)
                shutil.rmtree(kept, ignore_errors=True)
                kept.parent.mkdir(parents=True, exist_ok=True)
                workdir.rename(kept)
            problems = compare(sides["old"], sides["new"])
            print(f"{case}: {len(sides['new'])} files, " + ("identical" if not problems else f"{len(problems)} differ"),
                  flush=True)
            for problem in problems:
                print(f"  {problem}")
            failed += bool(problems)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_tree)], capture_output=True)
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"compare_outputs: {len(cases) - failed} of {len(cases)} case(s) identical to {args.old}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
