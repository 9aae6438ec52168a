"""`python -m sapt.score`: the scorer (the command lives in sapt.experiments.score)."""

import sys

from sapt.experiments.score import main

if __name__ == "__main__":
    sys.exit(main())
