"""The generators check, before they write anything, every file the pipeline's steps will read and the model:
a mistake is one line and exit status 2 in a second, not a failure hours into a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, write_model_folder, write_task_files

LONG = json.loads((REPO_ROOT / "configs" / "orders.json").read_text())["Long_Sequence"]
LONG_TASKS = sorted({task for order in LONG.values() for task in order})


@pytest.fixture
def this_copy(tmp_path) -> Path:
    """A workdir whose benchmark is complete except that yelp has only its training split (as in the copy of
    the release these checks were written against), with pseudo samples for long_t5 and a model folder."""
    write_task_files(tmp_path / "CL_Benchmark", "Long_Sequence", [t for t in LONG_TASKS if t != "yelp"])
    write_task_files(tmp_path / "CL_Benchmark", "Long_Sequence", ["yelp"], splits=("train",))
    write_task_files(tmp_path / "generated_data" / "lora_gen_long_t5", "Long_Sequence", LONG_TASKS, splits=("pseudo",))
    write_model_folder(tmp_path / "models" / "smollm2-135m")
    return tmp_path


def generate(workdir: Path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "gen_script_long_t5.py"), "--workdir", str(workdir), "--output", "p.sh", *args],
        capture_output=True, text=True, cwd=workdir, timeout=120, env=env,
    )


def assert_refused(done: subprocess.CompletedProcess, workdir: Path, *fragments: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("gen_script_long_t5.py: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (workdir / "p.sh").exists() and not (workdir / "p").exists()


def test_the_fixture_passes(this_copy):
    done = generate(this_copy, "--order", "4", "--tasks", "sst2,cb", "--model_name_or_path", "models/smollm2-135m")
    assert done.returncode == 0, done.stderr
    assert f"model: the folder {this_copy / 'models' / 'smollm2-135m'}" in done.stdout
    assert (this_copy / "p.sh").is_file()


def test_a_task_without_its_dev_and_test_files(this_copy):
    done = generate(this_copy, "--tasks", "sst2,yelp", "--model_name_or_path", "models/smollm2-135m")
    assert_refused(done, this_copy, f"{this_copy}/CL_Benchmark/Long_Sequence/yelp/dev.json: split file is missing",
                   "step 2-yelp reads it")


@pytest.mark.parametrize("order", ["4", "5", "6"])
def test_an_order_whose_data_is_incomplete(this_copy, order):
    done = generate(this_copy, "--order", order, "--model_name_or_path", "models/smollm2-135m")
    assert_refused(done, this_copy, "yelp/dev.json: split file is missing")


def test_the_clean_protocol_reads_no_dev_file(this_copy):
    (this_copy / "CL_Benchmark" / "Long_Sequence" / "cb" / "dev.json").unlink()
    base = ["--tasks", "sst2,cb", "--model_name_or_path", "models/smollm2-135m"]
    assert_refused(generate(this_copy, *base), this_copy, "cb/dev.json: split file is missing")
    assert generate(this_copy, *base, "--protocol", "clean").returncode == 0


def test_a_split_file_that_does_not_parse(this_copy):
    (this_copy / "CL_Benchmark" / "Long_Sequence" / "cb" / "test.json").write_text('{"Instances": [')
    done = generate(this_copy, "--tasks", "sst2,cb", "--model_name_or_path", "models/smollm2-135m")
    assert_refused(done, this_copy, "cb/test.json: malformed JSON")


def test_a_misspelt_task_gets_a_suggestion_and_the_list(this_copy):
    done = generate(this_copy, "--tasks", "sst,cb", "--model_name_or_path", "models/smollm2-135m")
    assert_refused(done, this_copy, "no task folder named 'sst'", "did you mean 'sst2'?", "tasks there: agnews, amazon")


def test_missing_pseudo_samples_unless_the_pipeline_writes_them(this_copy):
    (this_copy / "generated_data" / "lora_gen_long_t5" / "Long_Sequence" / "sst2" / "train.json").unlink()
    base = ["--tasks", "sst2,cb", "--model_name_or_path", "models/smollm2-135m"]
    assert_refused(generate(this_copy, *base), this_copy, "sst2/train.json: split file is missing", "--pseudo_data")
    assert generate(this_copy, *base, "--pseudo_data", "regenerate").returncode == 0
    assert generate(this_copy, *base, "--method", "seq_lora").returncode == 0  # no ARM, no pseudo samples


def test_a_missing_model_folder(this_copy):
    done = generate(this_copy, "--tasks", "sst2,cb", "--model_name_or_path", "models/smollm2-135M")
    assert_refused(done, this_copy, "models/smollm2-135M: no such folder under",
                   f"did you mean {this_copy / 'models' / 'smollm2-135m'}?")
    done = generate(this_copy, "--tasks", "sst2,cb", "--model_name_or_path", str(this_copy / "nowhere"))
    assert_refused(done, this_copy, f"{this_copy / 'nowhere'}: no such folder")


def test_a_model_folder_without_a_tokenizer(this_copy):
    (this_copy / "models" / "smollm2-135m" / "tokenizer.json").unlink()
    done = generate(this_copy, "--tasks", "sst2,cb", "--model_name_or_path", "models/smollm2-135m")
    assert_refused(done, this_copy, "no tokenizer")


def test_a_hub_model_only_from_the_local_cache(this_copy, tmp_path_factory):
    """A hub name is accepted when the local cache holds its config and tokenizer; nothing is downloaded."""
    cache = tmp_path_factory.mktemp("hf_cache")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0"}
    done = generate(this_copy, "--tasks", "sst2,cb", "--model_name_or_path", "some-org/some-model", env=env)
    assert_refused(done, this_copy, "some-org/some-model: no such folder", f"local Hugging Face cache ({cache})",
                   "hf download some-org/some-model")
    snapshot = cache / "models--some-org--some-model" / "snapshots" / ("0" * 40)
    write_model_folder(snapshot)
    (cache / "models--some-org--some-model" / "refs").mkdir()
    (cache / "models--some-org--some-model" / "refs" / "main").write_text("0" * 40)
    done = generate(this_copy, "--tasks", "sst2,cb", "--model_name_or_path", "some-org/some-model", env=env)
    assert done.returncode == 0, done.stderr
    assert f"model: some-org/some-model in the local Hugging Face cache ({snapshot})" in done.stdout


def test_quick_mode_builds_its_model_so_none_is_required(this_copy):
    done = generate(this_copy, "--quick", "--tasks", "sst2,cb")
    assert done.returncode == 0, done.stderr
    assert "model: a tiny random t5 model, which the pipeline builds first" in done.stdout


def test_no_data_folder_at_all(tmp_path):
    done = generate(tmp_path, "--quick")
    assert_refused(done, tmp_path, f"{tmp_path / 'CL_Benchmark'}: data folder does not exist", "make data")
