"""`python -m sapt.prepare_data`: link/copy and verify the benchmark, or write the synthetic one (the command lives in sapt.tools.prepare_data)."""

import sys

from sapt.tools.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
