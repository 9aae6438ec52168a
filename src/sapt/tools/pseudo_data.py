"""Generative replay data: a generator LoRA per task writes pseudo inputs for ARM (docs/data.md, pseudo samples).

For each task a LoRA on the frozen backbone's attention q/v projections learns to map the fixed
source ``__gen__`` to ``{Definition}__inp__{input}``; samples from it are split at ``__inp__`` and
2% of the training-set size (at least 1) are written in the benchmark's JSON format:

    python -m sapt pseudo_data --model_name_or_path tiny_models/t5 \\
        --data_dir ../shared/CL_Benchmark --tasks task363_sst2_polarity_classification \\
        --out generated_data/lora_gen_superni_t5

The marker tokens are added to the vocabulary. The embedding rows of those tokens (and the output
rows, when the output layer is not tied to the embeddings) are trained through peft's
``trainable_token_indices``: only a small delta for the new ids learns, every backbone weight stays
frozen. The release froze every ``lora_`` parameter and so trained nothing (docs/differences.md); here the
trainable parameters are chosen by peft's wrapping and checked by the tests.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ..backbone import load_backbone, load_tokenizer
from ..benchmark_spec import SPEC_FILE
from ..config import TARGET_MODULES
from ..training.data import SPLITS, DataError, find_task, read_split_file
from ..utils.cli import OneLineArgumentParser
from ..utils.fileio import write_bytes_if_changed, write_json_atomic
from ..utils.logs import setup_cli_logging, stdout_kept_for_results

logger = logging.getLogger(__name__)

GEN_TOKEN, INP_TOKEN, ANS_TOKEN = "__gen__", "__inp__", "__ans__"
MARKER_TOKENS = (GEN_TOKEN, INP_TOKEN, ANS_TOKEN)


class PseudoDataError(RuntimeError):
    """Generation that cannot go on (unloadable backbone, no usable sample); reported in one line."""


@dataclass
class GeneratorSettings:
    """Training and sampling settings; the defaults are the release's."""

    steps: int = 5000
    batch_size: int = 16
    learning_rate: float = 1e-3
    source_length: int = 5
    target_length: int = 512
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    ratio: float = 0.02
    top_k: int = 20
    repetition_penalty: float = 2.5
    sample_batch_size: int = 16
    draws_per_sample: int = 10  # bound on sampling: at most this many draws per sample kept
    log_every: int = 100
    seed: int = 42


def pseudo_count(num_train: int, ratio: float = 0.02) -> int:
    return max(1, int(round(ratio * num_train)))


def target_modules_for(model) -> list[str]:
    """The attention q/v projections of SAPT's families (sapt.config); another family's by these names."""
    model_type = model.config.model_type
    if model_type in TARGET_MODULES:
        return list(TARGET_MODULES[model_type])
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for candidate in (["q_proj", "v_proj"], ["q", "v"]):
        if set(candidate) <= names:
            return candidate
    raise PseudoDataError(f"no attention q/v projections found in a {model_type!r} model")


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def build_generator(backbone, tokenizer, settings: GeneratorSettings) -> PeftModel:
    """Add the marker tokens, grow the embeddings if needed, and wrap the backbone in a fresh LoRA.

    Seed before calling: the LoRA init and the new embedding rows draw from torch's generator.
    """
    tokenizer.add_tokens(list(MARKER_TOKENS))
    if len(tokenizer) > backbone.get_input_embeddings().num_embeddings:
        # Never shrink: T5 checkpoints carry more rows than their tokenizer uses.
        backbone.resize_token_embeddings(len(tokenizer))
    marker_ids = tokenizer.convert_tokens_to_ids(list(MARKER_TOKENS))
    inputs, outputs = backbone.get_input_embeddings(), backbone.get_output_embeddings()
    if outputs is None or outputs.weight is inputs.weight:
        token_indices = marker_ids  # peft follows the tie to the output layer itself
    else:
        # The output rows must learn too, or `__inp__` could never be predicted.
        token_indices = {_module_name(backbone, inputs): marker_ids, _module_name(backbone, outputs): marker_ids}
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=target_modules_for(backbone),
        trainable_token_indices=token_indices,
        task_type="SEQ_2_SEQ_LM" if backbone.config.is_encoder_decoder else "CAUSAL_LM",
    )
    return get_peft_model(backbone, config)


def generator_targets(definition: str, instances: list[dict]) -> list[str]:
    return [f"{definition}{INP_TOKEN}{instance['input']}" for instance in instances]


class _Batcher:
    """Tokenised training examples, served in seeded shuffled passes."""

    def __init__(self, tokenizer, targets: list[str], settings: GeneratorSettings, is_encoder_decoder: bool):
        self.is_encoder_decoder = is_encoder_decoder
        self.pad_id = tokenizer.pad_token_id
        self.source = tokenizer(GEN_TOKEN, max_length=settings.source_length, truncation=True)["input_ids"]
        if is_encoder_decoder:
            encoded = tokenizer(targets, max_length=settings.target_length, truncation=True)["input_ids"]
        else:
            # Target + EOS within target_length tokens, after the prompt.
            plain = tokenizer(targets, add_special_tokens=False)["input_ids"]
            encoded = [ids[: settings.target_length - 1] + [tokenizer.eos_token_id] for ids in plain]
        self.targets = encoded
        self.batch_size = min(settings.batch_size, len(encoded))
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.order: list[int] = []

    def next(self) -> dict[str, torch.Tensor]:
        if len(self.order) < self.batch_size:
            self.order += torch.randperm(len(self.targets), generator=self.generator).tolist()
        picked, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        rows = [self.targets[i] for i in picked]
        if self.is_encoder_decoder:
            width = max(map(len, rows))
            labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])  # (B, T)
            input_ids = torch.tensor([self.source] * len(rows))  # (B, S)
            return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
        # Decoder-only: prompt + target, right-padded; loss on the target (and EOS) only.
        sequences = [self.source + r for r in rows]
        width = max(map(len, sequences))
        input_ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in sequences])  # (B, S+T)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        labels = input_ids.masked_fill(mask == 0, -100)
        labels[:, : len(self.source)] = -100
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train_generator(model: PeftModel, tokenizer, targets: list[str], settings: GeneratorSettings) -> list[float]:
    """Train the generator's trainable parameters (LoRA + new-token rows); return every step's loss.

    Gradients of the last step are left in place (for inspection); AdamW, constant learning rate.
    """
    if not targets:
        raise PseudoDataError("no training targets for the generator")
    device = next(model.parameters()).device
    batcher = _Batcher(tokenizer, targets, settings, model.config.is_encoder_decoder)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(1, settings.steps + 1):
        batch = {k: v.to(device) for k, v in batcher.next().items()}
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % settings.log_every == 0 or step == settings.steps:
            window = losses[-settings.log_every :]
            logger.info("generator step %d/%d: loss %.4f", step, settings.steps, sum(window) / len(window))
    model.eval()
    return losses


def split_sample(text: str) -> tuple[str, str] | None:
    """(definition, input) of one generated text, or None without `__inp__` or with an empty input."""
    if INP_TOKEN not in text:
        return None
    definition, rest = text.split(INP_TOKEN, 1)
    generated_input = rest.split(INP_TOKEN, 1)[0]  # a second marker starts a new, unwanted sample
    for marker in (GEN_TOKEN, ANS_TOKEN):
        definition, generated_input = definition.replace(marker, ""), generated_input.replace(marker, "")
    generated_input = generated_input.strip()
    return (definition.strip(), generated_input) if generated_input else None


@torch.no_grad()
def generate_pseudo_samples(
    model, tokenizer, count: int, settings: GeneratorSettings
) -> list[tuple[str, str]]:
    """Sample until `count` usable (definition, input) pairs or the draw bound; seeded by settings.seed."""
    model.eval()
    device = next(model.parameters()).device
    source = tokenizer(GEN_TOKEN, max_length=settings.source_length, truncation=True)["input_ids"]
    max_draws = max(settings.sample_batch_size, settings.draws_per_sample * count)
    torch.manual_seed(settings.seed)
    pairs: list[tuple[str, str]] = []
    draws = 0
    while len(pairs) < count and draws < max_draws:
        size = min(settings.sample_batch_size, max_draws - draws)
        input_ids = torch.tensor([source] * size, device=device)  # (N, S)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            top_k=settings.top_k,
            top_p=1.0,
            temperature=1.0,
            repetition_penalty=settings.repetition_penalty,
            max_new_tokens=settings.target_length,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if not model.config.is_encoder_decoder:
            output = output[:, input_ids.shape[1] :]  # drop the prompt
        draws += size
        for text in tokenizer.batch_decode(output, skip_special_tokens=True):
            pair = split_sample(text)
            if pair is not None and len(pairs) < count:
                pairs.append(pair)
    logger.info("kept %d of %d sampled texts (wanted %d)", len(pairs), draws, count)
    return pairs


def pseudo_task_json(task: str, pairs: list[tuple[str, str]], real_definition: str) -> dict:
    """Benchmark-format JSON (docs/data.md): the most common generated definition, empty outputs."""
    definitions = Counter(d for d, _ in pairs if d)
    definition = definitions.most_common(1)[0][0] if definitions else real_definition
    return {
        "Definition": [definition],
        "Positive Examples": [],
        "Negative Examples": [],
        "Instances": [{"id": f"{task}-pseudo-{i}", "input": text, "output": ""} for i, (_, text) in enumerate(pairs)],
    }


def task_output_dir(out: str | Path, benchmark: str, task: str) -> Path:
    return Path(out) / benchmark / task


def is_done(folder: Path) -> bool:
    return all((folder / f"{split}.json").is_file() for split in SPLITS)


def _save_generator(model: PeftModel, tokenizer, folder: Path) -> None:
    """Adapter (safetensors + JSON config) and tokenizer, renamed into place whole."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        # The grown embedding rows were drawn at random: the adapter is unusable without them.
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=True)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def generate_for_task(
    model_name_or_path: str,
    data_dir: str | Path,
    task: str,
    out: str | Path,
    settings: GeneratorSettings,
    max_train_samples: int | None = None,
    save_generator: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> Path | None:
    """Train one task's generator and write its pseudo data; None when the task was already done."""
    benchmark, folder = find_task(data_dir, task)
    target = task_output_dir(out, benchmark, task)
    if is_done(target):
        logger.info("%s: pseudo data already in %s, skipping", task, target)
        return None
    definition, instances = read_split_file(folder / "train.json")
    if max_train_samples is not None:
        instances = instances[:max_train_samples]
    count = pseudo_count(len(instances), settings.ratio)

    torch.manual_seed(settings.seed)
    try:
        backbone = load_backbone(model_name_or_path, dtype=dtype)
        tokenizer = load_tokenizer(model_name_or_path, backbone.config.is_encoder_decoder)
    except (OSError, ValueError) as err:
        raise PseudoDataError(f"cannot load backbone {model_name_or_path!r}: {err}") from None
    model = build_generator(backbone, tokenizer, settings)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    logger.info("%s: training the generator on %d instances for %d steps", task, len(instances), settings.steps)
    train_generator(model, tokenizer, generator_targets(definition, instances), settings)
    if save_generator is not None:
        _save_generator(model, tokenizer, Path(save_generator) / task)

    pairs = generate_pseudo_samples(model, tokenizer, count, settings)
    if not pairs:
        raise PseudoDataError(f"{task}: the generator produced no text with {INP_TOKEN} and an input; train it longer")
    if len(pairs) < count:
        logger.warning("%s: only %d of %d pseudo samples are usable", task, len(pairs), count)
    data = pseudo_task_json(task, pairs, definition)
    own_spec = folder.parent / SPEC_FILE  # a benchmark of one's own: its pseudo samples' folder needs the spec too
    if own_spec.is_file():
        write_bytes_if_changed(target.parent / SPEC_FILE, own_spec.read_bytes())
    for split in SPLITS:  # the same content in each, as the release
        write_json_atomic(target / f"{split}.json", data)
    logger.info("%s: wrote %d pseudo samples to %s", task, len(pairs), target)
    return target


def build_parser() -> OneLineArgumentParser:
    defaults = GeneratorSettings()
    parser = OneLineArgumentParser(prog="sapt pseudo_data",
                                   description="Train a generator LoRA per task and write pseudo samples (docs/data.md).")
    parser.add_argument("--model_name_or_path", required=True, help="backbone folder or hub name")
    parser.add_argument("--data_dir", default="CL_Benchmark", help="root holding SuperNI/ and Long_Sequence/")
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--out", required=True, help="e.g. generated_data/lora_gen_superni_t5")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps of each task's generator")
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size, help="training batch size")
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate, help="the generator LoRA's learning rate")
    parser.add_argument("--source_length", type=int, default=defaults.source_length,
                        help="tokens of the generator's prompt (the marker it generates from)")
    parser.add_argument("--target_length", type=int, default=defaults.target_length, help="tokens of a generated input, at most")
    parser.add_argument("--ratio", type=float, default=defaults.ratio, help="pseudo samples per training instance")
    parser.add_argument("--sample_batch_size", type=int, default=defaults.sample_batch_size, help="samples drawn per generation batch")
    parser.add_argument("--draws_per_sample", type=int, default=defaults.draws_per_sample,
                        help="stop sampling after this many draws per wanted sample")
    parser.add_argument("--log_every", type=int, default=defaults.log_every, help="log the loss every N steps")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of training and sampling")
    parser.add_argument("--max_train_samples", type=int, default=None, help="cap on training instances per task (the ratio then applies to the capped set)")
    parser.add_argument("--save_generator", default=None, help="also save each generator to DIR/<task>")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights' dtype (default: as transformers loads the backbone)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = GeneratorSettings(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        source_length=args.source_length, target_length=args.target_length, ratio=args.ratio,
        sample_batch_size=args.sample_batch_size, draws_per_sample=args.draws_per_sample,
        log_every=args.log_every, seed=args.seed,
    )
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        if not tasks:
            raise DataError("--tasks is empty")
        for task in tasks:  # fail before any training if a task is missing or malformed
            _, folder = find_task(args.data_dir, task)
            read_split_file(folder / "train.json")
        with stdout_kept_for_results():
            written = [
                generate_for_task(
                    args.model_name_or_path, args.data_dir, task, args.out, settings,
                    max_train_samples=args.max_train_samples, save_generator=args.save_generator,
                    device=args.device, dtype=args.dtype,
                )
                for task in tasks
            ]
    except (DataError, PseudoDataError) as err:
        print(f"sapt pseudo_data: error: {err}", file=sys.stderr)
        return 2
    for task, folder in zip(tasks, written):
        print(f"{task}: {folder if folder is not None else 'already done'}")
    return 0


def cli() -> int:
    """`python -m sapt pseudo_data` (generated pipelines) and `scripts/generate_pseudo_data.py`."""
    setup_cli_logging()
    return main()
