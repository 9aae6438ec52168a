"""A plain `pip install` (not editable): generators write, and pipelines run, where the user is (issue 11).

The package is built from a copy of the checkout (so the build's `build/` and `*.egg-info` stay out of
it) and installed with `pip install --no-deps --no-build-isolation --no-index` into a fresh virtual
environment that sees the system's site-packages (torch, transformers, ...): no network. The venv's own
site-packages comes before the system's on sys.path, so its `sapt` wins over an editable install of
any checkout; PYTHONPATH is dropped, since it would put a checkout first. The generator is the
checkout's `gen_script_superni_t5.py` run by the venv's python, as a user runs it: it does not touch
sys.path, and the checkout's top level holds no `sapt` package, so it imports the installed one (the
DeepSpeed config path it writes proves it).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BENCHMARK, GENERATED, REPO_ROOT, SUPERNI_TASKS, write_model_folder
from sapt.tools import prepare_data, tiny

RUN = "install_check"
SMALL = ["num_train_epochs=1", "max_train_samples=8", "max_eval_samples=4", "max_predict_samples=4"]
# Written by git, Python and the test tools, whatever runs.
CACHES = {".git", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", ".mypy_cache"}


def files_under(root: Path) -> set[Path]:
    """Every file below root (links not followed), caches aside."""
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in CACHES]
        found.update(Path(folder, name).relative_to(root) for name in files)
    return found


def install_into_venv(tmp_path: Path) -> tuple[Path, Path]:
    """(the venv's python, its site-packages) with this checkout installed as a plain wheel would be."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    shutil.copytree(REPO_ROOT / "configs", source / "configs", symlinks=True)  # the top-level link, as checked out
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, env=venv_env(venv), check=True).stdout.strip())
    assert purelib.is_relative_to(venv)
    if sys.prefix != sys.base_prefix:  # run from a venv: the new one's system site is the base's, so add this one's
        (purelib / "test_runner_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet", str(source)],
        capture_output=True, text=True, env=venv_env(venv), timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]  # needs setuptools (the build backend) importable here
    return python, purelib


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    return install_into_venv(tmp_path_factory.mktemp("install"))


def venv_env(venv: Path, activated: bool = True) -> dict:
    """The environment of a venv's python, activated (its bin/ first on PATH) or not (PATH as it was)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    path = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}" if activated else env.get("PATH", "")
    return {**env, "PATH": path, "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1"}


def inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


@pytest.mark.slow
def test_a_plain_install_writes_and_runs_everything_where_the_user_is(installed, tmp_path):
    python, purelib = installed
    env = venv_env(python.parent.parent, activated=False)  # called by its path, as `venv/bin/python gen_script...`
    where = subprocess.run([str(python), "-c", "import sapt.experiments.pipeline as p; print(p.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, check=True).stdout.strip()
    assert inside(where, purelib) and not inside(where, REPO_ROOT), where
    on_path = shutil.which("python", path=env["PATH"])
    assert on_path is None or Path(on_path).parent != python.parent  # not the venv's: the pipeline must name it
    packaged = purelib / "sapt" / "experiments" / "configs"
    shipped = {str(p.relative_to(packaged)): p.read_bytes() for p in packaged.rglob("*.json")}
    assert sorted(shipped) == ["ds_configs/zero2.json", "ds_configs/zero3.json", "orders.json", "presets.json"]
    assert shipped == {name: (REPO_ROOT / "configs" / name).read_bytes() for name in shipped}
    manifest = Path("src/sapt/tools/manifest.json")  # the release's hashes, read by `make data`
    assert (purelib / "sapt" / "tools" / "manifest.json").read_bytes() == (REPO_ROOT / manifest).read_bytes()
    specs = Path("src/sapt/benchmarks.json")  # the benchmark specs, read by data loading and scoring
    assert (purelib / "sapt" / "benchmarks.json").read_bytes() == (REPO_ROOT / specs).read_bytes()

    repo_before, site_before = files_under(REPO_ROOT), files_under(purelib)
    work = tmp_path / "work"  # an empty folder elsewhere: no --workdir, no --output
    work.mkdir()
    sets = [arg for setting in SMALL for arg in ("--set", setting)]
    generate = subprocess.run(
        [str(python), str(REPO_ROOT / "gen_script_superni_t5.py"), "--quick", "--tasks", ",".join(SUPERNI_TASKS),
         "--data_dir", str(BENCHMARK), "--gen_data_root", str(GENERATED), "--run_name", RUN, *sets],
        capture_output=True, text=True, env=env, cwd=work, timeout=300,
    )
    assert generate.returncode == 0, generate.stderr[-3000:]
    script = work / "scripts" / "generated" / f"{RUN}.sh"
    assert generate.stdout.strip().splitlines()[-1] == str(script)
    text = script.read_text()
    assert f"\ncd {work}\nPYTHON={python}\n" in text and '"$PYTHON" -m sapt score "$RUN"\n' in text
    assert str(REPO_ROOT) not in text

    # A LoRA pipeline with DeepSpeed (written, not run): its config names the installed package's file.
    deepspeed = subprocess.run(
        [str(python), str(REPO_ROOT / "gen_script_superni_llama.py"), "--run_name", "ds", "--deepspeed", "zero2",
         "--data_dir", str(BENCHMARK), "--gen_data_root", str(GENERATED), "--tasks", ",".join(SUPERNI_TASKS),
         "--model_name_or_path", str(write_model_folder(tmp_path / "model", "llama"))],
        capture_output=True, text=True, env=env, cwd=work, timeout=300,
    )
    assert deepspeed.returncode == 0, deepspeed.stderr[-3000:]
    ds_config = json.loads(next((work / "scripts" / "generated" / "ds").glob("1-*.json")).read_text())["deepspeed"]
    assert ds_config == str((packaged / "ds_configs" / "zero2.json").resolve())

    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "AP   =" in done.stdout

    outputs = work / "logs_and_outputs" / RUN / "outputs"
    steps = [f"{i}-{task}" for i, task in enumerate(SUPERNI_TASKS, 1)]
    assert all((outputs / step / "task_complete.json").is_file() for step in steps)
    assert json.loads((work / "results" / f"{RUN}.json").read_text())["task_names"] == SUPERNI_TASKS
    assert (work / "tiny_models" / "t5" / "model.safetensors").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["logs_and_outputs", "results", "scripts", "tiny_models"]
    # Every path a task step was given is the user's input or lies in the work folder (relative paths are).
    for config in (work / "scripts" / "generated" / RUN).glob("*.json"):
        for key in ("data_dir", "gen_data_dir", "model_name_or_path", "output_dir", "previous_task_dir"):
            value = json.loads(config.read_text()).get(key)
            if value is not None:
                assert inside(work / value, work) or value.startswith((str(BENCHMARK), str(GENERATED))), (key, value)

    # Nothing new in the checkout. Sources (.py, .md) are left out: people may be editing it meanwhile, and
    # a pipeline writes none (its files are .sh, .json, .jsonl, .txt, .png, .safetensors).
    new = {path for path in files_under(REPO_ROOT) - repo_before if path.suffix not in (".py", ".md")}
    assert new == set()
    assert files_under(purelib) == site_before  # nor in the installed package


@pytest.mark.slow
def test_pseudo_data_entry_point_runs_from_the_install(installed, tmp_path):
    """The module a regenerating pipeline calls (`python -m sapt pseudo_data`) answers from the install."""
    python, _ = installed
    done = subprocess.run(
        [str(python), "-m", "sapt", "pseudo_data", "--model_name_or_path", "nowhere", "--data_dir", str(BENCHMARK),
         "--tasks", "task_nope", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=venv_env(python.parent.parent), cwd=tmp_path, timeout=300,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith("sapt pseudo_data: error: ") and "task_nope" in lines[-1]
    assert not (tmp_path / "out").exists()


def test_default_data_source_is_read_beside_the_working_directory(tmp_path, monkeypatch, caplog):
    """`make data` and `sapt.tiny` look for ../shared beside where they run, not beside the package."""
    monkeypatch.delenv(prepare_data.SOURCE_ENV, raising=False)
    monkeypatch.delenv(tiny.DEPRECATED_DATA_ENV, raising=False)
    (tmp_path / "shared" / "CL_Benchmark").mkdir(parents=True)
    (tmp_path / "clone").mkdir()
    monkeypatch.chdir(tmp_path / "clone")
    assert prepare_data.default_source() == tmp_path / "shared"
    assert prepare_data.find_source() == tmp_path / "shared"
    assert tiny.default_data_dir() == tmp_path / "shared" / "CL_Benchmark"
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")  # no ../shared here
    assert tiny.default_data_dir() is None

    # One variable names the data: $SAPT_DATA_SOURCE (the release folder) wins over ../shared ...
    other = tmp_path / "release"
    (other / "CL_Benchmark").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "clone")
    monkeypatch.setenv(prepare_data.SOURCE_ENV, str(other))
    assert tiny.default_data_dir() == other / "CL_Benchmark"
    # ... and the old $SAPT_DATA_DIR (CL_Benchmark itself) is read only without it.
    old = tmp_path / "old" / "CL_Benchmark"
    old.mkdir(parents=True)
    monkeypatch.setenv(tiny.DEPRECATED_DATA_ENV, str(old))
    assert tiny.default_data_dir() == other / "CL_Benchmark"
    assert "deprecated" not in caplog.text
    monkeypatch.delenv(prepare_data.SOURCE_ENV)
    assert tiny.default_data_dir() == old
    assert f"${tiny.DEPRECATED_DATA_ENV} is deprecated" in caplog.text


def test_console_scripts_run_from_the_install(installed, tmp_path):
    """`sapt COMMAND` (pyproject's one script) is installed beside the venv's python and runs it."""
    python, _ = installed
    env = venv_env(python.parent.parent, activated=False)
    done = subprocess.run([str(python.parent / "sapt"), "score", "no_such_run"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("score.py: error: run 'no_such_run' not found"), done.stderr
    listed = subprocess.run([str(python.parent / "sapt")], capture_output=True, text=True, env=env, timeout=300)
    assert listed.returncode == 0 and "generate" in listed.stdout and "train_task" in listed.stdout, listed.stderr
