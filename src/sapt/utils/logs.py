"""Progress logging for the command-line entry points."""

from __future__ import annotations

import contextlib
import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted: test harnesses swap the stream, and
    a handler bound to an old one would fail on every later record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_cli_logging(level: int = logging.INFO) -> None:
    """Every command's log format: let this package's records of `level` and above through to the root
    handler, adding one with FORMAT if there is none. A bare handler that a library's logging.basicConfig()
    put there on import (absl's, through rouge_score) gives way to it; a test harness's is kept."""
    logging.getLogger("sapt").setLevel(level)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    if not root.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)


@contextlib.contextmanager
def stdout_kept_for_results():
    """Inside the block, anything printed to stdout goes to stderr, so that a command's stdout holds
    only the result it prints afterwards (a path another command reads). DeepSpeed, once installed,
    is imported by accelerate on the way and logs to stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
