"""What a setting may hold, written once per field and read by every check of it.

A `Rule` pairs a test of a value with the words an error shows ("an integer of at least 1"). The
arguments of a task step (sapt.training.task_args.ARGUMENT_RULES) and the fields of a stored SAPT
config (sapt.config) each keep one table of rules beside their dataclass; the pre-flight checks, the
generators' `--set` and the loader of `sapt_config.json` all read those tables, so a range is never
written twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    kind: str  # what the value should be, as an error says it after "expected"
    accepts: Callable[[object], bool]

    def problem(self, name: str, value) -> str | None:
        """None when `value` suits the rule, else '<name> <value>: expected <kind>'."""
        return None if self.accepts(value) else f"{name} {value!r}: expected {self.kind}"


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(at_least: int | None = None, at_most: int | None = None) -> Rule:
    if at_most is not None:
        return Rule(f"an integer from {at_least} to {at_most}",
                    lambda v: _is_integer(v) and at_least <= v <= at_most)
    if at_least is not None:
        return Rule(f"an integer of at least {at_least}", lambda v: _is_integer(v) and v >= at_least)
    return Rule("an integer", _is_integer)


def number(at_least: float | None = None) -> Rule:
    if at_least is None:
        return Rule("a finite number", _is_number)
    return Rule(f"a finite number of at least {at_least:g}", lambda v: _is_number(v) and v >= at_least)


def interval(low: float, high: float, closed: str) -> Rule:
    """A number between `low` and `high`; `closed` is '[)', '(]', '[]' or '()' as the interval is written."""
    left = (lambda v: v >= low) if closed[0] == "[" else (lambda v: v > low)
    right = (lambda v: v <= high) if closed[1] == "]" else (lambda v: v < high)
    return Rule(f"a number in {closed[0]}{low:g}, {high:g}{closed[1]}", lambda v: _is_number(v) and left(v) and right(v))


def optional(rule: Rule) -> Rule:
    """The rule, or no value at all (the field's default None: unset)."""
    return Rule(rule.kind, lambda v: v is None or rule.accepts(v))


def text(non_empty: bool = False) -> Rule:
    if non_empty:
        return Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v))
    return Rule("a string", lambda v: isinstance(v, str))


def texts(non_empty: bool = False) -> Rule:
    """A list of strings (each non-empty when asked)."""
    item = text(non_empty)
    return Rule(f"a list of {'non-empty ' if non_empty else ''}strings",
                lambda v: isinstance(v, list) and all(item.accepts(x) for x in v))


def flag() -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool))


def either(first: Rule, second: Rule) -> Rule:
    return Rule(f"{first.kind} or {second.kind}", lambda v: first.accepts(v) or second.accepts(v))


def first_problem(values: dict, rules: dict[str, Rule], prefix: str = "") -> str | None:
    """The first value of `values` that breaks its rule (keys without a rule pass), as one line."""
    for name, value in values.items():
        rule = rules.get(name)
        if rule is not None:
            problem = rule.problem(prefix + name, value)
            if problem:
                return problem
    return None
