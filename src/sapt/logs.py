"""Progress logging for the command-line entry points."""

from __future__ import annotations

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
    """Show this package's INFO records. The root logger is left alone: an imported library (absl,
    through rouge-score) installs its own handler there at WARNING."""
    logger = logging.getLogger("sapt")
    logger.setLevel(level)
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    logger.propagate = False
