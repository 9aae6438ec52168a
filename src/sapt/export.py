"""`python -m sapt.export`: export a run's blocks as stock PEFT adapters (the command lives in sapt.tools.export)."""

import sys

from sapt.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
