"""Test-set prediction as every task step does it: generate, score, record each input's routing.

`sapt.train_task` calls `predict_tests` after training a task; `sapt.evaluate` calls the same function
on a finished run, optionally with the routing replaced (oracle, uniform, mean).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..model import SaptModel
from ..run_files import PREDICTIONS_DIR, ROUTING_KEY, result_key
from ..utils.fileio import write_jsonl_atomic
from .collators import Collator
from .data import load_split
from .metrics import compute_metrics

logger = logging.getLogger("sapt")


def decode(tokenizer, token_ids: np.ndarray) -> list[str]:
    token_ids = np.where(token_ids < 0, tokenizer.pad_token_id, token_ids)
    return [text.strip() for text in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


def generation_settings(max_new_tokens: int | None, num_beams: int | None) -> dict:
    """How dev and test inputs are decoded: greedy, the release's 50 new tokens unless set."""
    return {"max_new_tokens": max_new_tokens or 50, "num_beams": num_beams or 1, "do_sample": False}


def load_test_sets(data_dir, tasks: list[str], seed: int, max_samples: int | None) -> dict:
    return {task: load_split(data_dir, task, "test", seed, max_samples) for task in tasks}


@torch.no_grad()
def input_routing(model: SaptModel, dataset, collator: Collator, batch_size: int) -> list[list[float]]:
    """Each example's routing distribution, oldest block first, in the dataset's order.

    Sharded as reflection.mean_routing (every process runs the same number of forwards, which ZeRO-3
    needs), then gathered, so every process gets every row. With one process the batches are those
    of `trainer.predict`, so the rows are the weights generation used even under `pool_padding`
    (which makes them depend on the batch)."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    length = -(-len(dataset) // world)
    shard = list(range(rank, len(dataset), world))
    shard += [0] * (length - len(shard))  # repeats of example 0, cut off below
    rows = []
    for start in range(0, length, batch_size):
        batch = collator([dataset[i] for i in shard[start : start + batch_size]])
        weights = model.routing_weights(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
        rows.append(weights.float())
    mine = torch.cat(rows)  # (length, T)
    if world > 1:
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        mine = torch.stack(every, dim=1).flatten(0, 1)  # example k*world + r is row k of process r
    return mine[: len(dataset)].cpu().tolist()


@dataclass
class FixedRouting:
    """A generation collator whose batches carry `routing_weights`, the same for every input, which
    SaptModel.generate then uses instead of the router's. Only sapt.evaluate builds one."""

    collator: Collator
    weights: list[float]  # oldest block first

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(examples)
        batch["routing_weights"] = torch.tensor([self.weights] * len(examples), dtype=torch.float32)
        return batch


@dataclass
class TestPredictions:
    results: dict  # the predict_* keys of all_results.json
    records: dict  # task -> one record per test input: index, target, prediction (and routing)
    mean_routing: dict  # task -> mean routing weights over its test inputs (routed models only)


def predict_tests(
    trainer, model: SaptModel, tokenizer, tests: dict, replaced_routing: dict | None = None
) -> TestPredictions:
    """Generate on every test set with `trainer` (a SaptTrainer) and score it. Every process calls this.
    The router alone decides each input's routing, unless `replaced_routing` ({task: weights, oldest
    block first}; passed by sapt.evaluate only) fixes it for every input of a task."""
    collator, batch_size = trainer.generation_collator, trainer.args.per_device_eval_batch_size
    results, records, means, per_task = {}, {}, {}, []
    for task, test in tests.items():
        logger.info("predicting %s (%d examples)", task, len(test))
        routing = None
        if replaced_routing is not None:
            routing = [list(replaced_routing[task])] * len(test)
            trainer.generation_collator = FixedRouting(collator, routing[0])
        elif model.router is not None:
            routing = input_routing(model, test, collator, batch_size)
        try:
            output = trainer.predict(test)
        finally:
            trainer.generation_collator = collator
        texts = decode(tokenizer, output.predictions)
        order_in_split = [int(i) for i in output.label_ids.reshape(-1)]
        references = [test[i]["target"] for i in order_in_split]
        scores = compute_metrics(texts, references)
        per_task.append(scores)
        results[result_key("exact_match", task)] = scores["exact_match"]
        results[result_key("rougeL", task)] = scores["rougeL"]
        records[task] = [
            {"index": i, "target": ref, "prediction": text} for i, ref, text in zip(order_in_split, references, texts)
        ]
        if routing is not None:
            for record in records[task]:
                record[ROUTING_KEY] = routing[record["index"]]
            means[task] = torch.tensor(routing, dtype=torch.float64).mean(0).float().tolist()
    results["predict_exact_match"] = round(sum(s["exact_match"] for s in per_task) / len(per_task), 4)
    results["predict_eval_rougeL"] = round(sum(s["rougeL"] for s in per_task) / len(per_task), 4)
    return TestPredictions(results, records, means)


def write_predictions(output_dir: str | Path, records: dict) -> None:
    for task, rows in records.items():
        write_jsonl_atomic(Path(output_dir) / PREDICTIONS_DIR / f"{task}.jsonl", rows)
