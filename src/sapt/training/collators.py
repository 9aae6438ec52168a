"""Batching for training (teacher forcing) and for generation, per backbone family (docs/data.md, prompts).

Examples are dicts with `source` (prompt text), `target` (label text) and `index`; tokenization
happens here so the prompt and the label are always tokenized the same way in training and in
evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import IGNORE_INDEX


def pad_rows(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Token-id rows padded with `value` to the longest (on the left for decoder-only prompts)."""
    width = max(len(row) for row in rows)
    padded = [([value] * (width - len(row)) + row) if left else (row + [value] * (width - len(row))) for row in rows]
    return torch.tensor(padded, dtype=torch.long)


@dataclass
class Collator:
    """`for_generation=False`: input_ids, attention_mask, labels.
    `for_generation=True`: the prompt alone, plus `example_index` to find each example's reference.

    The last three fields reproduce the release's LLaMA collator (sapt.training.release_training): prompts without
    the tokenizer's special tokens (no BOS), padding with another id (the release's: BOS), and labels
    cut after EOS is appended (EOS lost for labels of max_target_length tokens or more)."""

    tokenizer: object
    is_encoder_decoder: bool
    max_source_length: int = 512
    max_target_length: int = 50
    for_generation: bool = False
    special_tokens: bool = True
    pad_token_id: int | None = None  # default: the tokenizer's
    eos_survives_truncation: bool = True

    def prompt_ids(self, sources: list[str]) -> list[list[int]]:
        return self.tokenizer(
            sources, truncation=True, max_length=self.max_source_length, add_special_tokens=self.special_tokens
        )["input_ids"]

    def label_ids(self, targets: list[str]) -> list[list[int]]:
        if self.is_encoder_decoder:  # T5's tokenizer closes every sequence with </s>
            return self.tokenizer(text_target=targets, truncation=True, max_length=self.max_target_length)[
                "input_ids"
            ]
        ids = self.tokenizer(targets, add_special_tokens=False)["input_ids"]
        eos = [self.tokenizer.eos_token_id]
        if self.eos_survives_truncation:
            return [row[: self.max_target_length] + eos for row in ids]
        return [(row + eos)[: self.max_target_length] for row in ids]

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.pad_token_id is None else self.pad_token_id
        left = not self.is_encoder_decoder  # decoder-only prompts end where generation starts
        prompts = self.prompt_ids([ex["source"] for ex in examples])
        if self.for_generation:
            batch = {"input_ids": pad_rows(prompts, pad, left), "attention_mask": pad_rows([[1] * len(p) for p in prompts], 0, left)}
            batch["example_index"] = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
            return batch
        labels = self.label_ids([ex["target"] for ex in examples])
        if self.is_encoder_decoder:
            return {
                "input_ids": pad_rows(prompts, pad, left=False),
                "attention_mask": pad_rows([[1] * len(p) for p in prompts], 0, left=False),
                "labels": pad_rows(labels, IGNORE_INDEX, left=False),
            }
        # Decoder-only: prompt + label + EOS in one sequence, loss on the label part only.
        sequences = [p + l for p, l in zip(prompts, labels)]
        targets = [[IGNORE_INDEX] * len(p) + l for p, l in zip(prompts, labels)]
        return {
            "input_ids": pad_rows(sequences, pad, left=True),
            "attention_mask": pad_rows([[1] * len(s) for s in sequences], 0, left=True),
            "labels": pad_rows(targets, IGNORE_INDEX, left=True),
        }
