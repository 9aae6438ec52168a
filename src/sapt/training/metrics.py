"""Per-task metrics with SuperNI's conventions (docs/metrics.md): exact match and ROUGE-L F, both x100."""

from __future__ import annotations

import string

from rouge_score import rouge_scorer

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    return _SCORER.score(reference, prediction)["rougeL"].fmeasure


def compute_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """{'exact_match', 'rougeL'} averaged over examples, x100, rounded to 4 decimals."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
    count = len(references)
    em = sum(exact_match(p, r) for p, r in zip(predictions, references)) * 100 / count
    rl = sum(rouge_l(p, r) for p, r in zip(predictions, references)) * 100 / count
    return {"exact_match": round(em, 4), "rougeL": round(rl, 4)}

