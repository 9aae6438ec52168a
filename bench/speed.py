"""Speed and memory of SAPT-LoRA against plain LoRA (peft) and a per-task-loop reference.

    python bench/speed.py [--smoke] [--repeats 5] [--batch 8] [--seq 256] [--threads N] [--json OUT]
                          [--device cpu|cuda] [--bf16] [--models t5,llama]
                          [--growth 1,10,20,30,45,60] [--growth-models smollm2]

Models (random weights built from a config, nothing is downloaded):
  t5     t5-small's shape: d_model 512, d_ff 2048, 6+6 layers, 8 heads, d_kv 64, vocab 32128.
         A step sees batch x 256 source tokens and batch x 64 target tokens.
  llama  hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 32000.
         A step sees batch x 256 tokens (the first 192 are the prompt, the loss is on the last 64).
  smollm2  SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads and 3 key/value heads (v_proj 576 -> 192),
         intermediate 1536, vocab 49152, tied embeddings; inputs as llama. Not in the default --models
         on the CPU (about 3x the llama shape's time); scripts/gpu_check.sh runs it, docs/speed.md has
         its CPU numbers.

Variants: the frozen backbone alone; one peft LoRA on q and v (r=4, alpha=32); SAPT with 1, 5, 15
and 30 blocks (blocks 1..T-1 frozen, block T trainable, plus the router); the per-task-loop reference
(`LoopLinear`, below) at 15 and 30 blocks; SAPT-15 with activation checkpointing (memory). For the
models named by --growth-models (default smollm2; every model with --smoke) also SAPT with each
--growth block count (default 1, 10, 20, 30, 45, 60): the growth table fits time and memory against
the block count by least squares, giving the cost of each added block.

Measured: the median wall time of a training step (forward + backward + AdamW step), the median wall
time of greedy generation of 32 new tokens (every variant but checkpointing), the peak tensor memory
of a training step (LoRA, SAPT at 1, 15, 30 and the growth counts, checkpointing), and the trainable
parameters / optimizer state of each variant. All variants share the frozen backbone's weight tensors
(nothing trains them), so a dozen variants of a 135M-parameter model fit in memory together.

Timing is round-robin: every variant is built and warmed up first, then each round times one
training step of every variant (the starting variant rotates), and likewise for generation. A slow
spell of a shared machine then lands on all variants alike instead of on whichever was being
measured; medians over the rounds are reported. The defaults (3 rounds, 1 warm-up step, 1 warm-up
generation) took about 12 minutes on the 2-core development CPU with --threads 1, and --repeats 5
about 17, when only five variants generated (now every one but checkpointing does). SmolLM2's shape
with --batch 4 --seq 128 --repeats 3 --clock cpu, growth included, takes about 12 (docs/speed.md). On a shared, busy 2-core box pass --threads 1: two OpenMP threads competing with other processes
made a step 2x and a generation 4x slower than one thread did, and add --clock cpu: the tables
then read the process's CPU time, which leaves out the spells in which other processes held the
core (wall time under a load of 8 on 2 cores varied 3x between rounds of the same variant); both
clocks are always in --json. --smoke runs in a few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sapt.config import SaptConfig
from sapt.utils.cli import HelpWithDefaults
from sapt.layer import SaptLinear
from sapt.model import SaptModel

LORA_R, LORA_ALPHA = 4, 32


# ---- the per-task-loop reference ------------------------------------------------------------------
class LoopLinear(SaptLinear):
    """The release's way of mixing task blocks: a wrapped nn.Linear that loops over the tasks in Python,

        y = W x + sum_j w_j * scaling * B_j(A_j(drop(x)))

    one pair of small matmuls per block. It shares the very tensors of the SaptLinear it replaces
    (frozen blocks as buffers, the current block as the same Parameters) and reads the same routing
    state, so both compute the same function with the same trainable parameters; only forward differs.
    Subclassing keeps SaptModel's bookkeeping (block counts, freezing) working on the swapped model."""

    @classmethod
    def from_sapt(cls, layer: SaptLinear, routing) -> LoopLinear:
        loop = cls(layer.base_layer, layer.r, layer.scaling * layer.r, 0.0, routing)
        loop.scaling, loop.dropout = layer.scaling, layer.dropout
        loop.routing = routing
        loop.past_down, loop.past_up = layer.past_down, layer.past_up  # same storage, no copy
        loop.lora_A, loop.lora_B = layer.lora_A, layer.lora_B  # same Parameter objects
        return loop

    def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(A_j, B_j) oldest first, the order of the routing weights (views, not copies)."""
        pairs = [(self.past_A[j], self.past_B[j]) for j in range(self.past_A.shape[0])]
        if self.lora_A is not None:
            pairs.append((self.lora_A, self.lora_B))
        return pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        blocks = self.blocks()
        if not blocks:
            return out
        weights = self.routing.for_batch(x.shape[0]).to(x.dtype)  # (B, T)
        dropped = self.dropout(x)
        for j, (A, B) in enumerate(blocks):
            # w_j and the scaling folded into one (B, 1, .., 1) factor: one full-size multiply per block.
            factor = (weights[:, j] * self.scaling).view(-1, *([1] * (x.dim() - 1)))
            out = out + factor * F.linear(F.linear(dropped, A.to(x.dtype)), B.to(x.dtype))
        return out


def swap_to_loop(model: SaptModel) -> int:
    """Replace every SaptLinear of `model` by the equivalent LoopLinear; return how many."""
    swapped = 0
    for name, module in list(model.base_model.named_modules()):
        if isinstance(module, SaptLinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.base_model.get_submodule(parent_name) if parent_name else model.base_model
            setattr(parent, child, LoopLinear.from_sapt(module, model.routing))
            swapped += 1
    return swapped


# ---- models and inputs ----------------------------------------------------------------------------
def model_configs(smoke: bool) -> dict:
    from transformers import LlamaConfig, T5Config

    if smoke:
        t5 = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        llama = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0, max_position_embeddings=256)
        smollm2 = LlamaConfig(vocab_size=128, hidden_size=36, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=3, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                              pad_token_id=0, max_position_embeddings=256, tie_word_embeddings=True)
    else:
        # t5-small's shape (its defaults: relu FFN, dropout 0.1, tied embeddings, 32 position buckets).
        t5 = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                      num_heads=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        llama = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=8, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0, max_position_embeddings=2048)
        # SmolLM2-135M's shape (the real model of bench/cl_real.py), random weights: grouped-query
        # attention, so v_proj maps 576 -> 192.
        smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, bos_token_id=1, eos_token_id=2,
                              pad_token_id=0, max_position_embeddings=2048, tie_word_embeddings=True)
    return {"t5": t5, "llama": llama, "smollm2": smollm2}


def build_backbone(family: str, config, device: torch.device) -> nn.Module:
    from transformers import LlamaForCausalLM, T5ForConditionalGeneration

    cls = T5ForConditionalGeneration if family == "t5" else LlamaForCausalLM
    return cls(config).to(device)


def make_batch(family: str, vocab: int, batch: int, seq: int, target: int, device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    data = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if family == "t5":
        data["labels"] = torch.randint(3, vocab, (batch, target), generator=generator)
    else:
        labels = input_ids.clone()
        labels[:, : seq - target] = -100  # prompt positions: no loss, and SAPT routes on them only
        data["labels"] = labels
    return {k: v.to(device) for k, v in data.items()}


@dataclass
class Variant:
    name: str
    kind: str  # backbone | lora | sapt | loop
    blocks: int = 0
    checkpointing: bool = False
    generate: bool = False
    memory: bool = False


def variants(blocks: list[int], loop_blocks: list[int], mid: int, growth: list[int] = ()) -> list[Variant]:
    """Every variant of one model; `growth` adds SAPT at those block counts (with memory)."""
    out = [Variant("backbone", "backbone", generate=True), Variant("lora", "lora", generate=True, memory=True)]
    for t in sorted(set(blocks) | set(growth)):
        out.append(Variant(f"sapt-{t}", "sapt", t, generate=True, memory=t in (1, mid, max(blocks)) or t in growth))
    for t in loop_blocks:
        out.append(Variant(f"loop-{t}", "loop", t, generate=True))
    out.append(Variant(f"sapt-{mid}+ckpt", "sapt", mid, checkpointing=True, memory=True))
    return out


def build_variant(variant: Variant, family: str, template: nn.Module) -> nn.Module:
    # Every variant starts from the same weights, and shares their tensors: no variant trains the
    # backbone (each freezes it), and a copy per variant would not fit twelve 135M models in memory.
    shared = {id(p): p for p in template.parameters()}
    backbone = copy.deepcopy(template, memo=shared)
    if variant.kind == "backbone":
        for p in backbone.parameters():
            p.requires_grad_(False)
        return backbone
    if variant.kind == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        targets = ["q", "v"] if family == "t5" else ["q_proj", "v_proj"]
        task = TaskType.SEQ_2_SEQ_LM if family == "t5" else TaskType.CAUSAL_LM
        config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets,
                            task_type=task)
        return get_peft_model(backbone, config)
    model = SaptModel(backbone, SaptConfig.for_backbone(backbone, f"bench-{family}", r=LORA_R, alpha=LORA_ALPHA))
    generator = torch.Generator().manual_seed(1)
    for t in range(variant.blocks):
        if t:
            model.freeze_current_task()
        model.add_task(f"task{t + 1}")
        if t < variant.blocks - 1:
            # Old blocks get non-zero B (they were trained); the current one keeps its zero init.
            for module in model.modules():
                if isinstance(module, SaptLinear):
                    module.lora_B.data.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.01)
    if variant.kind == "loop":
        swap_to_loop(model)
    if variant.checkpointing:
        try:
            model.activation_checkpointing_enable()
        except AttributeError:
            # transformers < 5.23 names it gradient_checkpointing_enable; SaptModel only forwards the new name.
            model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ---- measuring ------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_of(fn, device: torch.device) -> int:
    """Peak bytes of tensor memory allocated during fn() above what was live when it started.

    CUDA: the caching allocator's own peak counter. CPU: every allocation and free made through
    PyTorch's CPU allocator is recorded by torch.profiler (profile_memory=True); the running sum of
    those events, in time order, peaks at the step's high-water mark. This counts tensors only
    (activations, gradients, optimizer temporaries), not the Python heap or library scratch space."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()  # negative for frees
        peak = max(peak, running)
    return peak


def training_step(model: nn.Module, variant: Variant, batch: dict, optimizer, autocast):
    def step():
        with autocast():
            if variant.kind == "backbone":
                # Nothing to train: backpropagate to the input embeddings instead, which runs the same
                # backward through every layer that any adapter needs (the floor of a step).
                embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
                loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss
            else:
                loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def optimizer_report(model: nn.Module, optimizer) -> dict:
    trainable = [p for p in model.parameters() if p.requires_grad]
    state_tensors = sum(torch.is_tensor(v) for s in optimizer.state.values() for v in s.values())
    state_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                      if torch.is_tensor(v))
    # Which tensors hold state: the current block's A/B of every wrapped layer, or the router.
    block_params = {id(p) for m in model.modules() if isinstance(m, SaptLinear) and m.lora_A is not None
                    for p in (m.lora_A, m.lora_B)}
    frozen = [b for m in model.modules() if isinstance(m, SaptLinear) for b in (m.past_A, m.past_B)]
    frozen_values = sum(b.numel() for b in frozen)
    frozen_ids = {id(b) for b in frozen}
    return {
        "trainable_tensors": len(trainable),
        "trainable_params": sum(p.numel() for p in trainable),
        "optimizer_params_with_state": len(optimizer.state),
        "optimizer_state_tensors": state_tensors,
        "optimizer_state_bytes": state_bytes,
        "state_on_current_block": sum(id(p) in block_params for p in optimizer.state),
        "state_on_router": sum(id(p) not in block_params for p in optimizer.state),
        "state_on_frozen_blocks": sum(id(p) in frozen_ids for p in optimizer.state),
        "frozen_block_values": frozen_values,  # held as buffers: no grad, no optimizer state
    }


def generate_fn(model: nn.Module, family: str, batch: dict, new_tokens: int, autocast, pad_id: int):
    prompt = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def gen():
        with torch.no_grad(), autocast():
            out = model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=pad_id)
        produced = out.shape[1] - (0 if family == "t5" else prompt["input_ids"].shape[1])
        expected = new_tokens + (1 if family == "t5" else 0)  # T5 output starts with the decoder start
        if produced != expected:
            raise RuntimeError(f"generated {produced} tokens, expected {expected}")

    return gen


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one fn(). With one thread on a shared CPU the CPU
    time leaves out the spells in which other processes held the core, which wall time counts."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def round_robin(calls: dict, repeats: int, device: torch.device) -> dict:
    """Time each named call `repeats` times, one call of every variant per round (the starting
    variant rotates), so that a slow spell of a shared machine lands on all variants alike instead
    of on whichever was being measured at that moment. Returns name -> list of (wall, CPU) seconds."""
    names = list(calls)
    times = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(calls[name], device))
    return times


def record_times(row: dict, what: str, times: list[tuple[float, float]], clock: str) -> None:
    """Both clocks' times and medians under `what`_wall / `what`_cpu; `what`_s and `what`_times_s are the
    chosen clock's, the ones every table and target reads."""
    for index, name in enumerate(("wall", "cpu")):
        row[f"{what}_{name}_times_s"] = [t[index] for t in times]
        row[f"{what}_{name}_s"] = statistics.median(row[f"{what}_{name}_times_s"])
    row[f"{what}_times_s"], row[f"{what}_s"] = row[f"{what}_{clock}_times_s"], row[f"{what}_{clock}_s"]


def run_model(family: str, config, args, device, autocast) -> dict:
    """Build every variant (same initial weights), warm each up, profile memory where asked, then
    time training steps round-robin across variants, then generation likewise."""
    growth = args.growth if family in args.growth_models else []
    torch.manual_seed(args.seed)
    template = build_backbone(family, config, device)
    batch = make_batch(family, config.vocab_size, args.batch, args.seq, args.target_len, device, args.seed)
    gen_batch = make_batch(family, config.vocab_size, args.batch, args.seq, args.target_len, device, args.seed + 1)
    results, models, steps, gens = {}, {}, {}, {}
    for variant in variants(args.blocks, args.loop_blocks, args.mid, growth):
        started = time.perf_counter()
        torch.manual_seed(args.seed)
        model = build_variant(variant, family, template)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None  # fresh per variant
        step = training_step(model, variant, batch, optimizer, autocast)
        row = {"kind": variant.kind, "blocks": variant.blocks, "checkpointing": variant.checkpointing}
        for _ in range(args.warmup):
            step()  # the first step also allocates the AdamW state
        if variant.memory:
            # A steady-state step, profiled; untimed, so it doubles as one more warm-up step.
            row["peak_step_mem_bytes"] = peak_memory_of(step, device)
        if optimizer is not None:
            row.update(optimizer_report(model, optimizer))
        results[variant.name], models[variant.name], steps[variant.name] = row, model, step
        if variant.generate:
            gens[variant.name] = generate_fn(model, family, gen_batch, args.new_tokens, autocast, config.pad_token_id)
        print(f"  [{family}] {variant.name:>14}: built and warmed up ({time.perf_counter() - started:.0f}s)",
              file=sys.stderr, flush=True)

    started = time.perf_counter()
    for name, times in round_robin(steps, args.repeats, device).items():
        record_times(results[name], "step", times, args.clock)
    print(f"  [{family}] training steps: {args.repeats} rounds of {len(steps)} variants "
          f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)

    started = time.perf_counter()
    for name, gen in gens.items():
        models[name].eval()
        for _ in range(args.gen_warmup):
            gen()
    for name, times in round_robin(gens, args.repeats, device).items():
        record_times(results[name], "gen", times, args.clock)
    print(f"  [{family}] generation: {args.repeats} rounds of {len(gens)} variants "
          f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    for name, row in results.items():
        print(f"  [{family}] {name:>14}: step {row['step_s']:.3f}s"
              + (f", generate {row['gen_s']:.3f}s" if "gen_s" in row else ""), file=sys.stderr, flush=True)
    return results


# ---- reporting ------------------------------------------------------------------------------------
def ratio(value, reference) -> str:
    return f"{value / reference:.2f}×" if value is not None and reference else "–"


def fmt(value, spec: str) -> str:
    return format(value, spec) if value is not None else "–"


def table(family: str, rows: dict, args) -> str:
    if family == "t5":
        shape = (f"batch {args.batch} × {args.seq} source tokens + {args.target_len} target tokens; "
                 f"generation: {args.new_tokens} new tokens from the {args.seq}-token source")
    else:
        shape = (f"batch {args.batch} × {args.seq} tokens ({args.seq - args.target_len} prompt + "
                 f"{args.target_len} with loss); generation: {args.new_tokens} new tokens after a "
                 f"{args.seq}-token prompt")
    lora = rows["lora"]
    lines = [
        f"### {family} ({shape})",
        "",
        "| variant | step (s) | step / LoRA | generate (s) | gen / LoRA | peak step mem (MiB) | mem / LoRA "
        "| trainable params | opt-state tensors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        mem = row.get("peak_step_mem_bytes")
        lines.append(
            f"| {name} | {row['step_s']:.3f} | {ratio(row['step_s'], lora['step_s'])} "
            f"| {fmt(row.get('gen_s'), '.3f')} | {ratio(row.get('gen_s'), lora.get('gen_s'))} "
            f"| {fmt(mem / 2**20 if mem is not None else None, '.1f')} "
            f"| {ratio(mem, lora.get('peak_step_mem_bytes'))} "
            f"| {fmt(row.get('trainable_params'), ',')} | {fmt(row.get('optimizer_state_tensors'), 'd')} |"
        )
    lines += ["", "| SAPT variant | trainable tensors | params with AdamW state | on current block | on router "
              "| on frozen blocks | frozen block values (buffers) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        if row["kind"] in ("sapt", "loop"):
            lines.append(
                f"| {name} | {row['trainable_tensors']} | {row['optimizer_params_with_state']} "
                f"| {row['state_on_current_block']} | {row['state_on_router']} | {row['state_on_frozen_blocks']} "
                f"| {row['frozen_block_values']:,} |"
            )
    lines += [
        "",
        f"Times ({'CPU time of the process' if args.clock == 'cpu' else 'wall clock'}): median of {args.repeats} round-robin rounds (one run of every variant per round) after "
        f"{args.warmup} warm-up step(s) (+1, profiled, for rows with a memory column) and {args.gen_warmup} "
        f"warm-up generation(s); device {args.device}"
        + (", bf16 autocast" if args.bf16 else ", fp32") + f", {torch.get_num_threads()} threads. "
        "Step = forward + backward + AdamW step (fresh optimizer per variant); the backbone row has nothing to "
        "train, so it backpropagates to the input embeddings (the backward every adapter pays) and has no "
        "optimizer step. Generation: greedy, min_new_tokens = max_new_tokens, KV cache on.",
        "Peak step mem: "
        + ("torch.cuda.max_memory_allocated during one step minus the memory allocated before it"
           if args.device == "cuda" else
           "high-water mark of tensor bytes allocated through PyTorch's CPU allocator during one steady-state "
           "step, above what was live before it (torch.profiler memory events, summed in time order)")
        + ": activations, gradients and temporaries; weights and the existing AdamW state are not counted "
        "(AdamW state: `opt-state tensors` = step, exp_avg, exp_avg_sq per parameter that has received a "
        "gradient; frozen blocks are buffers and never get any). At 1 block the router gets no gradient "
        "(a ≡ 1), so its parameters hold no state.",
    ]
    return "\n".join(lines)


def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the straight line through (xs, ys) with the least squared error."""
    x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / sum((x - x_mean) ** 2 for x in xs)
    return y_mean - slope * x_mean, slope


def growth_fit(rows: dict, counts: list[int]) -> dict:
    """Step time, generation time and peak step memory of SAPT at each block count in `counts`, and
    the least-squares cost of one added block: per quantity its slope, and the slope as a percentage
    of SAPT-1's value (how much of a one-block step each further block adds)."""
    points = [(t, rows[f"sapt-{t}"]) for t in sorted(counts)]
    blocks = [t for t, _ in points]
    fit = {"blocks": blocks}
    for key in ("step_s", "gen_s", "peak_step_mem_bytes"):
        values = [row.get(key) for _, row in points]
        if any(v is None for v in values):
            continue
        intercept, slope = least_squares(blocks, values)
        fit[key] = {"values": values, "intercept": intercept, "per_block": slope,
                    "per_block_pct_of_1": 100 * slope / rows["sapt-1"][key]}
    return fit


def growth_table(family: str, fit: dict) -> str:
    lines = [f"### {family}: growth from {fit['blocks'][0]} to {fit['blocks'][-1]} blocks", "",
             "| blocks | step (s) | step / SAPT-1 | generate (s) | gen / SAPT-1 | peak step mem (MiB) |",
             "|---:|---:|---:|---:|---:|---:|"]
    step, gen, mem = fit["step_s"], fit.get("gen_s"), fit.get("peak_step_mem_bytes")
    for i, t in enumerate(fit["blocks"]):
        lines.append(
            f"| {t} | {step['values'][i]:.3f} | {ratio(step['values'][i], step['values'][0])} "
            f"| {fmt(gen and gen['values'][i], '.3f')} | {ratio(gen and gen['values'][i], gen and gen['values'][0])} "
            f"| {fmt(mem and mem['values'][i] / 2**20, '.1f')} |"
        )
    per_block = [f"step {1000 * step['per_block']:.2f} ms ({step['per_block_pct_of_1']:.2f} % of SAPT-1's step)"]
    if gen:
        per_block.append(f"generation {1000 * gen['per_block']:.2f} ms ({gen['per_block_pct_of_1']:.2f} %)")
    if mem:
        per_block.append(f"peak step memory {mem['per_block'] / 2**20:.2f} MiB ({mem['per_block_pct_of_1']:.2f} %)")
    lines += ["", "Cost per added block (least-squares slope over these block counts): " + "; ".join(per_block) + "."]
    return "\n".join(lines)


def step_bounds(family: str) -> tuple[float, float]:
    """(middle, top) bounds of SAPT's step time over LoRA's. SmolLM2's shape: the FLOP ratio at 15 / 30
    blocks plus 3 % (docs/speed.md has the arithmetic); the other shapes keep the first goals."""
    return (1.07, 1.12) if family == "smollm2" else (1.10, 1.20)


def targets(all_results: dict, args) -> tuple[str, list[dict]]:
    mid, top = args.mid, max(args.blocks)
    checks = []
    for family, rows in all_results.items():
        lora, s_mid, s_top, loop_mid = rows["lora"], rows[f"sapt-{mid}"], rows[f"sapt-{top}"], rows.get(f"loop-{mid}")
        mid_bound, top_bound = step_bounds(family)
        items = [
            (f"SAPT-{mid} step ≤ {mid_bound:.2f}× LoRA", s_mid["step_s"] / lora["step_s"], "<=", mid_bound),
            (f"SAPT-{top} step ≤ {top_bound:.2f}× LoRA", s_top["step_s"] / lora["step_s"], "<=", top_bound),
        ]
        if loop_mid is not None:
            items.append((f"loop-{mid} / SAPT-{mid} step ≥ 1.25", loop_mid["step_s"] / s_mid["step_s"], ">=", 1.25))
        items.append((f"SAPT-{mid} generate ≤ 1.10× LoRA", s_mid["gen_s"] / lora["gen_s"], "<=", 1.10))
        for label, value, op, bound in items:
            ok = value <= bound if op == "<=" else value >= bound
            checks.append({"model": family, "target": label, "value": round(value, 4), "pass": ok})
    lines = ["## targets", "", "| model | target | measured | result |", "|---|---|---:|---|"]
    lines += [f"| {c['model']} | {c['target']} | {c['value']:.2f} | {'PASS' if c['pass'] else 'FAIL'} |"
              for c in checks]
    return "\n".join(lines), checks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    parser.add_argument("--smoke", action="store_true", help="tiny models, 1 repeat, blocks 1 and 3")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; 1 with --smoke)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed warm-up steps (default 1; variants with a memory column run one more, "
                        "profiled)")
    parser.add_argument("--gen-warmup", type=int, default=None,
                        help="untimed warm-up generations per variant (default 1)")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (2 with --smoke)")
    parser.add_argument("--seq", type=int, default=None, help="source / prompt tokens (default 256; 16 smoke)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's; 1 with --smoke, which is tiny and only "
                        "loses to thread hand-offs, badly so on a busy machine)")
    parser.add_argument("--json", default=None, help="write every measurement here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models run")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--models", default="t5,llama", help="comma-separated, any of t5, llama, smollm2 (random weights in those models' shapes, see above)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="what the tables and targets read: wall time, or the process's CPU time (CPU only; "
                        "with --threads 1 on a shared machine it leaves out the time other processes held the "
                        "core); both are written to --json")
    parser.add_argument("--growth", default=None,
                        help="SAPT block counts of the growth table (default 1,10,20,30,45,60; 1,3,5 with --smoke)")
    parser.add_argument("--growth-models", default=None,
                        help="models that get the growth table (default smollm2; every model with --smoke; "
                        "'none' for none)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = {"repeats": 1 if smoke else 3, "warmup": 1, "gen_warmup": 1,
                "batch": 2 if smoke else 8, "seq": 16 if smoke else 256}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.target_len = min(4 if smoke else 64, args.seq - 1)
    args.new_tokens = 4 if smoke else 32
    args.blocks = [1, 3] if smoke else [1, 5, 15, 30]
    args.loop_blocks = [3] if smoke else [15, 30]
    args.mid = args.loop_blocks[0]  # the block count of the generation, checkpointing and target checks
    if smoke and args.threads is None:
        args.threads = 1
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.growth = [int(t) for t in (args.growth or ("1,3,5" if smoke else "1,10,20,30,45,60")).split(",")]
    if 1 not in args.growth or len(set(args.growth)) < 2:
        parser.error("--growth needs block count 1 (the reference of the ratios) and at least one other")
    if args.growth_models is None:
        args.growth_models = ",".join(args.models) if smoke else "smollm2"
    args.growth_models = [m.strip() for m in args.growth_models.split(",") if m.strip() not in ("", "none")]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu times the host only: CUDA work runs asynchronously; use --clock wall")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    # peft still calls the deprecated `is_gradient_checkpointing`; the notice is noise in a benchmark.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    started = time.perf_counter()
    configs = model_configs(args.smoke)
    results = {family: run_model(family, configs[family], args, device, autocast) for family in args.models}
    report = [table(family, rows, args) for family, rows in results.items()]
    growth = {family: growth_fit(rows, args.growth) for family, rows in results.items() if family in args.growth_models}
    report += [growth_table(family, fit) for family, fit in growth.items()]
    target_text, checks = targets(results, args)
    wall = time.perf_counter() - started
    print("\n\n".join(report + [target_text]))
    print(f"\n(total {wall:.0f} s)")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        payload = {"settings": settings, "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "models": results, "growth": growth, "targets": checks, "wall_s": wall}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
