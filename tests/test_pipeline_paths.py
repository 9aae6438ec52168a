"""Quick pipelines of the two generators that no other test runs end to end (long_t5, superni_llama),
each through paths nothing else runs: `--protocol clean` with `--keep_checkpoints`, and the Trainer's
own `--gradient_checkpointing`. On the session's tiny models, with as few tasks as each check needs
(two for the clean protocol's ā, one for checkpointing), to keep them short."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import BENCHMARK, GENERATED, RELEASE_FOUND, SUPERNI_TASKS
from sapt.backbone import load_tokenizer
from sapt.checkpoint import load_checkpoint, load_routing_mean
from sapt.training.collators import Collator
from sapt.training.data import carve_dev, load_split
from sapt.experiments.pipeline import main as pipeline_main
from sapt.tools.synthetic import SYNTHETIC_ORDERS
from sapt.training.train_task import main as train_task_main

pytestmark = pytest.mark.slow  # every test here runs a pipeline, a training process or several

# The first two tasks of the quick long_t5 pipeline (order 4 of the release, or the synthetic order).
LONG_TASKS = ["mnli", "cb"] if RELEASE_FOUND else SYNTHETIC_ORDERS["Long_Sequence"][:2]
SMALL = ["num_train_epochs=1", "max_train_samples=16", "max_eval_samples=4", "max_predict_samples=4"]


def quick_pipeline(tmp_path, capsys, preset, model, tasks, *extra) -> tuple:
    """Write a quick pipeline of `preset` over `tasks` on `model`, run it, return (its outputs folder, log)."""
    sets = [arg for setting in SMALL for arg in ("--set", setting)]
    argv = [
        "--quick", "--workdir", str(tmp_path), "--output", str(tmp_path / "quick.sh"), "--run_name", "quick",
        "--data_dir", str(BENCHMARK), "--gen_data_root", str(GENERATED), "--model_name_or_path", str(model),
        "--tasks", ",".join(tasks), *sets, *extra,
    ]
    assert pipeline_main(preset, argv) == 0
    script = capsys.readouterr().out.strip().splitlines()[-1]
    done = subprocess.run(["bash", script], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    outputs = tmp_path / "logs_and_outputs" / "quick" / "outputs"
    assert all((outputs / f"{i}-{t}" / "task_complete.json").is_file() for i, t in enumerate(tasks, 1))
    assert "AP   =" in done.stdout  # the pipeline ends by scoring the run
    return outputs, done.stdout


def test_long_t5_quick_pipeline_clean_protocol_keeps_checkpoints(tiny_models, tmp_path, capsys):
    outputs, _ = quick_pipeline(tmp_path, capsys, "long_t5", tiny_models["t5"], LONG_TASKS,
                                "--protocol", "clean", "--set", "keep_checkpoints=true")
    steps = [f"{i}-{t}" for i, t in enumerate(LONG_TASKS, 1)]

    # --keep_checkpoints: each task's last checkpoint (the preset keeps one) stays, light and pickle-free.
    for step in steps:
        kept = list((outputs / step).glob("checkpoint-*"))
        assert len(kept) == 1 and (kept[0] / "trainable.safetensors").is_file(), step
        assert not [p for p in kept[0].rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]

    # --protocol clean: dev is carved out of train (seeded), disjoint from what is left to train on.
    args = json.loads((outputs / steps[1] / "task_args.json").read_text())
    assert args["protocol"] == "clean"
    task, seed = LONG_TASKS[1], args["seed"]
    full = load_split(BENCHMARK, task, "train", seed, args["max_train_samples"])
    train, dev = carve_dev(full, seed=seed)
    assert len(set(full["source"])) == len(full)  # distinct prompts, so comparing prompts compares rows
    assert set(dev["source"]) <= set(full["source"]) and not set(dev["source"]) & set(train["source"])
    released = load_split(BENCHMARK, task, "dev", seed).select(range(args["max_eval_samples"]))
    assert not set(dev["source"]) & set(released["source"])

    # ... and it is the dev the run used: task 2's ā is the mean routing over those rows, not the file's.
    model = load_checkpoint(outputs / steps[1])
    tokenizer = load_tokenizer(str(tiny_models["t5"]), True)
    collator = Collator(tokenizer, True, args["max_source_length"], args["max_target_length"], for_generation=True)

    def mean_over(rows) -> torch.Tensor:
        batch = collator(list(rows))
        with torch.no_grad():
            return model.routing_weights(batch["input_ids"], batch["attention_mask"]).double().mean(0)

    recorded = torch.tensor(load_routing_mean(outputs / steps[1]), dtype=torch.float64)
    carved, in_file = mean_over(dev), mean_over(released)
    assert recorded.shape == (2,)
    torch.testing.assert_close(recorded, carved, rtol=0, atol=1e-6)
    assert (recorded - in_file).abs().max() > 1e-4


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_superni_llama_quick_pipeline_with_gradient_checkpointing(tiny_models, tmp_path, capsys):
    outputs, _ = quick_pipeline(tmp_path, capsys, "superni_llama", tiny_models["llama"], SUPERNI_TASKS[:1],
                                "--set", "gradient_checkpointing=true")
    first = f"1-{SUPERNI_TASKS[0]}"
    config_path = tmp_path / "quick" / f"{first}.json"
    config = json.loads(config_path.read_text())
    assert config["gradient_checkpointing"] is True and config["method"] == "sapt"

    # The same first step without checkpointing (in this process) trains to the same tensors.
    plain = dict(config, gradient_checkpointing=False, output_dir=str(tmp_path / "plain" / first))
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    assert train_task_main([str(tmp_path / "plain.json")]) == 0
    checkpointed = load_file(str(outputs / first / "block.safetensors"))
    reference = load_file(str(tmp_path / "plain" / first / "block.safetensors"))
    assert checkpointed.keys() == reference.keys()
    assert all(reference[n].abs().sum() > 0 for n in reference if n.endswith("lora_B"))  # B starts at zero: it trained
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    results = json.loads((outputs / first / "all_results.json").read_text())
    assert results == pytest.approx(json.loads((tmp_path / "plain" / first / "all_results.json").read_text()))
