"""The router alone, on a real model's embeddings: what the routing losses can and cannot teach it.

    python bench/router_lab.py [--model_name_or_path models/smollm2-135m] [--tasks sst2,agnews,wic]
                               [--steps 24] [--learning_rate 1e-3] [--kl_ratio 2] [--own_block_weight 0]
                               [--arm_target_floor 0] [--optimizer adamw|sgd] [--out FILE]

SAPT's router sees only the max-pooled input embeddings, so its training can be replayed without the
language model: this script builds the project's SaptModel on the backbone, adds one key per task as a
pipeline does (same seeds, same draws), and trains the query network and the new key with the project's
own loss terms (ARM's KL on the earlier tasks' pseudo inputs, sapt.reflection; the own-block loss,
sapt.own_block), on batches of the task's training prompts, for --steps optimizer steps per task.
After each task, ā is measured on the task's dev inputs as train_task does, and every learned task's
test inputs are routed: mean weight on their own block, routing accuracy, centred logit spread.

What it leaves out: cross-entropy. In a real run the task loss also moves the router, but only through
the new block's usefulness (its up-projection starts at zero), so this is the routing losses' own
effect. Each configuration takes seconds, which is what makes sweeps possible on a CPU; the choices it
suggests are then checked with the full pipeline (bench/cl_real.py). See docs/router.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

from sapt.backbone import load_backbone, load_tokenizer  # noqa: E402
from sapt.config import SaptConfig  # noqa: E402
from sapt.model import SaptModel  # noqa: E402
from sapt.own_block import own_block_loss  # noqa: E402
from sapt.reflection import AttentiveReflection, mean_routing  # noqa: E402
from sapt.training.collators import Collator  # noqa: E402
from sapt.training.data import load_pseudo_split, load_split  # noqa: E402
from sapt.training.router_pretraining import prompt_batches  # noqa: E402
from sapt.training.routing_trace import routing_summary  # noqa: E402
from sapt.training.trainer import StepPosition  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_name_or_path", default="models/smollm2-135m")
    parser.add_argument("--data_dir", default="CL_Benchmark")
    parser.add_argument("--gen_data_dir", default="generated_data/lora_gen_long_llama")
    parser.add_argument("--tasks", default="sst2,agnews,wic", help="training order, comma-separated")
    parser.add_argument("--train_samples", type=int, default=64)
    parser.add_argument("--dev_samples", type=int, default=16)
    parser.add_argument("--test_samples", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per task")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--kl_ratio", type=float, default=2.0)
    parser.add_argument("--own_block_weight", type=float, default=0.0)
    parser.add_argument("--arm_target_floor", type=float, default=0.0)
    parser.add_argument("--arm_warmup_steps", type=int, default=0)
    parser.add_argument("--max_source_length", type=int, default=160)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="append the result as one JSON line here")
    return parser.parse_args(argv)


def run(args) -> dict:
    torch.manual_seed(args.seed)
    tasks = [t for t in args.tasks.split(",") if t]
    path = str((REPO_ROOT / args.model_name_or_path) if not Path(args.model_name_or_path).is_absolute() else args.model_name_or_path)
    data_dir = REPO_ROOT / args.data_dir if not Path(args.data_dir).is_absolute() else Path(args.data_dir)
    gen_dir = REPO_ROOT / args.gen_data_dir if not Path(args.gen_data_dir).is_absolute() else Path(args.gen_data_dir)
    backbone = load_backbone(path)
    tokenizer = load_tokenizer(path, False)
    model = SaptModel(backbone, SaptConfig.for_backbone(backbone, path, method="sapt"))
    prompts = Collator(tokenizer, False, args.max_source_length, 16, for_generation=True)
    train = {t: load_split(data_dir, t, "train", args.seed, args.train_samples) for t in tasks}
    dev = {t: load_split(data_dir, t, "dev", args.seed, args.dev_samples) for t in tasks}
    test = {t: prompts([row for row in load_split(data_dir, t, "test", args.seed, args.test_samples)]) for t in tasks}
    pseudo = {t: load_pseudo_split(gen_dir, t, args.seed) for t in tasks[:-1]}
    means: list[list[float]] = []
    after = []
    for position, task in enumerate(tasks):
        if position:
            model.freeze_current_task()
        model.add_task(task, seed=args.seed)
        params = [p for n, p in model.trainable_parameters() if n.startswith("router.")]
        if position and params:
            reflection = AttentiveReflection(
                [pseudo[t] for t in tasks[:position]], means, prompts, args.batch_size, model.num_blocks,
                first_step=args.arm_warmup_steps, target_floor=args.arm_target_floor,
            )
            optimizer = (torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0) if args.optimizer == "adamw"
                         else torch.optim.SGD(params, lr=args.learning_rate))
            for step, batch in enumerate(prompt_batches(train[task], prompts, args.batch_size, args.steps, args.seed + position)):
                loss = torch.zeros(())
                if args.own_block_weight:
                    loss = loss + args.own_block_weight * own_block_loss(model, batch)
                kl = reflection.loss(model, StepPosition(step, 0, 1, 0, 1)) if args.kl_ratio else None
                if kl is not None:
                    loss = loss + args.kl_ratio * kl
                if loss.requires_grad:
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        means.append(mean_routing(model, dev[task], prompts, 16))
        learned = {t: test[t] for t in tasks[: position + 1]}
        after.append({"task": task, "abar": means[-1], "test": routing_summary(model, learned)})
    return {"settings": vars(args), "after": after}


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - start
    for record in result["after"]:
        cells = "  ".join(f"{t} {v['own_weight']:.2f}/{v['accuracy']:.2f}/{v['logit_spread']:.3f}" for t, v in record["test"].items())
        print(f"after {record['task']:<8} own weight/accuracy/spread: {cells}")
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
