"""One table of rules per dataclass (sapt.utils.rules): every key a field, every default accepted, and
the ranges' edges where the words say they are."""

from __future__ import annotations

import math
from dataclasses import MISSING, fields

import pytest

from sapt.config import _FIELD_RULES, SaptConfig
from sapt.training.task_args import ARGUMENT_RULES, SaptArguments
from sapt.training.validation import _check_arguments
from sapt.utils import rules
from sapt.utils.cli import UsageError


def defaults(cls) -> dict:
    return {f.name: f.default if f.default is not MISSING else f.default_factory()
            for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}


def test_argument_rules_name_fields_and_accept_the_defaults():
    values = defaults(SaptArguments)
    assert set(ARGUMENT_RULES) <= set(values)
    assert rules.first_problem(values, ARGUMENT_RULES) is None


def test_config_rules_cover_every_field_and_accept_a_saved_config():
    assert set(_FIELD_RULES) == {f.name for f in fields(SaptConfig)}
    config = SaptConfig(base_model_name_or_path="m", model_type="t5", is_encoder_decoder=True, hidden_size=8)
    assert SaptConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("rule,inside,outside", [
    (rules.integer(at_least=1), [1, 7], [0, -1, 1.0, True, "1", None]),
    (rules.integer(at_least=1, at_most=2), [1, 2], [0, 3, False]),
    (rules.optional(rules.integer(at_least=1)), [None, 3], [0, 2.5]),
    (rules.number(at_least=0), [0, 0.5, 3], [-1e-9, math.inf, math.nan, False, "1"]),
    (rules.interval(0, 1, "[)"), [0, 0.999], [1, -0.1, math.nan]),
    (rules.interval(0, 1, "(]"), [1, 1e-9], [0, 1.5]),
    (rules.texts(non_empty=True), [[], ["q", "v"]], [["q", ""], "q", [1]]),
    (rules.either(rules.text(), rules.number()), ["sqrt_d", 2.0], [None, [1], True]),
])
def test_rules_accept_inside_and_refuse_outside(rule, inside, outside):
    assert all(rule.accepts(v) for v in inside), rule.kind
    assert not any(rule.accepts(v) for v in outside), rule.kind


def test_interval_words_match_the_interval():
    assert rules.interval(0, 1, "[)").kind == "a number in [0, 1)"
    assert rules.interval(0, 1, "(]").kind == "a number in (0, 1]"


@pytest.mark.parametrize("name,value,words", [
    ("lora_r", 0, "--lora_r 0: expected an integer of at least 1"),
    ("max_eval_samples", 0, "--max_eval_samples 0: expected an integer of at least 1"),
    ("kl_ratio", -0.5, "--kl_ratio -0.5: expected a finite number of at least 0"),
    ("lora_dropout", 1.0, "--lora_dropout 1.0: expected a number in [0, 1)"),
    ("router_pretrain_steps", -1, "--router_pretrain_steps -1: expected an integer of at least 0"),
])
def test_preflight_reads_the_same_rules(name, value, words):
    args = SaptArguments(model_name_or_path="m", task_order="a", task="a")
    _check_arguments(args)  # the defaults pass
    setattr(args, name, value)
    with pytest.raises(UsageError) as info:
        _check_arguments(args)
    assert str(info.value) == words
