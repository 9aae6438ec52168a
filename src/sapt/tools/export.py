"""Export a SAPT run's task blocks as stock PEFT LoRA adapters, for servers with per-request adapters.

    python -m sapt export logs_and_outputs/RUN/outputs --out adapters/RUN
    python -m sapt export RUN --out DIR [--root logs_and_outputs] [--measure [--config PIPELINE_DIR]]

RUN is a run name under --root, a run's `outputs` folder, or one task folder (then tasks 1..that one).
DIR receives:
    blocks/<i>-<task>/   task i's block alone: a rank-r LoRA (SAPT with routing one-hot on block i)
    fixed/<i>-<task>/    blocks 1..i mixed with task i's stored mean routing ā_i: a rank-i·r LoRA
    README.md            what each folder is, how to load it, the measured AP of each deployment choice
Each adapter folder holds `adapter_config.json` + `adapter_model.safetensors` and loads with
`PeftModel.from_pretrained(base, folder)`.

A wrapped projection of SAPT computes W x + (α/r) Σ_j a_j B_j A_j x. With the weights a fixed, the
mixture is one LoRA: A = [A_1; ...; A_i] (i·r, d_in), B = [a_1 B_1, ..., a_i B_i] (d_out, i·r), so B A x = Σ_j a_j B_j A_j x,
and lora_alpha = α·i keeps peft's scaling lora_alpha / rank equal to SAPT's α/r. Only the files are
read: no backbone is loaded. The README's AP figures come from `python -m sapt evaluate` (--measure runs it).
"""

from __future__ import annotations

import argparse
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, TaskType
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_FILE
from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_FILE

from ..checkpoint import (
    BLOCK_FILE,
    CheckpointError,
    load_config,
    load_routing_mean,
    read_lineage,
    read_tensors,
    resolve_task_dir,
)
from ..config import CONFIG_NAME, SaptConfig
from ..experiments.cl_metrics import ScoreError, read_run, summarize
from ..methods.registry import METHOD_NAMES, get_method
from ..run_files import TASK_ARGS_FILE, task_dir_name
from ..training.data import DataError
from ..utils.cli import OneLineArgumentParser, UsageError, report_error
from ..utils.fileio import save_tensors_atomic, staged_folder, write_json_atomic, write_text_atomic
from ..utils.logs import setup_cli_logging, stdout_kept_for_results

logger = logging.getLogger(__name__)

BLOCKS_DIR = "blocks"
FIXED_DIR = "fixed"
README_FILE = "README.md"
# Deployment choices, each the routing whose re-evaluation measures it (SAPT's stored results: learned).
DEPLOYMENTS = {
    "learned": "SAPT, per-input routing (the run's stored results)",
    "oracle": f"own block only: `{BLOCKS_DIR}/<i>-<task>` (= routing oracle: one-hot on the task's block)",
    "mean": f"fixed ā: `{FIXED_DIR}/<i>-<task>` (= routing mean: the task's stored ā)",
}
# peft's keys for a wrapped module's factors (the adapter name is dropped on save and added on load).
PEFT_KEY = "base_model.model.{module}.lora_{factor}.weight"


@dataclass
class TaskBlock:
    """One task of the run: its block on every wrapped projection and its stored mean routing."""

    index: int  # 1-based position in the run
    task: str
    folder: Path  # the task's own folder (its block, its ā)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> A (r, d_in), B (d_out, r)
    routing_mean: list[float]  # ā over blocks 1..index, oldest first

    @property
    def name(self) -> str:
        return task_dir_name(self.index, self.task)


# ---- reading the run ------------------------------------------------------------------------------
def resolve_source(run: str, root: str | Path) -> tuple[Path, Path]:
    """(the run's outputs folder, the last task folder to export) for a run name, outputs or task folder."""
    named = Path(root) / run / "outputs"
    path = named if not Path(run).is_absolute() and named.is_dir() else Path(run)
    if not path.is_dir():
        raise CheckpointError(f"{run}: run not found (no folder {named} and no folder {run})")
    if not (path / CONFIG_NAME).is_file() and (path / "outputs").is_dir():
        path = path / "outputs"  # a run folder
    task_dir = resolve_task_dir(path).resolve()  # absolute: the README's paths and commands work from anywhere
    return task_dir.parent, task_dir


def _split_block(tensors: dict[str, torch.Tensor], path: Path, config: SaptConfig) -> dict:
    """module -> (A, B) from a block file's "<module>.lora_A" / "<module>.lora_B" entries, checked."""
    modules = sorted({key.rsplit(".", 1)[0] for key in tensors})
    factors = {}
    for module in modules:
        lora_A, lora_B = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
        if lora_A is None or lora_B is None or len(tensors) != 2 * len(modules):
            raise CheckpointError(f"{path}: expected a lora_A and a lora_B for every module (at {module!r})")
        if module.rsplit(".", 1)[-1] not in config.target_modules:
            raise CheckpointError(f"{path}: module {module!r} is not one of the wrapped {config.target_modules}")
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != config.r or lora_B.shape[1] != config.r:
            raise CheckpointError(
                f"{path}: {module} has factors {tuple(lora_A.shape)}/{tuple(lora_B.shape)}, not rank {config.r}"
            )
        factors[module] = (lora_A.float(), lora_B.float())
    if not factors:
        raise CheckpointError(f"{path}: block holds no tensors")
    return factors


def read_task_blocks(task_dir: Path) -> tuple[SaptConfig, list[TaskBlock]]:
    """The config of `task_dir` and every task up to it, each with its block and ā, all checked."""
    config = load_config(task_dir)
    if not get_method(config.method).exportable:
        runs = " or ".join(name for name in METHOD_NAMES if get_method(name).exportable)
        raise CheckpointError(f"{task_dir / CONFIG_NAME}: method {config.method!r} has no routed blocks; export needs a {runs} run")
    tasks = []
    for index, (task, relative) in enumerate(zip(config.tasks, read_lineage(task_dir, config)), start=1):
        folder = (task_dir / relative).resolve()
        block_file = folder / BLOCK_FILE
        factors = _split_block(read_tensors(block_file), block_file, config)
        if tasks and factors.keys() != tasks[0].factors.keys():
            raise CheckpointError(f"{block_file}: wraps other modules than {tasks[0].folder / BLOCK_FILE}")
        routing_mean = load_routing_mean(folder)
        if len(routing_mean) != index:
            raise CheckpointError(f"{folder}: routing mean has {len(routing_mean)} weights for {index} blocks")
        tasks.append(TaskBlock(index, task, folder, factors, routing_mean))
    return config, tasks


# ---- adapters -------------------------------------------------------------------------------------
def mixed_adapter(blocks: Sequence[TaskBlock], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """peft's state dict of one LoRA equal to Σ_j weights[j] · block j: A stacked, B weighted and stacked."""
    state = {}
    for module in blocks[0].factors:
        down = torch.cat([block.factors[module][0] for block in blocks])  # (T*r, d_in)
        up = torch.cat([w * block.factors[module][1] for block, w in zip(blocks, weights)], dim=1)  # (d_out, T*r)
        state[PEFT_KEY.format(module=module, factor="A")] = down
        state[PEFT_KEY.format(module=module, factor="B")] = up
    return state


def lora_config(config: SaptConfig, num_blocks: int) -> LoraConfig:
    """A rank num_blocks·r LoRA on the projections SAPT wraps, with peft's scaling equal to SAPT's α/r."""
    return LoraConfig(
        r=num_blocks * config.r,
        lora_alpha=num_blocks * config.alpha,
        target_modules=list(config.target_modules),  # matched as peft does: the module's own name
        lora_dropout=config.dropout,
        bias="none",
        task_type=TaskType.SEQ_2_SEQ_LM if config.is_encoder_decoder else TaskType.CAUSAL_LM,
        base_model_name_or_path=config.base_model_name_or_path,
        inference_mode=True,
    )


def write_adapter(folder: Path, config: LoraConfig, state: dict[str, torch.Tensor]) -> None:
    record = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    write_json_atomic(folder / ADAPTER_CONFIG_FILE, record)
    save_tensors_atomic(folder / ADAPTER_WEIGHTS_FILE, state, metadata={"format": "pt"})


# ---- measured AP of each deployment ---------------------------------------------------------------
def routing_outputs(outputs_dir: Path, routing: str) -> Path:
    """Where `python -m sapt evaluate RUN --routing R` writes its rows (RUN/routing/R/outputs)."""
    # Imported here, like evaluate_run below: sapt.evaluate loads the whole training stack.
    from ..experiments.evaluate import EVALUATIONS_DIR

    return outputs_dir.parent / EVALUATIONS_DIR / routing / "outputs"


def evaluate_command(outputs_dir: Path, routing: str, tasks: Sequence[TaskBlock], config_dir: str | None) -> str:
    command = f"python -m sapt evaluate {shlex.quote(str(outputs_dir.parent))} --routing {routing}"
    if config_dir is not None:
        command += f" --config {shlex.quote(str(config_dir))}"
    elif not all((t.folder / TASK_ARGS_FILE).is_file() for t in tasks):  # a run from before task_args.json
        command += " --config PIPELINE_DIR"
    return command


def measured_ap(outputs: Path, task_names: list[str]) -> tuple[float | None, str]:
    """(AP after the last exported task, metric) read from a run-shaped folder; (None, why) if absent."""
    warnings: list[str] = []
    try:
        tasks, matrix, metric = read_run(outputs, warnings_out=warnings)
    except ScoreError as err:
        return None, str(err)
    last = len(task_names)
    if tasks[:last] != task_names:
        return None, f"{outputs}: has results for {', '.join(tasks) or 'no task'}, not {', '.join(task_names)}"
    return summarize(matrix[:last, :last])["AP"], metric


def measure_deployments(
    outputs_dir: Path, tasks: list[TaskBlock], measure: bool, config_dir: str | None = None
) -> dict[str, tuple[float | None, str]]:
    """routing -> (AP, metric or the reason it is missing); with `measure`, runs sapt.evaluate for the
    missing ones (`config_dir`: the pipeline's step configs, for runs without task_args.json)."""
    names = [t.task for t in tasks]
    results = {}
    for routing in DEPLOYMENTS:
        where = outputs_dir if routing == "learned" else routing_outputs(outputs_dir, routing)
        results[routing] = measured_ap(where, names)
        if results[routing][0] is None and measure and routing != "learned":
            from ..experiments.evaluate import EvaluateError, evaluate_run

            logger.info("measuring routing %s with sapt.evaluate (this runs the model on every test set)", routing)
            try:
                written = evaluate_run(outputs_dir.parent, routing, config_dir=config_dir)
            except (EvaluateError, DataError, ScoreError) as err:
                raise UsageError(f"--measure, routing {routing}: {err}") from None
            results[routing] = measured_ap(Path(written), names)
    return results


# ---- README ---------------------------------------------------------------------------------------
def render_readme(
    config: SaptConfig, tasks: list[TaskBlock], outputs_dir: Path, out_dir: Path, measured: dict, config_dir: str | None
) -> str:
    lines = _adapters_section(config, tasks, outputs_dir, out_dir)
    lines += _measured_section(tasks, outputs_dir, measured, config_dir)
    return "\n".join(lines) + "\n"


def _adapters_section(config: SaptConfig, tasks: list[TaskBlock], outputs_dir: Path, out_dir: Path) -> list[str]:
    """The README's lines on what each exported adapter computes and how to load them."""
    auto = "AutoModelForSeq2SeqLM" if config.is_encoder_decoder else "AutoModelForCausalLM"
    last = tasks[-1]
    lines = [
        "# PEFT adapters exported from a SAPT run",
        "",
        (
            f"Run: `{outputs_dir}` (tasks 1..{last.index}: {', '.join(t.task for t in tasks)}). "
            f"Backbone: `{config.base_model_name_or_path}` ({config.model_type}). "
            f"Every adapter wraps {', '.join(f'`{m}`' for m in config.target_modules)} of every attention layer."
        ),
        "",
        "| folder | rank | lora_alpha | what it computes |",
        "|---|---|---|---|",
    ]
    for t in tasks:
        lines.append(f"| `{BLOCKS_DIR}/{t.name}` | {config.r} | {config.alpha:g} | task {t.index}'s block alone |")
    for t in tasks:
        mix = ", ".join(f"{w:.4f}·{b.task}" for w, b in zip(t.routing_mean, tasks))
        lines.append(
            f"| `{FIXED_DIR}/{t.name}` | {t.index * config.r} | {t.index * config.alpha:g} | "
            f"blocks 1..{t.index} mixed with ā_{t.index} = {mix} |"
        )
    lines += [
        "",
        (
            f"`{BLOCKS_DIR}/<i>-<task>` equals the SAPT model with its routing one-hot on block i. "
            f"`{FIXED_DIR}/<i>-<task>` equals the SAPT model with its routing fixed to task i's stored mean "
            "routing ā_i (its `routing_mean.json`), for every input: it is exact for those fixed weights, "
            "while SAPT itself routes each input by its own weights. Either way a request must name its task. "
            f"A `{FIXED_DIR}` adapter has rank i·r, so a server that caps adapter ranks needs a cap of at "
            f"least {last.index * config.r} here."
        ),
        "",
        "```python",
        f"from transformers import {auto}",
        "from peft import PeftModel",
        "",
        f'base = {auto}.from_pretrained("{config.base_model_name_or_path}")',
        f'model = PeftModel.from_pretrained(base, "{out_dir / FIXED_DIR / tasks[0].name}", adapter_name="{tasks[0].task}")',
        *(f'model.load_adapter("{out_dir / FIXED_DIR / t.name}", adapter_name="{t.task}")' for t in tasks[1:]),
        f'model.set_adapter("{last.task}")  # per request: the adapter of the request\'s task',
        "```",
        "",
        f"The `{BLOCKS_DIR}` adapters load the same way.",
        "",
    ]
    return lines


def _measured_section(tasks: list[TaskBlock], outputs_dir: Path, measured: dict, config_dir: str | None) -> list[str]:
    """The README's table of each deployment choice's AP, with the command for each not yet measured."""
    lines = [
        f"## Measured AP of each deployment choice (after task {tasks[-1].index})",
        "",
        "| deployment | AP | source |",
        "|---|---|---|",
    ]
    for routing, label in DEPLOYMENTS.items():
        value, detail = measured[routing]
        if value is not None:
            where = outputs_dir if routing == "learned" else routing_outputs(outputs_dir, routing)
            lines.append(f"| {label} | {value:.2f} | {detail}, `{where}` |")
        elif routing == "learned":
            lines.append(f"| {label} | not available | {detail} |")
        else:
            lines.append(f"| {label} | not measured | `{evaluate_command(outputs_dir, routing, tasks, config_dir)}` |")
    if any(value is None for value, _ in measured.values()):
        lines += [
            "",
            (
                "Run the commands shown (or export again with `--measure`) to fill in the missing rows; "
                "`--config PIPELINE_DIR` names the folder of the run's step configs, needed for runs written "
                f"before `{TASK_ARGS_FILE}` existed."
            ),
        ]
    return lines


# ---- the command ----------------------------------------------------------------------------------
def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir}: output folder is not empty; choose a new one")


def export_run(
    run: str, out: str | Path, root: str | Path = "logs_and_outputs", measure: bool = False, config_dir: str | None = None
) -> Path:
    """Write every task's block and fixed-ā adapter and the README into `out`; return it. `out` appears
    whole or not at all. `measure` and `config_dir`: see measure_deployments."""
    out_dir = Path(out)
    _check_out_dir(out_dir)
    outputs_dir, task_dir = resolve_source(run, root)
    config, tasks = read_task_blocks(task_dir)
    logger.info("%s: %d task(s), %s, rank %d, alpha %g", task_dir, len(tasks), config.model_type, config.r, config.alpha)
    measured = measure_deployments(outputs_dir, tasks, measure, config_dir)

    with staged_folder(out_dir, _check_out_dir) as staging:
        for t in tasks:
            write_adapter(staging / BLOCKS_DIR / t.name, lora_config(config, 1), mixed_adapter([t], [1.0]))
            write_adapter(staging / FIXED_DIR / t.name, lora_config(config, t.index), mixed_adapter(tasks[: t.index], t.routing_mean))
            logger.info("wrote %s/%s and %s/%s (ā %s)", BLOCKS_DIR, t.name, FIXED_DIR, t.name,
                        ", ".join(f"{w:.3f}" for w in t.routing_mean))
        readme = render_readme(config, tasks, outputs_dir, out_dir.resolve(), measured, config_dir)
        write_text_atomic(staging / README_FILE, readme)
    logger.info("exported %d task(s) into %s", len(tasks), out_dir)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="sapt export", description=__doc__.splitlines()[0])
    parser.add_argument("run", metavar="RUN", help="run name under --root, a run's outputs folder, or one task folder")
    parser.add_argument("--out", required=True, help="new (or empty) folder for the adapters")
    parser.add_argument("--root", default="logs_and_outputs", help="where run names are looked up")
    parser.add_argument(
        "--measure", action="store_true",
        help="run sapt.evaluate for the deployment choices not yet measured (runs the model on every test set)",
    )
    parser.add_argument(
        "--config", metavar="DIR",
        help="with --measure: the pipeline's step configs <i>-<task>.json, for runs written before task_args.json",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli_logging()
    try:
        with stdout_kept_for_results():
            out = export_run(args.run, args.out, args.root, args.measure, args.config)
    except (CheckpointError, UsageError, OSError) as err:  # user errors: one line, no traceback
        return report_error("sapt export", err)
    print(out)
    return 0
