"""The routing trace: how the router's choices move while a task trains (`routing_trace.jsonl`).

At the start, every `every` optimizer steps and at each evaluation, a few dev inputs of every task
learned so far (the current one included) go through embeddings -> router only (no LM forward), and
one JSON line is appended to the task's folder:

    {"step": 20, "epoch": 2.5, "event": "step",
     "tasks": {"sst2": {"own_weight": .., "accuracy": .., "logit_spread": .., "new_block_weight": ..}, ...},
     "losses": {"ce": .., "arm": .., "own_block": ..}}

Per task j (its block is the j-th, oldest first) over its probe inputs x:
- own_weight: the mean of a_j(x), the weight on its own block;
- accuracy: the share of inputs whose largest weight is on block j;
- logit_spread: how much the routing depends on the input: the standard deviation across inputs of
  each block's logit, centred per input (logits minus their mean over blocks, which the softmax
  ignores), averaged over blocks;
- new_block_weight: the mean of a_t(x), t the block being trained.
`losses` holds the means of CE and of each extra term's unweighted value (ARM's KL, the own-block
loss) over the micro-batches since the previous line ({} at the start).

Under router pretraining (sapt.training.router_pretraining) a line with event "before_pretraining" comes
first; "start" then shows the pretrained router. A resumed task drops the lines written after its
checkpoint, so the file ends up as one uninterrupted run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..router import to_weights
from ..run_files import ROUTING_TRACE_FILE
from ..utils.fileio import read_jsonl_prefix as read_trace
from ..utils.fileio import write_text_atomic


@torch.no_grad()
def routing_summary(model, probes: dict[str, dict]) -> dict[str, dict]:
    """The per-task numbers of one trace line. `probes`: task -> a collated batch of its inputs, in the
    order the tasks were learned (the i-th task owns block i)."""
    summary = {}
    for block, (task, batch) in enumerate(probes.items()):
        ids = batch["input_ids"].to(model.device)
        mask = batch["attention_mask"].to(model.device)
        logits = model.routing_logits(ids, mask).float()  # (B, T)
        weights = to_weights(logits)
        centred = logits - logits.mean(dim=-1, keepdim=True)
        summary[task] = {
            "own_weight": weights[:, block].mean().item(),
            "accuracy": weights.argmax(dim=-1).eq(block).float().mean().item(),
            "logit_spread": centred.std(dim=0, unbiased=False).mean().item(),
            "new_block_weight": weights[:, -1].mean().item(),
        }
    return summary


class RoutingTrace(TrainerCallback):
    """Appends trace lines while a routed task trains; see the module's docstring."""

    def __init__(self, model, probes: dict[str, dict], every: int, output_dir: Path, term_log, write: bool = True):
        self.model = model
        self.probes = probes
        self.every = every
        self.path = Path(output_dir) / ROUTING_TRACE_FILE
        self.term_log = term_log
        self.write = write  # rank 0 writes; every process routes (ZeRO-3 gathers the router collectively)

    def begin(self, resumed_step: int) -> None:
        """Before anything trains: a fresh task starts an empty file (a killed attempt's lines go), a
        resumed one keeps the lines up to its checkpoint's step."""
        if self.write:
            kept = [r for r in read_trace(self.path) if r["step"] <= resumed_step] if resumed_step and self.path.is_file() else []
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def record(self, step: int, epoch: float, event: str) -> None:
        tasks = routing_summary(self.model, self.probes)
        losses = self.term_log.take() if event == "step" or event == "evaluate" else {}
        if not self.write:
            return
        line = {"step": step, "epoch": epoch, "event": event, "tasks": tasks, "losses": losses}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(line) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.global_step:
            self.record(0, 0.0, "start")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.record(state.global_step, state.epoch or 0.0, "step")

    def on_evaluate(self, args, state, control, **kwargs):
        self.record(state.global_step, state.epoch or 0.0, "evaluate")
