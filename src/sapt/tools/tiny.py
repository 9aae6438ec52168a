"""Build a tiny, randomly initialised T5 or LLaMA with a locally trained tokenizer, fully offline.

Tests and smoke runs need a real HuggingFace checkpoint directory (model + tokenizer + generation
config) without any download. This module trains a byte-level BPE on the benchmark's own text and
saves a small model of the requested family beside it, so every stock loader works on it:

    python -m sapt tiny --family t5 --out /tmp/tiny-t5
    python -m sapt tiny --family llama --out /tmp/tiny-llama --vocab_size 2000 --seed 0

``--pretrain_steps N`` (default 0: random weights, as before) then trains every weight for N AdamW steps
on the unlabelled text of the benchmark's TRAIN splits (definitions and inputs, never outputs) with a
generic self-supervised objective: T5 reconstructs each text from a copy with random spans replaced by
``<unk>`` (denoising); LLaMA predicts the next token. Seeded and deterministic; recorded in the settings.

Building is idempotent (settings are recorded in ``tiny_model.json``) and atomic (the model is
written to a temporary directory beside the target, then renamed into place).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from ..training.collators import pad_rows
from ..training.data import DataError, format_prompt, read_split_file
from ..utils.cli import OneLineArgumentParser, report_error
from ..utils.logs import setup_cli_logging, stdout_kept_for_results
from .prepare_data import SOURCE_ENV, SourceError, find_source

logger = logging.getLogger(__name__)

FAMILIES = ("t5", "llama")
# Replaced by $SAPT_DATA_SOURCE (the release folder that holds CL_Benchmark/); still read, with a warning.
DEPRECATED_DATA_ENV = "SAPT_DATA_DIR"
SETTINGS_FILE = "tiny_model.json"
# Bump when the build recipe changes, so old directories are rebuilt instead of reused.
FORMAT_VERSION = 1
# Files whose presence (with a matching SETTINGS_FILE, written last) marks a directory as complete.
REQUIRED_FILES = (
    "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
)
MAX_INSTANCES_PER_TASK = 200
MODEL_MAX_LENGTH = 2048
PROMPT_WORDS = ("Definition", "Now complete the following example", "Input", "Output")

# Special tokens in id order: their position in the list is their id.
SPECIAL_TOKENS = {
    "t5": ["<pad>", "</s>", "<unk>"],          # pad=0, eos=1, unk=2 (as T5)
    "llama": ["<unk>", "<s>", "</s>", "<pad>"],  # unk=0, bos=1, eos=2, pad=3 (LLaMA plus its own pad)
}


def default_data_dir() -> Path | None:
    """CL_Benchmark/ of the release `make data` would use ($SAPT_DATA_SOURCE, else ../shared beside the
    working directory); None when there is none. The deprecated $SAPT_DATA_DIR names CL_Benchmark/ itself."""
    deprecated = os.environ.get(DEPRECATED_DATA_ENV)
    if deprecated and not os.environ.get(SOURCE_ENV):
        logger.warning("$%s is deprecated: set $%s to the folder holding CL_Benchmark/", DEPRECATED_DATA_ENV, SOURCE_ENV)
        return Path(deprecated) if Path(deprecated).is_dir() else None
    try:
        source = find_source()
    except SourceError as err:
        raise DataError(str(err)) from None
    if source is None or not (source / "CL_Benchmark").is_dir():
        return None
    return source / "CL_Benchmark"


def _builtin_corpus() -> list[str]:
    """A small deterministic English corpus, so the builder works when no benchmark is present."""
    subjects = ["The review", "This movie", "The question", "A student", "The answer", "Our team", "The story"]
    verbs = ["describes", "asks about", "explains", "mentions", "contradicts", "supports", "summarizes"]
    objects = [
        "the main idea of the paragraph", "a positive sentiment", "a negative opinion", "the relation between "
        "two entities", "what happened next", "the correct option", "a short summary of the dialogue",
    ]
    labels = ["positive", "negative", "neutral", "entailment", "contradiction", "yes", "no", "True", "False"]
    lines = []
    for i, subject in enumerate(subjects):
        for j, verb in enumerate(verbs):
            obj = objects[(i + j) % len(objects)]
            label = labels[(i * len(verbs) + j) % len(labels)]
            lines.append(f"{subject} {verb} {obj}. Is it correct? Answer: {label}.")
            lines.append(f"Question: Why does {subject.lower()} {verb} {obj}?\nOutput: {label} (score {i * j}/10)")
    return lines


def _task_texts(train_json: Path) -> list[str]:
    """The definition plus the first instances' inputs and outputs of one task. The file goes through
    the checks train_task's do (a bad one ends in one line naming it)."""
    definition, instances = read_split_file(train_json, strip_definition=False)
    texts = [definition]
    for instance in instances[:MAX_INSTANCES_PER_TASK]:
        texts.append(instance["input"])
        output = instance["output"]
        texts.extend(output if isinstance(output, list) else [output])
    return [t for t in texts if t]


def find_benchmark(data_dir: str | Path | None) -> tuple[list[Path], str]:
    """The benchmark's train.json files (sorted, so the corpus is deterministic) and a source label.

    The label is recorded in the settings: a model trained on other text is a different model.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    files = sorted(root.glob("*/*/train.json")) if root is not None and root.is_dir() else []
    if not files:
        logger.warning("no benchmark found at %s; training the tokenizer on the built-in corpus", root)
        return [], "builtin"
    return files, str(root.resolve())


def load_corpus(files: list[Path]) -> list[str]:
    """Training text for the tokenizer: the benchmark's (or the built-in) text plus the prompt words."""
    texts = [t for f in files for t in _task_texts(f)] if files else _builtin_corpus()
    logger.info("tokenizer corpus: %d texts from %d tasks", len(texts), len(files))
    texts.append(format_prompt("SuperNI", "Classify the text.", "Some text.") + "positive")
    texts.extend(PROMPT_WORDS)
    return texts


def train_tokenizer(family: str, texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (nothing is ever unknown) with the family's special tokens and post-processor."""
    specials = SPECIAL_TOKENS[family]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    ids = {tok: tokenizer.token_to_id(tok) for tok in specials}
    assert ids == {tok: i for i, tok in enumerate(specials)}, ids

    if family == "t5":
        # T5 appends </s> to every sequence.
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", ids["</s>"])],
        )
        extra = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="right")
    else:
        # LLaMA prepends <s>; left padding keeps generated tokens adjacent to the prompt.
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", ids["<s>"])],
        )
        extra = dict(
            bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", padding_side="left",
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=MODEL_MAX_LENGTH, **extra)


def build_model(family: str, vocab_size: int, d_model: int, num_layers: int, seed: int):
    """A randomly initialised model; seeding first makes the weights a function of the settings."""
    torch.manual_seed(seed)
    if family == "t5":
        config = T5Config(
            vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model,
            num_layers=num_layers, num_decoder_layers=num_layers, num_heads=4,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
        model = T5ForConditionalGeneration(config)
        generation = GenerationConfig(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    else:
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            bos_token_id=1, eos_token_id=2, pad_token_id=3, max_position_embeddings=MODEL_MAX_LENGTH,
        )
        model = LlamaForCausalLM(config)
        generation = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model.generation_config = generation
    return model.eval()


# Self-supervised pretraining (optional): a few hundred steps make embeddings and attention carry
# meaning, so that the benchmark's behaviour (routing, forgetting) is not that of random weights.
PRETRAIN_DEFAULTS = dict(objective="denoise", learning_rate=3e-3, batch_size=32, max_length=96,
                         mask_ratio=0.15, mean_span=3, steps=0)


def pretraining_corpus(files: list[Path]) -> list[str]:
    """Unlabelled text of the TRAIN splits: each definition, each input, and each input in the prompt
    format with its definition (no outputs). The built-in corpus when no benchmark is found."""
    if not files:
        return _builtin_corpus()
    texts = []
    for path in files:
        definition, instances = read_split_file(path, strip_definition=False)
        if definition:
            texts.append(definition)
        for instance in instances[:MAX_INSTANCES_PER_TASK]:
            text = instance["input"]
            if text:
                texts.append(text)
                if definition:
                    texts.append(format_prompt("SuperNI", definition, text))
    return texts


def corrupt(ids: list[int], rng: torch.Generator, mask_id: int, ratio: float, mean_span: int) -> list[int]:
    """Replace random spans (about `ratio` of the tokens, spans of 1..2*mean_span-1) by one `mask_id` each."""
    out, i, n = [], 0, len(ids)
    start_p = ratio / mean_span
    while i < n:
        if torch.rand((), generator=rng).item() < start_p:
            span = int(torch.randint(1, 2 * mean_span, (), generator=rng).item())
            out.append(mask_id)
            i += span
        else:
            out.append(ids[i])
            i += 1
    return out


def pretraining_batch(tokenizer, texts: list[str], family: str, rng: torch.Generator, cfg: dict) -> dict:
    """T5: corrupted text -> original text (denoising); LLaMA: next-token prediction on the text."""
    encoded = [tokenizer(t, truncation=True, max_length=cfg["max_length"])["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id
    if family == "t5":
        unk = tokenizer.unk_token_id
        sources = [corrupt(ids[:-1], rng, unk, cfg["mask_ratio"], cfg["mean_span"]) + ids[-1:] for ids in encoded]
        labels = pad_rows(encoded, -100)
        return {"input_ids": pad_rows(sources, pad), "attention_mask": pad_rows([[1] * len(s) for s in sources], 0),
                "labels": labels}
    input_ids = pad_rows(encoded, pad)
    mask = pad_rows([[1] * len(e) for e in encoded], 0)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


@torch.no_grad()
def heldout_loss(model, tokenizer, texts: list[str], family: str, seed: int = 0) -> float:
    """Mean loss of the pretraining objective on `texts` (fixed corruption for a given seed), eval mode."""
    was_training = model.training
    model.eval()
    rng = torch.Generator().manual_seed(seed)
    batch = pretraining_batch(tokenizer, texts, family, rng, PRETRAIN_DEFAULTS)
    loss = model(**batch).loss.item()
    model.train(was_training)
    return loss


def pretrain(model, tokenizer, texts: list[str], family: str, steps: int, seed: int) -> list[float]:
    """Train every weight for `steps` AdamW steps on shuffled batches of `texts`; deterministic given
    the seed. Returns the training losses. Leaves the model in eval mode."""
    cfg = PRETRAIN_DEFAULTS
    torch.manual_seed(seed + 1)  # dropout
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=0.0)
    model.train()
    order, cursor, losses = torch.randperm(len(texts), generator=rng).tolist(), 0, []
    for _ in range(steps):
        if cursor + cfg["batch_size"] > len(order):
            order, cursor = torch.randperm(len(texts), generator=rng).tolist(), 0
        chunk = [texts[i] for i in order[cursor: cursor + cfg["batch_size"]]]
        cursor += cfg["batch_size"]
        loss = model(**pretraining_batch(tokenizer, chunk, family, rng, cfg)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _is_complete(out_dir: Path, settings: dict) -> bool:
    """True when `out_dir` holds every required file and was built with exactly `settings`."""
    record = out_dir / SETTINGS_FILE
    if not record.is_file() or not all((out_dir / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        return json.loads(record.read_text()).get("settings") == settings
    except (OSError, json.JSONDecodeError):
        return False


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` to `out_dir`, moving any previous build aside first and deleting it after."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_tiny_model(
    family: str,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    vocab_size: int = 2000,
    seed: int = 0,
    d_model: int = 64,
    num_layers: int = 2,
    pretrain_steps: int = 0,
) -> Path:
    """Write a tiny model, tokenizer and generation config to `out_dir` and return it.

    Returns at once if `out_dir` already holds a complete build with the same settings. A directory
    that exists but was not made by this builder is never overwritten.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if d_model % 8:
        raise ValueError(f"d_model must be a multiple of 8 (4 heads with an even head size), got {d_model}")
    out_dir = Path(out_dir).resolve()
    files, source = find_benchmark(data_dir)
    settings = dict(
        format_version=FORMAT_VERSION, family=family, vocab_size=vocab_size, seed=seed,
        d_model=d_model, num_layers=num_layers, corpus=source,
    )
    if pretrain_steps:  # recorded only when asked, so default builds keep their settings (and directories)
        settings["pretraining"] = dict(PRETRAIN_DEFAULTS, steps=pretrain_steps)
    if _is_complete(out_dir, settings):
        logger.info("%s already holds a tiny %s model with these settings", out_dir, family)
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / SETTINGS_FILE).is_file():
        raise FileExistsError(f"{out_dir} exists, is not empty and was not written by sapt.tiny; refusing to replace it")
    vocab = _build_into_place(out_dir, files, settings, pretrain_steps)
    logger.info("wrote tiny %s model (vocab %d) to %s", family, vocab, out_dir)
    return out_dir


def _build_into_place(out_dir: Path, files: list[Path], settings: dict, pretrain_steps: int) -> int:
    """Build the model of `settings` in a temporary folder beside `out_dir`, then rename it into place.
    Returns the tokenizer's vocabulary size."""
    family, seed = settings["family"], settings["seed"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the final directory should look like any other
    try:
        tokenizer = train_tokenizer(family, load_corpus(files), settings["vocab_size"])
        model = build_model(family, len(tokenizer), settings["d_model"], settings["num_layers"], seed)
        if pretrain_steps:
            texts = pretraining_corpus(files)
            losses = pretrain(model, tokenizer, texts, family, pretrain_steps, seed)
            logger.info("pretrained %d steps on %d texts: loss %.3f -> %.3f", pretrain_steps, len(texts),
                        losses[0], losses[-1])
        model.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Written last: its presence marks the build as complete.
        record = dict(settings=settings, vocab_size_actual=len(tokenizer), special_tokens=SPECIAL_TOKENS[family])
        (tmp / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if _is_complete(out_dir, settings):  # a concurrent build finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(tokenizer)


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="sapt tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, required=True, help="model family: T5 (encoder-decoder) or LLaMA")
    parser.add_argument("--out", required=True, help="directory to write the model to")
    parser.add_argument("--data_dir", default=None,
                        help="CL_Benchmark root for the tokenizer's text (default: ../shared beside the working "
                             "directory, else a built-in corpus)")
    parser.add_argument("--vocab_size", type=int, default=2000, help="tokenizer vocabulary size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the tokenizer's training")
    parser.add_argument("--d_model", type=int, default=64, help="hidden width")
    parser.add_argument("--layers", type=int, default=2, help="layers (encoder and decoder each, for T5)")
    parser.add_argument("--pretrain_steps", type=int, default=0,
                        help="self-supervised pretraining steps after random init (0: none, random weights)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_cli_logging()
    try:
        with stdout_kept_for_results():
            out = build_tiny_model(
                args.family, args.out, data_dir=args.data_dir, vocab_size=args.vocab_size,
                seed=args.seed, d_model=args.d_model, num_layers=args.layers, pretrain_steps=args.pretrain_steps,
            )
    except DataError as err:
        sys.exit(report_error("sapt tiny", err))
    print(out)
