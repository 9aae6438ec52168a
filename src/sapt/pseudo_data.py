"""`python -m sapt.pseudo_data`: pseudo-sample generation (the command lives in sapt.tools.pseudo_data)."""

import sys

from sapt.tools.pseudo_data import cli

if __name__ == "__main__":
    sys.exit(cli())
