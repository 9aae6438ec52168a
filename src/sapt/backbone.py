"""Loading stock backbones and tokenizers from a local path or the hub, the same way for every size."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer


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
