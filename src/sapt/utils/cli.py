"""One way for every command to end on a user mistake: one line `prog: error: message`, exit status 2.

Commands parse with `OneLineArgumentParser` (argparse's own errors, without the usage block), raise
`UsageError` (or their module's error class) for mistakes found later, and turn those into the one
line with `report_error` in their `main`.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2  # argparse's status for a bad command line; every command uses it for any user mistake


class UsageError(ValueError):
    """A mistake in the command line (reported in one line, exit status 2)."""


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it or there is none
    (no value, an off switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == [] or action.default == argparse.SUPPRESS
        if "default" in text or nothing or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): `prog: error: message (see --help)`, exit 2;
    help texts end with the option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def first_line(err: BaseException) -> str:
    """The first non-blank line of an exception's message (libraries' messages run over many lines),
    or the exception's class name when it has no message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def one_line(err: BaseException) -> str:
    """The whole message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(err).split())


def report_error(prog: str, err: BaseException) -> int:
    """Print `prog: error: message` on stderr and return the exit status for it."""
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return EXIT_USAGE
