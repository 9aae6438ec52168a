"""Every user mistake ends in one line naming the file or argument, exit status 2, no traceback and
nothing written into the task's output folder (sapt.train_task and the gen_script_* generators)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from sapt.experiments import pipeline
from sapt.training.train_task import main

TASKS = ["task1_a", "task2_b", "task3_c"]
ORDER = ",".join(TASKS)


def write_split(path: Path, instances, definition=("Answer yes or no.",)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"Definition": list(definition), "Instances": instances}))


def write_benchmark(root: Path) -> Path:
    """SuperNI layout: <root>/SuperNI/<task>/{train,dev,test}.json, plus pseudo data under <root>/gen."""
    for number, task in enumerate(TASKS):
        for split in ("train", "dev", "test"):
            instances = [{"input": f"{task} {split} {i}", "output": "yes" if i % 2 else "no"} for i in range(6)]
            write_split(root / "data" / "SuperNI" / task / f"{split}.json", instances)
        pseudo = [{"input": f"pseudo {number} {i}", "output": ""} for i in range(2)]
        write_split(root / "gen" / "SuperNI" / task / "train.json", pseudo)
    return root


def task_argv(model_dir, root: Path, task: str, output_dir: Path, *extra: str, previous: Path | None = None):
    argv = [
        "--model_name_or_path", str(model_dir), "--data_dir", str(root / "data"), "--task_order", ORDER,
        "--task", task, "--output_dir", str(output_dir), "--gen_data_dir", str(root / "gen"),
        "--max_train_samples", "4", "--max_eval_samples", "2", "--max_predict_samples", "2",
        "--num_train_epochs", "1", "--max_steps", "1", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2", "--generation_max_length", "2", "--max_source_length", "64",
        "--lora_r", "2", "--disable_tqdm", "true", "--seed", "3",
    ]
    if previous is not None:
        argv += ["--previous_task_dir", str(previous)]
    return argv + list(extra)


@pytest.fixture(scope="module")
def first_task(tiny_models, tmp_path_factory):
    """Data, pseudo data and a real (one-step) first task, built once for this module."""
    root = write_benchmark(tmp_path_factory.mktemp("validation"))
    folder = root / "outputs" / "1-task1_a"
    assert main(task_argv(tiny_models["t5"], root, "task1_a", folder)) == 0
    assert (folder / "task_complete.json").is_file()
    return root, folder


@pytest.fixture
def case(first_task, tiny_models, tmp_path):
    """A private copy of the data and of the first task's folder, and a runner of the second task."""
    root, folder = first_task
    shutil.copytree(root / "data", tmp_path / "data")
    shutil.copytree(root / "gen", tmp_path / "gen")
    previous = tmp_path / "outputs" / "1-task1_a"
    shutil.copytree(folder, previous)
    return Case(tmp_path, previous, tiny_models["t5"])


class Case:
    def __init__(self, root: Path, previous: Path, model_dir: Path):
        self.root, self.previous, self.model_dir = root, previous, model_dir
        self.output = root / "outputs" / "2-task2_b"

    def argv(self, *extra: str, task: str = "task2_b", previous: Path | None | str = "default"):
        previous = self.previous if previous == "default" else previous
        output = self.output if task == "task2_b" else self.root / "outputs" / f"x-{task}"
        return task_argv(self.model_dir, self.root, task, output, *extra, previous=previous)

    def config(self) -> dict:
        return json.loads((self.previous / "sapt_config.json").read_text())

    def edit_config(self, **changes) -> None:
        (self.previous / "sapt_config.json").write_text(json.dumps({**self.config(), **changes}))


def expect_error(capsys, argv, *fragments: str, output: Path | None = None) -> str:
    """Run train_task in-process; exit 2, last stderr line is the one error line holding every fragment,
    no traceback, and no output folder content."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("sapt train_task: error: "), err[-2000:]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    if output is not None:
        assert not output.exists() or not any(output.iterdir()), sorted(output.iterdir())
        assert not (output.parent / "task_order.txt").exists()
    return lines[-1]


# ---- data ---------------------------------------------------------------------------------------
def test_missing_data_folder(capsys, case):
    missing = case.root / "nowhere"
    argv = case.argv(task="task1_a", previous=None) + ["--data_dir", str(missing)]
    expect_error(capsys, argv, "--data_dir", str(missing), "data folder does not exist", output=case.output)


def test_missing_data_dir_argument_uses_default_and_says_so(capsys, case, monkeypatch):
    monkeypatch.chdir(case.root)  # no ./CL_Benchmark here
    argv = case.argv(task="task1_a", previous=None)
    at = argv.index("--data_dir")
    del argv[at : at + 2]
    expect_error(capsys, argv, "--data_dir CL_Benchmark", "data folder does not exist")


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_missing_split_of_current_task(capsys, case, split):
    path = case.root / "data" / "SuperNI" / "task2_b" / f"{split}.json"
    path.unlink()
    expect_error(capsys, case.argv(), str(path), "split file is missing", output=case.output)


def test_missing_test_split_of_earlier_task(capsys, case):
    path = case.root / "data" / "SuperNI" / "task1_a" / "test.json"
    path.unlink()
    expect_error(capsys, case.argv(), str(path), "split file is missing", output=case.output)


def test_malformed_json(capsys, case):
    path = case.root / "data" / "SuperNI" / "task2_b" / "train.json"
    path.write_text('{"Definition": ["x"], "Instances": [')
    expect_error(capsys, case.argv(), str(path), "malformed JSON", output=case.output)


def test_split_that_is_not_utf8(capsys, case):
    path = case.root / "data" / "SuperNI" / "task2_b" / "dev.json"
    path.write_bytes(b"\xff\xfe{\x00")
    expect_error(capsys, case.argv(), str(path), "malformed JSON", output=case.output)


@pytest.mark.parametrize(
    "content,fragment",
    [
        ({"Definition": ["x"]}, "'Instances' list"),
        ([{"input": "a", "output": "b"}], "'Instances' list"),
        ({"Instances": [{"output": "b"}]}, "instance 0 lacks 'input' or 'output'"),
        ({"Instances": [{"input": "a", "output": "b"}, {"input": "a"}]}, "instance 1 lacks 'input' or 'output'"),
        ({"Instances": [{"input": 5, "output": "b"}]}, "instance 0 has a non-text 'input' or 'output'"),
        ({"Instances": [{"input": "a", "output": [1]}]}, "instance 0 has a non-text 'input' or 'output'"),
        ({"Definition": [3], "Instances": [{"input": "a", "output": "b"}]}, "'Definition' must be"),
        ({"Instances": [{"input": "a", "output": ""}]}, "instance 0 has an empty output"),
    ],
    ids=["no-instances", "not-an-object", "no-input", "no-output", "non-string-input", "non-string-output",
         "bad-definition", "empty-output"],
)
def test_wrong_schema(capsys, case, content, fragment):
    path = case.root / "data" / "SuperNI" / "task2_b" / "train.json"
    path.write_text(json.dumps(content))
    expect_error(capsys, case.argv(), str(path), fragment, output=case.output)


def test_empty_split(capsys, case):
    path = case.root / "data" / "SuperNI" / "task2_b" / "test.json"
    write_split(path, [])
    expect_error(capsys, case.argv(), str(path), "split has no instances", output=case.output)


def test_unknown_task_in_order(capsys, case):
    argv = case.argv(task="task1_a", previous=None) + ["--task_order", "task1_a,task9_missing"]
    expect_error(capsys, argv, "--task_order", "unknown task 'task9_missing'")


def test_repeated_task_in_order(capsys, case):
    argv = case.argv(task="task1_a", previous=None) + ["--task_order", "task1_a,task2_b,task1_a"]
    expect_error(capsys, argv, "--task_order", "repeats task1_a")


def test_task_not_in_order(capsys, case):
    argv = case.argv(task="task1_a", previous=None) + ["--task", "task3_c", "--task_order", "task1_a,task2_b"]
    expect_error(capsys, argv, "--task 'task3_c'", "not in --task_order")


# ---- arguments ----------------------------------------------------------------------------------
def test_bad_number_argument(capsys, case):
    expect_error(capsys, case.argv("--max_train_samples", "0"), "--max_train_samples 0", "at least 1", output=case.output)


def test_bad_choice_is_one_line(capsys, case):
    expect_error(capsys, case.argv("--method", "nope"), "--method", "invalid choice", output=case.output)


def test_unknown_flag_is_one_line(capsys, case):
    expect_error(capsys, case.argv("--no_such_flag", "1"), "--no_such_flag", output=case.output)


def test_missing_backbone(capsys, case):
    argv = case.argv() + ["--model_name_or_path", str(case.root / "no_model")]
    expect_error(capsys, argv, "--model_name_or_path", "no_model", output=case.output)


def test_config_file_with_unknown_key(capsys, case):
    config = case.root / "task.json"
    config.write_text(json.dumps({"model_name_or_path": str(case.model_dir), "task_order": ORDER, "task": "task1_a",
                                  "output_dir": str(case.output), "learning_rate": "fast"}))
    expect_error(capsys, [str(config)], str(config), "learning_rate=\"fast\"", "expected a number", output=case.output)


def test_config_file_that_is_not_an_object(capsys, case):
    config = case.root / "task.json"
    config.write_text("[1, 2]")
    expect_error(capsys, [str(config)], str(config), "expected a JSON object")


# ---- the earlier task's artifacts ---------------------------------------------------------------
def test_previous_task_dir_argument_missing(capsys, case):
    expect_error(capsys, case.argv(previous=None), "--previous_task_dir is required", output=case.output)


def test_previous_folder_missing(capsys, case):
    missing = case.root / "outputs" / "1-nothing"
    expect_error(capsys, case.argv(previous=missing), "--previous_task_dir", str(missing), "does not exist",
                 output=case.output)


def test_previous_task_incomplete(capsys, case):
    (case.previous / "task_complete.json").unlink()
    expect_error(capsys, case.argv(), str(case.previous), "did not finish", "task_complete.json", output=case.output)


def test_previous_task_other_model_type(capsys, case, tiny_models):
    argv = case.argv() + ["--model_name_or_path", str(tiny_models["llama"])]
    expect_error(capsys, argv, str(case.previous), "model_type='t5'", "'llama'", output=case.output)


def test_previous_task_other_width(capsys, case):
    case.edit_config(hidden_size=64)
    expect_error(capsys, case.argv(), str(case.previous), "hidden_size=64", "32", output=case.output)


def test_previous_task_other_rank(capsys, case):
    expect_error(capsys, case.argv("--lora_r", "3"), str(case.previous), "r=2", "has 3", output=case.output)


def test_previous_task_other_target_modules(capsys, case):
    expect_error(capsys, case.argv("--target_modules", "q"), str(case.previous), "target_modules=['q', 'v']",
                 output=case.output)


def test_previous_task_other_method(capsys, case):
    expect_error(capsys, case.argv("--method", "o_lora"), str(case.previous), "method='sapt'", "'o_lora'",
                 output=case.output)


def test_previous_task_holds_other_tasks(capsys, case):
    argv = case.argv(task="task3_c")
    expect_error(capsys, argv, str(case.previous), "holds tasks ['task1_a']")


def test_config_with_wrong_type(capsys, case):
    case.edit_config(r="2")
    expect_error(capsys, case.argv(), str(case.previous / "sapt_config.json"), "r '2': expected an integer", output=case.output)


def test_config_not_an_object(capsys, case):
    (case.previous / "sapt_config.json").write_text('"t5"')
    expect_error(capsys, case.argv(), str(case.previous / "sapt_config.json"), "expected a JSON object",
                 output=case.output)


def test_lineage_not_an_object(capsys, case):
    (case.previous / "lineage.json").write_text("[1, 2]")
    expect_error(capsys, case.argv(), str(case.previous / "lineage.json"), "expected {'blocks'", output=case.output)


def test_block_file_not_safetensors(capsys, case):
    (case.previous / "block.safetensors").write_bytes(b"this is not a tensor file at all")
    expect_error(capsys, case.argv(), str(case.previous / "block.safetensors"), "unreadable safetensors",
                 output=case.output)


def test_router_file_missing(capsys, case):
    (case.previous / "router.safetensors").unlink()
    expect_error(capsys, case.argv(), str(case.previous / "router.safetensors"), "file is missing", output=case.output)


def test_routing_mean_not_a_distribution(capsys, case):
    (case.previous / "routing_mean.json").write_text('{"tasks": ["task1_a"], "weights": [NaN]}')
    expect_error(capsys, case.argv(), str(case.previous / "routing_mean.json"), "not a probability distribution",
                 output=case.output)


def test_output_dir_is_the_previous_folder(capsys, case):
    argv = case.argv() + ["--output_dir", str(case.previous)]
    expect_error(capsys, argv, "--output_dir", "earlier task's folder")
    assert (case.previous / "task_complete.json").is_file()


# ---- pseudo data for ARM -------------------------------------------------------------------------
def test_pseudo_data_missing_for_earlier_task(capsys, case):
    shutil.rmtree(case.root / "gen" / "SuperNI" / "task1_a")
    line = expect_error(capsys, case.argv(), str(case.root / "gen"), "no pseudo data for earlier task 'task1_a'",
                        "--no_reflection", output=case.output)
    assert "without ARM" in line


def test_pseudo_data_folder_missing(capsys, case):
    argv = case.argv() + ["--gen_data_dir", str(case.root / "no_gen")]
    expect_error(capsys, argv, "--gen_data_dir", "no_gen", "--no_reflection", output=case.output)


def test_pseudo_data_malformed(capsys, case):
    path = case.root / "gen" / "SuperNI" / "task1_a" / "train.json"
    path.write_text("{")
    expect_error(capsys, case.argv(), str(path), "malformed JSON", "--no_reflection", output=case.output)


def test_no_reflection_trains_without_pseudo_data(capsys, case):
    shutil.rmtree(case.root / "gen")
    assert main(case.argv("--no_reflection", "true")) == 0, capsys.readouterr().err[-2000:]
    assert (case.output / "task_complete.json").is_file()


# ---- the generators ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["--order", "9"], ["argument --order", "invalid choice: '9'"]),
        (["--method", "nope"], ["argument --method", "invalid choice: 'nope'"]),
        (["--set", "learning_rate"], ["--set expects KEY=VALUE", "'learning_rate'"]),
        (["--set", "no_such_argument=1"], ["--set no_such_argument=1", "unknown train_task argument"]),
        (["--set", "learning_rate=fast"], ["--set learning_rate=\"fast\"", "expected a number"]),
        (["--set", "max_train_samples=1.5"], ["--set max_train_samples=1.5", "expected an integer"]),
        (["--set", "lora_r=0"], ["--set lora_r=0", "expected an integer of at least 1"]),
        (["--set", "replay_ratio=0"], ["--set replay_ratio=0", "expected a number in (0, 1]"]),
    ],
    ids=["unknown-order", "unknown-method", "set-without-value", "set-unknown-key", "set-wrong-type", "set-not-int",
         "set-out-of-range", "set-open-end"],
)
def test_generator_arguments(capsys, tmp_path, argv, fragments):
    output = tmp_path / "pipeline.sh"
    with pytest.raises(SystemExit) as info:
        pipeline.main("superni_t5", [*argv, "--output", str(output)])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gen_script_superni_t5.py: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0]
    assert not output.exists() and not output.with_suffix("").exists()


# ---- the real entry points, in a subprocess -------------------------------------------------------
@pytest.mark.slow
def test_subprocess_train_task_one_line_no_traceback(case):
    (case.previous / "lineage.json").write_text('"not an object"')
    done = subprocess.run(
        [sys.executable, "-m", "sapt", "train_task", *case.argv()], capture_output=True, text=True, cwd=REPO_ROOT,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("sapt train_task: error: ") and "lineage.json" in lines[-1]
    assert not case.output.exists()


def test_subprocess_generator_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "gen_script_long_t5.py"), "--order", "42", "--output", str(tmp_path / "p.sh")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "argument --order" in done.stderr and "Traceback" not in done.stderr


def test_backbone_folder_without_tokenizer(capsys, case, tmp_path):
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (case.model_dir / name).is_file():
            shutil.copy(case.model_dir / name, bare / name)
    argv = case.argv() + ["--model_name_or_path", str(bare)]
    expect_error(capsys, argv, "--model_name_or_path", str(bare), "no usable tokenizer", output=case.output)


def test_backbone_family_without_q_and_v_projections(capsys, case, tmp_path):
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(case.model_dir, gpt2, ignore=shutil.ignore_patterns("config.json", "*.safetensors"))
    GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=96).save_pretrained(gpt2)  # attention is one Conv1D c_attn
    expect_error(capsys, case.argv(previous=None, task="task1_a") + ["--model_name_or_path", str(gpt2)],
                 "--model_name_or_path", "gpt2 model has no nn.Linear named q_proj, v_proj", "--target_modules")
